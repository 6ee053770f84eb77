"""Callbacks the run tests inject through the CLI (``+callbacks.NAME._target_=helpers.runs.X``)."""

from __future__ import annotations

import json
import os
import signal
import sys

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILLs its own process at the start of optimizer step ``step + 1`` (after ``step`` steps):
    no clean-up, no final checkpoint, as a crashed node."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordProcess(L.Callback):
    """Appends one JSON line per training process to ``path``: its rank, node, world size, the cluster
    environment Lightning detected, run folder and command line."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_start(self, trainer, pl_module):
        record = {
            "rank": trainer.global_rank,
            "node": trainer.node_rank,
            "world_size": trainer.world_size,
            "environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
            "folder": str(trainer.default_root_dir),
            "argv": sys.argv[1:],
        }
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


class KillAtValidationStart(L.Callback):
    """SIGKILLs its own process when the validation after ``step`` optimizer steps begins."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_start(self, trainer, pl_module):
        if trainer.global_step >= self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGKILL)
