"""Training callbacks: the RNG state in checkpoints (exact resume), a W&B table of SigLIP validation
examples, generation-based closed-VQA validation of the VLM stages."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader, Subset

from med3dvlm.data.collate import PadCollate
from med3dvlm.data.datamodule import release_of
from med3dvlm.data.datasets import VolumeReader
from med3dvlm.data.prompts import PromptBuilder
from med3dvlm.data.releases.m3d.samples import ClosedVQADataset
from med3dvlm.metrics.vqa import OVERALL, closed_vqa_metrics
from med3dvlm.models.generation import GenerationSettings, model_generate_fn

log = logging.getLogger(__name__)


def mid_slices(volume: torch.Tensor) -> list[np.ndarray]:
    """Axial, coronal and sagittal middle slices of a ``(1, D, H, W)`` or ``(D, H, W)`` volume in
    ``[0, 1]`` as uint8 images."""
    vol = volume.detach().float().cpu().reshape(volume.shape[-3:])
    d, h, w = vol.shape
    planes = [vol[d // 2], vol[:, h // 2, :], vol[:, :, w // 2]]
    return [(p.clamp(0, 1) * 255).round().to(torch.uint8).numpy() for p in planes]


class RetrievalExamples(L.Callback):
    """After each validation, log to W&B a table of the first ``count`` validation pairs: the
    volume's mid-slices in three planes, the report, and the rank of the true report among all
    validation reports for that volume (1 = retrieved first).

    Reads the gathered evaluation ranks the SigLIP stage leaves in ``last_retrieval``; does
    nothing without a ``WandbLogger``.
    """

    def __init__(self, count: int = 4, key: str = "val/examples") -> None:
        self.count = count
        self.key = key
        self._examples: list[dict[str, Any]] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._examples = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.is_global_zero or len(self._examples) >= self.count:
            return
        for image, text, sample_id in zip(batch["image"], batch["text"], batch["sample_id"]):
            if len(self._examples) < self.count:
                index = int(str(sample_id).rsplit("/", 1)[-1])
                self._examples.append({"index": index, "slices": mid_slices(image), "text": text})

    def rows(self, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        """The examples with the rank of their true match (``None`` if not evaluated)."""
        result = getattr(pl_module, "last_retrieval", {})
        position = {int(i): p for p, i in enumerate(result.get("indices", torch.empty(0)).tolist())}
        ranks = result.get("i2t_rank")
        return [
            {**ex, "rank": int(ranks[position[ex["index"]]]) if ex["index"] in position else None}
            for ex in self._examples
        ]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not self._examples:
            return
        import wandb

        data = [
            [row["index"], *(wandb.Image(s) for s in row["slices"]), row["text"], row["rank"]]
            for row in self.rows(pl_module)
        ]
        columns = ["index", "axial", "coronal", "sagittal", "report", "rank_of_true_report"]
        for logger in loggers:
            logger.log_table(key=self.key, columns=columns, data=data, step=trainer.global_step)


class RNGStateInCheckpoint(L.Callback):
    """Saves the torch (and CUDA) RNG state with every checkpoint and restores it just before the
    first training step after a resume: dropout and other random ops then draw what the
    uninterrupted run drew. Restored at the first step, not at load time, because creating the data
    iterator draws from the RNG first (as it does in the uninterrupted run at the epoch start, not
    mid-epoch). Tensors only, so checkpoints still load with ``weights_only=True``."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class ClosedVQAValidation(L.Callback):
    """At every validation, the benchmark's closed-VQA accuracy of the stage's model on a fixed,
    seeded subset of ``size`` validation questions (0: off): greedy decoding, the substring rule
    (``med3dvlm.metrics.vqa``), logged as ``val/closed_accuracy`` and per question type
    (``val/closed_accuracy/Plane``, ...), so it can be the monitored and optimised metric. With W&B,
    a table of the first ``examples`` questions: mid-slices, question, answer, generation.

    Every process generates the same questions (FSDP needs all ranks in each forward); rank 0 logs.
    """

    def __init__(
        self,
        size: int = 32,
        seed: int = 0,
        max_new_tokens: int = 8,
        batch_size: int = 8,
        examples: int = 4,
        key: str = "val/closed_examples",
    ) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0 (0: off), got {size}")
        self.size, self.seed, self.examples, self.key = size, seed, examples, key
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self._subset: Subset | None = None
        self._skipped = False

    def subset(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Subset:
        """The seeded subset of the validation closed questions (chosen once)."""
        if self._subset is None:
            datamodule = trainer.datamodule
            model = pl_module.model
            prompts = PromptBuilder(
                model.tokenizer, model.image_token, model.num_image_tokens, datamodule.max_length
            )
            dataset = ClosedVQADataset(
                datamodule.data_dir,
                "validation",
                prompts,
                VolumeReader(datamodule.spatial_size),
                prompt_only=True,
            )
            count = min(self.size, len(dataset))
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))
            self._subset = Subset(dataset, sorted(order[:count].tolist()))
        return self._subset

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.size == 0:
            return
        if "closed_vqa" not in release_of(trainer.datamodule.data_dir).tasks:
            if not self._skipped:
                log.info("validation by generation: this dataset has no closed questions; not measured")
                self._skipped = True
            return
        model = pl_module.model
        collate = PadCollate(model.tokenizer.pad_token_id, padding_side="left")
        generate = model_generate_fn(model, GenerationSettings(max_new_tokens=self.max_new_tokens))
        rows = []
        with torch.random.fork_rng():  # validation must not move the training's RNG
            for batch in DataLoader(
                self.subset(trainer, pl_module), batch_size=self.batch_size, collate_fn=collate
            ):
                for i, output in enumerate(generate(batch)):
                    rows.append(
                        {
                            "image": batch["image"][i],
                            "question": batch["question"][i],
                            "answer": f"{batch['answer_choice'][i]}. {batch['answer'][i]}",
                            "letter": batch["answer_choice"][i],
                            "type": batch["question_type"][i],
                            "output": output,
                        }
                    )
        accuracy = closed_vqa_metrics(
            [r["output"] for r in rows], [r["letter"] for r in rows], [r["type"] for r in rows]
        )["accuracy"]
        pl_module.log("val/closed_accuracy", accuracy[OVERALL], sync_dist=False)
        for name, value in accuracy.items():
            if name != OVERALL:
                pl_module.log(f"val/closed_accuracy/{name}", value, sync_dist=False)
        self._log_examples(trainer, rows[: self.examples])

    def _log_examples(self, trainer: L.Trainer, rows: list[dict[str, Any]]) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not trainer.is_global_zero:
            return
        import wandb

        data = [
            [*(wandb.Image(s) for s in mid_slices(r["image"])), r["question"], r["answer"], r["output"]]
            for r in rows
        ]
        for logger in loggers:
            logger.log_table(
                key=self.key,
                columns=["axial", "coronal", "sagittal", "question", "answer", "generated"],
                data=data,
                step=trainer.global_step,
            )
