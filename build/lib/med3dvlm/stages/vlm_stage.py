"""What stages 2 (pretrain) and 3 (finetune) share: the VLM build, the LM-loss loop, the optimiser.

The LightningModules orchestrate: they build the VLM from component configs and hand-off folders,
decide what trains, log, and write their hand-off folder at the end of training. The model itself
lives in ``med3dvlm.models.vlm``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from med3dvlm.models.llm import LanguageModel
from med3dvlm.models.projectors import encoder_sizes
from med3dvlm.models.vlm import VisionLanguageModel
from med3dvlm.sharding import ShardedStage, full_weights
from med3dvlm.stages.lean_checkpoint import LeanCheckpoint
from med3dvlm.stages.optim import SchedulerFactory, param_groups

log = logging.getLogger(__name__)


def plain_config(node: Mapping | DictConfig) -> dict[str, Any]:
    """A ``_target_`` node as a plain, resolved dict (what a hand-off records)."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def check_input_size(trained: Iterable[int], data: Iterable[int], source: str | Path, what: str) -> None:
    """A stage goes on from an export only at the volume size it was trained at: another size changes
    the token counts (the projector would not fit) and the statistics the encoder learnt."""
    if list(trained) != list(data):
        raise ValueError(f"{source}: the {what} was trained on {list(trained)} volumes, the data is {list(data)} "
                         f"(D, H, W); set data.spatial_size={list(trained)} with data prepared at that size")


def build_projector(
    projector: Mapping, vision_tower: nn.Module, input_size: Iterable[int], llm_dim: int
) -> tuple[nn.Module, dict[str, Any]]:
    """The projector from its config node with the sizes derived from the encoder and LLM, and that
    completed config (which rebuilds it exactly)."""
    config = plain_config(projector)
    config.pop("_partial_", None)
    config.update(encoder_sizes(vision_tower, tuple(input_size)), llm_dim=llm_dim)
    return instantiate(config), config


def build_vlm(
    vision_tower: nn.Module,
    projector: Mapping,
    llm: LanguageModel,
    input_size: Iterable[int],
    reference_placement: bool = False,
) -> tuple[VisionLanguageModel, dict[str, Any]]:
    """VLM from a loaded vision tower, a projector config node and an LLM source; also returns the
    completed projector config."""
    language_model = llm.load_model()
    tokenizer = llm.load_tokenizer()
    hidden = language_model.get_input_embeddings().weight.shape[1]
    proj, proj_config = build_projector(projector, vision_tower, input_size, hidden)
    model = VisionLanguageModel(vision_tower, proj, language_model, tokenizer,
                                reference_placement=reference_placement)
    return model, proj_config


class VLMStage(LeanCheckpoint, ShardedStage, L.LightningModule):
    """LM loss on image + prompt + answer batches; trains whatever parameters require grad.

    Batches follow the datamodule contract: ``image (B,1,D,H,W)``, ``input_ids``,
    ``attention_mask``, ``labels`` (-100 except answer + EOS).
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
        self.model: VisionLanguageModel
        self.lr_by_prefix: dict[str, float] = {}
        self._step_started = 0.0
        self.frozen_base_source: dict[str, Any] = {}
        self._lean_init()

    # --- Lightning hooks ------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        out = self.model(batch["input_ids"], batch["attention_mask"], images=batch["image"])
        return self.lm_loss(out.logits, batch["labels"])

    def lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token loss averaged over the answer tokens of the global batch.

        Each process divides its token-loss sum by the global token count over the number of
        processes: the gradient that DDP/FSDP average then equals the one-process gradient, and
        the mean over processes of this value is the global mean, however the answer tokens are
        spread over the processes.
        """
        count = (labels[:, 1:] != -100).sum()
        if self._trainer is not None and self.trainer.world_size > 1:
            count = self.trainer.strategy.reduce(count, reduce_op="sum") / self.trainer.world_size
        return ForCausalLMLoss(logits, labels, logits.shape[-1], num_items_in_batch=count)

    def on_fit_start(self) -> None:
        # Hugging Face's from_pretrained returns the LLM in eval mode and Lightning keeps each
        # submodule's mode: without this the LLM (and anything a caller left in eval mode) would
        # train with dropout off. A frozen vision tower stays in eval mode.
        self.train()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("train/padded_length", float(batch["input_ids"].shape[1]), batch_size=size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_started
        self.log("train/samples_per_s", batch["input_ids"].shape[0] / max(seconds, 1e-9))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("test/loss", loss, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(param_groups(self, self.weight_decay, lr_by_prefix=self.lr_by_prefix))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.export_dir is None:
            return
        with full_weights(self):  # every rank (FSDP gathers the shards)
            if self.trainer.is_global_zero:
                folder = self.write_export(self.export_dir)
                log.info("wrote %s export to %s", type(self).__name__, folder)

    # --- subclass API ---------------------------------------------------------------------

    def write_export(self, folder: Path) -> Path:
        """Write this stage's hand-off folder."""
        raise NotImplementedError

    def datamodule_kwargs(self) -> dict[str, Any]:
        """What the datamodule needs from the model: its tokenizer (with ``<im_patch>``) and token count."""
        return {
            "tokenizer": self.model.tokenizer,
            "image_token": self.model.image_token,
            "num_image_tokens": self.model.num_image_tokens,
        }

    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
