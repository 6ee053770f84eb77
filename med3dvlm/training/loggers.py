"""Loggers for runs that resume: the CSV logger's ``metrics.csv`` grows across restarts instead of
being replaced; the W&B logger continues the same run."""

from __future__ import annotations

import csv
import os
import uuid
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from med3dvlm.utils.atomic import atomic_write_text
from med3dvlm.utils.processes import launched_as_global_rank_zero


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; a resumed run keeps it and adopts its
        # columns, so the first new rows append (a new column rewrites the file with the union).
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the ``metrics.csv`` of a resumed run. Steps repeated after the
    checkpoint appear twice; the later row is the resumed run's."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


RUN_ID_FILE = "run_id"
_STAGING = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache"}
_USER_STAGING = {variable: os.environ.get(variable) for variable in _STAGING}


class ResumableWandbLogger(WandbLogger):
    """``WandbLogger`` that stays one W&B run across resumes and keeps its files in the run folder.

    The run id is kept in ``<save_dir>/wandb/run_id``: a run resumed in its folder (``resume=``)
    continues the same W&B run (``resume="allow"``) instead of starting a second one. Offline
    runs, and W&B's staging and cache directories (tables' media are staged there), live under
    ``<save_dir>/wandb`` unless ``WANDB_DATA_DIR`` / ``WANDB_CACHE_DIR`` say otherwise.
    """

    def __init__(self, save_dir: str = ".", **kwargs: Any) -> None:
        folder = Path(save_dir) / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / RUN_ID_FILE
        # Only global rank 0 logs; the other processes (other nodes too) leave the id alone.
        if kwargs.get("id") is None and launched_as_global_rank_zero():
            if not id_file.is_file():  # W&B ids: lower-case letters and digits
                atomic_write_text(id_file, uuid.uuid4().hex[:12] + "\n")
            kwargs["id"] = id_file.read_text(encoding="utf-8").strip()
        kwargs.setdefault("resume", "allow")
        for variable, sub in _STAGING.items():
            if _USER_STAGING[variable] is None:  # each job of a multirun stages into its own folder
                os.environ[variable] = str(folder / sub)
        super().__init__(save_dir=save_dir, **kwargs)
