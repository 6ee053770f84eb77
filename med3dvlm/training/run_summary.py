"""The end of a training run: its final metrics as ``final_metrics.json`` in the run folder and, with
W&B, as the run summary plus a ``final/metrics`` table (the CSV logger's equivalent is the file);
and the value a sweeper optimises: the best of every validation (``optimized_value=best``, by the
metric's mode) or the last one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from med3dvlm.utils.atomic import atomic_write_text

SUMMARY_FILE = "final_metrics.json"


class MetricHistory(L.Callback):
    """The value of ``metric`` at every validation, kept in checkpoints so a resumed run's best
    includes the validations before the crash; ``mode`` (``max``/``min``) says which is best."""

    def __init__(self, metric: str | None, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.mode = metric, mode
        self.values: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric) if self.metric else None
        if not trainer.sanity_checking and value is not None:
            self.values.append((int(trainer.global_step), float(value)))

    def best(self) -> tuple[int, float] | None:
        if not self.values:
            return None
        return (max if self.mode == "max" else min)(self.values, key=lambda pair: pair[1])

    def state_dict(self) -> dict[str, list[list[float]]]:
        return {"values": [[step, value] for step, value in self.values]}

    def load_state_dict(self, state_dict: dict[str, list[list[float]]]) -> None:
        self.values = [(int(step), float(value)) for step, value in state_dict["values"]]


def optimized_value(
    metrics: dict[str, float], history: MetricHistory, kind: str
) -> tuple[float | None, str, int | None]:
    """``(value, what it is, its step)``: the best validation value when ``kind == "best"`` and there
    was one, else the last value the run logged."""
    if kind not in ("best", "last"):
        raise ValueError(f"optimized_value must be 'best' or 'last', got {kind!r}")
    best = history.best()
    if kind == "best" and best is not None:
        return best[1], "best", best[0]
    return metrics.get(history.metric or ""), "last", None


@rank_zero_only
def write_summary(
    metrics: dict[str, float],
    output_dir: str | os.PathLike,
    loggers: list[Logger],
    optimized_metric: str | None = None,
    value: float | None = None,
    value_is: str = "last",
    step: int | None = None,
) -> None:
    """Write the final metrics and the value a sweeper optimises (which metric, best or last, at which
    step) to the run folder and W&B."""
    record = {
        "optimized_metric": optimized_metric,
        "value": value,
        "value_is": value_is,
        "step": step,
        "metrics": dict(sorted(metrics.items())),
    }
    atomic_write_text(Path(output_dir) / SUMMARY_FILE, json.dumps(record, indent=2) + "\n")
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(metrics)
            logger.log_table(
                key="final/metrics",
                columns=["metric", "value"],
                data=[[k, v] for k, v in sorted(metrics.items())],
            )


@rank_zero_only
def finish_wandb_runs(loggers: list[Logger]) -> None:
    """End this job's W&B run: otherwise the next job of a multirun would log into it."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
