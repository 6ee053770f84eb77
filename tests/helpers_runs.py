"""Callbacks the run tests inject through the CLI (``+callbacks.NAME._target_=helpers_runs.X``)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILLs its own process at the start of optimizer step ``step + 1`` (after ``step`` steps):
    no clean-up, no final checkpoint, as a crashed node."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
