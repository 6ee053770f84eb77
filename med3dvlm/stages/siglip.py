"""Stage 1: SigLIP image-report alignment of the volume encoder and the text encoder.

The module wires an image tower, a text tower and the SigLIP loss (all built from configs) and owns
the per-step logging, the retrieval evaluation and the encoder export; the optimiser, step timing
and end-of-training export come from :class:`med3dvlm.training.stage.TrainingStage`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn
from transformers import AutoTokenizer

from med3dvlm.artifacts.encoder_export import siglip_files, write_encoder_export
from med3dvlm.artifacts.record import ArtifactRecord
from med3dvlm.metrics.retrieval import retrieval_metrics, true_match_ranks
from med3dvlm.models.build import plain_config
from med3dvlm.models.towers import ImageTower
from med3dvlm.training.sharding import full_weights
from med3dvlm.training.stage import TrainingStage

log = logging.getLogger(__name__)

STAGE = "siglip"


def sample_indices(batch: Mapping[str, Any]) -> torch.Tensor:
    """Dataset positions of a batch's samples, from ``sample_id`` (``task/split/index``)."""
    return torch.tensor([int(str(sid).rsplit("/", 1)[-1]) for sid in batch["sample_id"]], dtype=torch.long)


class SigLIPStage(TrainingStage):
    """SigLIP training of an image tower (``encoder`` + head) and a text tower, built from config nodes
    (``stage=siglip``'s ``module``).

    Args:
        encoder: the volume encoder's ``_target_`` node (recorded in the export).
        text_encoder: the text tower's node; its ``model_name_or_path`` (a string, or a ``_target_``
            node that returns one, e.g. the tiny BERT builder) also names the tokenizer.
        loss: the SigLIP loss node (learnable ``log_scale`` and ``bias``).
        optimizer / scheduler: ``_partial_`` nodes (parameter groups; ``(optimizer, total_steps)``).
        input_size: ``(D, H, W)`` the encoder is trained at (recorded in the export).
        embed_dim: the shared image/text embedding width.
        weight_decay: on weights only (see ``med3dvlm.training.optim.split_decay``).
        freeze_bn: keep every BatchNorm in eval mode (running statistics used and never updated)
            while the rest trains; affine parameters still train.
        experiment: name recorded in the export, used to chain stages.
        export_dir: where the end-of-training export goes; ``best_export_dir``: the export of the
            best validation ``recall_mean``. ``None`` disables either.
    """

    def __init__(
        self,
        encoder: Mapping[str, Any],
        text_encoder: Mapping[str, Any],
        loss: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        input_size: Sequence[int],
        embed_dim: int = 768,
        weight_decay: float = 0.1,
        freeze_bn: bool = False,
        experiment: str = "default",
        export_dir: str | None = None,
        best_export_dir: str | None = None,
    ) -> None:
        super().__init__(instantiate(optimizer), instantiate(scheduler), weight_decay, export_dir)
        self.encoder_config = plain_config(encoder)
        text_config = plain_config(text_encoder)
        source = text_config["model_name_or_path"]
        text_config["model_name_or_path"] = str(
            instantiate(source) if isinstance(source, Mapping) else source
        )
        self.image_tower = ImageTower(instantiate(self.encoder_config), embed_dim)
        self.text_tower = instantiate({**text_config, "embed_dim": embed_dim})
        self.tokenizer = AutoTokenizer.from_pretrained(text_config["model_name_or_path"])
        self.loss = instantiate(loss)
        self.input_size = [int(n) for n in input_size]
        self.freeze_bn = freeze_bn
        self.experiment = experiment
        self.best_export_dir = Path(best_export_dir) if best_export_dir else None
        self.best_score = float("-inf")
        self.last_retrieval: dict[str, Any] = {}
        self._eval_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # Pretrained towers load in eval mode; everything trains here (BatchNorm as ``freeze_bn`` says).
        self.train()

    # --- model -----------------------------------------------------------------------------

    @property
    def encoder(self) -> nn.Module:
        return self.image_tower.encoder

    def train(self, mode: bool = True) -> SigLIPStage:
        super().train(mode)
        if mode and self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def embed(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        image_emb = self.image_tower(batch["image"])
        text_emb = self.text_tower(batch["input_ids"], batch["attention_mask"])
        return image_emb, text_emb

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.loss(*self.embed(batch))

    def datamodule_kwargs(self) -> dict[str, Any]:
        """What the datamodule needs from the model: the text encoder's tokenizer."""
        return {"tokenizer": self.tokenizer}

    # --- training --------------------------------------------------------------------------

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        size = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/temperature", self.loss.log_scale.detach().exp().squeeze(), batch_size=size)
        self.log("train/bias", self.loss.bias.detach().squeeze(), batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=size)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before clipping, so the logged norm shows what clipping acts on.
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            self.log("train/grad_norm", norm)

    # --- evaluation ------------------------------------------------------------------------

    def _eval_step(self, batch: Mapping[str, Any], prefix: str) -> None:
        image_emb, text_emb = self.embed(batch)
        self.log(
            f"{prefix}/loss", self.loss(image_emb, text_emb), batch_size=image_emb.shape[0], sync_dist=True
        )
        self._eval_outputs.append(
            (sample_indices(batch).to(image_emb.device), image_emb.float(), text_emb.float())
        )

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs = []

    def on_test_epoch_start(self) -> None:
        self._eval_outputs = []

    def gathered_embeddings(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, image_emb, text_emb) of the whole evaluation split in dataset order, collected
        from every process (a distributed sampler pads with repeats: duplicates are dropped)."""
        indices = torch.cat([o[0] for o in self._eval_outputs])
        image_emb = torch.cat([o[1] for o in self._eval_outputs])
        text_emb = torch.cat([o[2] for o in self._eval_outputs])
        if self.trainer.world_size > 1:
            # Ranks may hold different counts; pad to the largest so all_gather sees equal shapes.
            count = torch.tensor([indices.shape[0]], device=indices.device)
            most = int(self.all_gather(count).max())
            pad = most - indices.shape[0]
            indices = torch.cat([indices, indices.new_full((pad,), -1)])
            image_emb = torch.cat([image_emb, image_emb.new_zeros(pad, image_emb.shape[1])])
            text_emb = torch.cat([text_emb, text_emb.new_zeros(pad, text_emb.shape[1])])
            indices = self.all_gather(indices).flatten()
            image_emb = self.all_gather(image_emb).flatten(0, 1)
            text_emb = self.all_gather(text_emb).flatten(0, 1)
        order = torch.argsort(indices, stable=True)
        indices, image_emb, text_emb = indices[order], image_emb[order], text_emb[order]
        keep = indices >= 0
        keep[1:] &= indices[1:] != indices[:-1]
        return indices[keep].cpu(), image_emb[keep].cpu(), text_emb[keep].cpu()

    def _eval_epoch_end(self, prefix: str) -> dict[str, float]:
        if not self._eval_outputs:
            return {}
        indices, image_emb, text_emb = self.gathered_embeddings()
        self._eval_outputs = []
        metrics = retrieval_metrics(image_emb, text_emb)
        # Every process holds the same gathered embeddings, so no further reduction is needed.
        self.log_dict({f"{prefix}/{k}": v for k, v in metrics.items()})
        self.last_retrieval = {
            "split": prefix,
            "indices": indices,
            "i2t_rank": true_match_ranks(image_emb @ text_emb.T)["i2t"],
            "metrics": metrics,
        }
        return metrics

    def on_validation_epoch_end(self) -> None:
        metrics = self._eval_epoch_end("val")
        if self.trainer.sanity_checking or not metrics or self.best_export_dir is None:
            return
        if metrics["recall_mean"] > self.best_score:
            self.best_score = metrics["recall_mean"]
            with full_weights(self):  # every rank (FSDP gathers the shards)
                if self.trainer.is_global_zero:
                    self.export(self.best_export_dir, "best", {"val/recall_mean": self.best_score})

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    # --- export ----------------------------------------------------------------------------

    def write_export(self, folder: Path) -> Path:
        return self.export(folder, "final")

    def export(self, folder: Path, which: str, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the export (``which``: ``final`` or ``best``) to ``folder``: the encoder for stage 2,
        and the text encoder, tokenizer and heads for retrieval evaluation."""
        towers = ("image_tower.encoder.", "text_tower.language_encoder.")
        heads = {k: v for k, v in self.state_dict().items() if not k.startswith(towers)}
        preprocessing, _ = self.training_data()
        record = ArtifactRecord(
            "encoder_export",
            self.experiment,
            self.input_size,
            preprocessing,
            {"encoder": self.encoder_config},
            stage=STAGE,
            which=which,
            text_pooling=self.text_tower.pooling,
            extra={"global_step": int(self.global_step), **(extra or {})},
        )
        return write_encoder_export(
            folder,
            self.encoder,
            record,
            siglip_files(self.text_tower.language_encoder, self.tokenizer, heads),
        )

    # The RNG state travels in checkpoints through the RNGStateInCheckpoint callback (every stage).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["siglip_best_score"] = self.best_score

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.best_score = checkpoint.get("siglip_best_score", float("-inf"))
