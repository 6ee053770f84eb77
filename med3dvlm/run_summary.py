"""The end of a training run: its final metrics as ``final_metrics.json`` in the run folder and, with
W&B, as the run summary plus a ``final/metrics`` table (the CSV logger's equivalent is the file)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from med3dvlm.utils.atomic import atomic_write_text

SUMMARY_FILE = "final_metrics.json"


@rank_zero_only
def write_summary(metrics: dict[str, float], output_dir: str | os.PathLike, loggers: list[Logger],
                  optimized_metric: str | None = None) -> None:
    """Write the final metrics (and which one a sweeper optimises) to the run folder and W&B."""
    record = {"optimized_metric": optimized_metric, "value": metrics.get(optimized_metric or ""),
              "metrics": dict(sorted(metrics.items()))}
    atomic_write_text(Path(output_dir) / SUMMARY_FILE, json.dumps(record, indent=2) + "\n")
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(metrics)
            logger.log_table(key="final/metrics", columns=["metric", "value"],
                             data=[[k, v] for k, v in sorted(metrics.items())])


@rank_zero_only
def finish_wandb_runs(loggers: list[Logger]) -> None:
    """End this job's W&B run: otherwise the next job of a multirun would log into it."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
