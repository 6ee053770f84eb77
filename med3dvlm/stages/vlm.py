"""What stages 2 (pretrain) and 3 (finetune) share: the LM-loss loop over image + prompt + answer
batches, and the check that a stage goes on only at the volume size its input was trained at.

The LightningModules orchestrate: they build the VLM (``med3dvlm.models.build``) from component
configs and hand-off folders, decide what trains, log, and write their hand-off folder at the end
of training. The model itself lives in ``med3dvlm.models.vlm``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from med3dvlm.artifacts.record import ArtifactRecord
from med3dvlm.data.preprocess import Preprocessing
from med3dvlm.models.vlm import VisionLanguageModel
from med3dvlm.training.stage import TrainingStage

log = logging.getLogger(__name__)


def warn_other_preprocessing(parent: ArtifactRecord, data: Preprocessing) -> None:
    """A stage may go on from an artifact trained on differently prepared data (M3D's encoder
    fine-tuned on windowed CT), but it should be said: the model's record will hold the new data's."""
    if parent.preprocessing.inferred or data.inferred:
        return
    for name, spec in data.sources.items():
        before = parent.preprocessing.sources.get(name) or next(iter(parent.preprocessing.sources.values()))
        changed = before.differences(spec)
        if changed:
            log.warning(
                "the %s was trained on data prepared otherwise than this stage's source %r (%s); the "
                "export records this stage's preprocessing",
                parent.kind.replace("_", " "),
                name,
                "; ".join(changed),
            )


def check_input_size(trained: Iterable[int], data: Iterable[int], source: str | Path, what: str) -> None:
    """A stage goes on from an export only at the volume size it was trained at: another size changes
    the token counts (the projector would not fit) and the statistics the encoder learnt."""
    if list(trained) != list(data):
        raise ValueError(
            f"{source}: the {what} was trained on {list(trained)} volumes, the data is {list(data)} "
            f"(D, H, W); set data.spatial_size={list(trained)} with data prepared at that size"
        )


class VLMStage(TrainingStage):
    """LM loss on image + prompt + answer batches; trains whatever parameters require grad.

    Batches follow the datamodule contract: ``image (B,1,D,H,W)``, ``input_ids``,
    ``attention_mask``, ``labels`` (-100 except answer + EOS).
    """

    model: VisionLanguageModel

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
        warn_other_preprocessing(self.parent_record(), self.training_data()[0])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("train/padded_length", float(batch["input_ids"].shape[1]), batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("test/loss", loss, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    # --- subclass API ---------------------------------------------------------------------

    def parent_record(self) -> ArtifactRecord:
        """The record of the artifact this stage goes on from."""
        raise NotImplementedError

    def datamodule_kwargs(self) -> dict[str, Any]:
        """What the datamodule needs from the model: its tokenizer (with ``<im_patch>``) and token count."""
        return {
            "tokenizer": self.model.tokenizer,
            "image_token": self.model.image_token,
            "num_image_tokens": self.model.num_image_tokens,
        }
