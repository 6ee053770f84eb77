"""What every training stage shares: the optimiser and its schedule, step timing, lean checkpoints,
FSDP2 sharding, and the export written once training ends.

A stage (``med3dvlm.stages.*``) subclasses :class:`TrainingStage`, decides what trains, computes its
loss and metrics, and implements :meth:`TrainingStage.write_export`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch

from med3dvlm.data.prepared import m3d_preprocessing
from med3dvlm.data.preprocess import Preprocessing
from med3dvlm.training.lean_checkpoint import LeanCheckpoint
from med3dvlm.training.optim import SchedulerFactory, param_groups
from med3dvlm.training.sharding import ShardedStage, full_weights

log = logging.getLogger(__name__)


class TrainingStage(LeanCheckpoint, ShardedStage, L.LightningModule):
    """Base of the stage LightningModules.

    Args:
        optimizer: ``_partial_`` optimiser taking parameter groups.
        scheduler: ``(optimizer, total_steps) -> LRScheduler``, stepped every optimiser step.
        weight_decay: on weights only (see :func:`med3dvlm.training.optim.split_decay`).
        export_dir: where :meth:`write_export` writes at the end of training (``None``: nowhere).

    A subclass sets ``lr_by_prefix`` (parameter-name prefix -> learning rate) for parameters that
    need their own, and ``frozen_base_source`` (where its frozen parts come from, recorded in each
    checkpoint).
    """

    def __init__(
        self,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: SchedulerFactory,
        weight_decay: float = 0.0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.weight_decay = weight_decay
        self.export_dir = Path(export_dir) if export_dir else None
        self.lr_by_prefix: dict[str, float] = {}
        self.frozen_base_source: dict[str, Any] = {}
        self._step_started = 0.0
        self._lean_init()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(
            param_groups(self, self.weight_decay, lr_by_prefix=self.lr_by_prefix)
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        seconds = max(time.perf_counter() - self._step_started, 1e-9)
        self.log("train/samples_per_s", batch["input_ids"].shape[0] * self.trainer.world_size / seconds)

    def on_train_end(self) -> None:
        if self.export_dir is None:
            return
        with full_weights(self):  # every rank (FSDP gathers the shards)
            if self.trainer.is_global_zero:
                folder = self.write_export(self.export_dir)
                log.info("wrote the %s export to %s", type(self).__name__, folder)

    def write_export(self, folder: Path) -> Path:
        """Write what this stage hands on to ``folder``; returns it."""
        raise NotImplementedError

    def training_data(self) -> tuple[Preprocessing, str]:
        """The preprocessing and prompt format of the data this stage trains on (what its export
        records): the datamodule's; M3D's, marked inferred, when it was trained on bare loaders."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        preprocessing = getattr(datamodule, "preprocessing", None)
        if preprocessing is None:
            log.warning(
                "the training data records no preprocessing (no prepared folder): the export assumes M3D's"
            )
            preprocessing = m3d_preprocessing(inferred=True)
        return preprocessing, getattr(datamodule, "prompt_format", "m3d")

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
