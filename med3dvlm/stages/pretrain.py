"""Stage 2, ``stage=pretrain``: train the projector and the ``<im_patch>`` row, everything else frozen.

The stage-1 encoder export is loaded strictly; the encoder runs in eval mode (BatchNorm running
statistics frozen) and the LLM is frozen. The hand-off holds the projector and the row.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from med3dvlm.artifacts.encoder_export import EXPORT_FILE, SIGLIP_EXPORT, load_encoder_export, read_export
from med3dvlm.artifacts.handoff import IMAGE_TOKEN_FILE, PROJECTOR_HANDOFF, write_handoff
from med3dvlm.artifacts.latest import resolve
from med3dvlm.models.build import build_vlm
from med3dvlm.models.llm import LanguageModel
from med3dvlm.stages.vlm import VLMStage, check_input_size
from med3dvlm.training.optim import SchedulerFactory

log = logging.getLogger(__name__)


class PretrainStage(VLMStage):
    """Projector pre-training.

    Args:
        vision_tower: the stage-1 encoder, loaded (strictly) from its export.
        vision_tower_config: its ``_target_`` config (recorded in the hand-off).
        encoder_export: where it came from (recorded in the hand-off).
        projector: projector config node (``_target_`` with derived sizes left open).
        llm: the causal LM source.
        input_size: volume size ``(D, H, W)``; fixes the encoder's token counts.
        optimizer: ``_partial_`` optimiser taking parameter groups.
        scheduler: ``_partial_`` schedule taking ``(optimizer, total_steps)``.
        reference_placement: the original's image-token placement (only to continue released weights).
        cache_encoder_features: keep each volume's encoder outputs after the first epoch (keyed by a
            hash of the volume), valid because the encoder is frozen in eval mode. Only with
            augmentation off (each augmented volume is new, so the cache would only grow); it holds
            every stage output of every volume in memory, so it suits small inputs.
    """

    def __init__(
        self,
        vision_tower: nn.Module,
        vision_tower_config: dict,
        encoder_export: str,
        projector: Mapping,
        llm: LanguageModel,
        input_size: tuple[int, int, int],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: SchedulerFactory,
        weight_decay: float = 0.0,
        reference_placement: bool = False,
        experiment: str = "default",
        export_dir: str | None = None,
        cache_encoder_features: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, weight_decay, export_dir)
        self.model, self.projector_config = build_vlm(vision_tower, projector, llm, input_size,
                                                      reference_placement)
        self.vision_tower_config = vision_tower_config
        self.encoder_export = str(encoder_export)
        self.experiment = experiment
        self.llm_source = llm
        self.input_size = list(input_size)
        self.model.freeze_vision_tower()
        self.model.llm.requires_grad_(False)
        self.model.projector.requires_grad_(True)
        self.model.image_token_embedding.requires_grad_(True)
        self.frozen_base_source = {"encoder_export": self.encoder_export, "llm": llm.name_or_path}
        self.cache_encoder_features = cache_encoder_features
        self.feature_cache: dict[str, list[torch.Tensor]] = {}
        log.info("pretrain: %d trainable parameters (projector + <im_patch> row)", self.trainable_parameter_count())

    def encoder_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Encoder outputs for ``images``, computed once per distinct volume when caching."""
        keys = [hashlib.sha1(img.detach().cpu().numpy().tobytes()).hexdigest() for img in images]
        missing = [i for i, key in enumerate(keys) if key not in self.feature_cache]
        if missing:
            with torch.no_grad():
                outputs = self.model.encode_images(images[missing])
            for row, i in enumerate(missing):
                self.feature_cache[keys[i]] = [out[row].detach() for out in outputs]
        return [torch.stack(stage) for stage in zip(*(self.feature_cache[k] for k in keys))]

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        if not self.cache_encoder_features:
            return super().forward(batch)
        out = self.model(batch["input_ids"], batch["attention_mask"],
                         encoder_outputs=self.encoder_outputs(batch["image"]))
        return self.lm_loss(out.logits, batch["labels"])

    def write_export(self, folder: Path) -> Path:
        tensors = {"projector.safetensors": self.model.projector.state_dict(),
                   IMAGE_TOKEN_FILE: {"embedding": self.model.image_token_embedding}}
        return write_handoff(folder, PROJECTOR_HANDOFF, tensors, {
            "experiment": self.experiment,
            "encoder_export": self.encoder_export,
            "vision_tower": self.vision_tower_config,
            "projector": self.projector_config,
            "llm": self.llm_source.name_or_path,
            "input_size": self.input_size,
            "image_token": self.model.image_token,
            "num_image_tokens": self.model.num_image_tokens,
            "reference_placement": self.model.reference_placement,
        })


def pretrain_stage(
    encoder_export: str | None,
    experiment: str,
    projector: Mapping,
    llm: Mapping,
    input_size: tuple[int, int, int],
    optimizer: Mapping,
    scheduler: Mapping,
    export_dir: str,
    log_dir: str | None = None,
    weight_decay: float = 0.0,
    reference_placement: bool = False,
    cache_encoder_features: bool = False,
) -> PretrainStage:
    """Hydra entry: resolve and strictly load the stage-1 encoder export (explicit path, else the latest
    completed ``siglip`` export of ``experiment``), then build the stage from the config nodes."""
    path = resolve(encoder_export, SIGLIP_EXPORT, experiment, log_dir)
    check_input_size(read_export(path)["input_size"], input_size, path / EXPORT_FILE, "encoder")
    vision_tower, vision_tower_config = load_encoder_export(path)
    return PretrainStage(
        vision_tower, vision_tower_config, str(path), projector, instantiate(llm), input_size,
        instantiate(optimizer), instantiate(scheduler), weight_decay=weight_decay,
        reference_placement=reference_placement, experiment=experiment, export_dir=export_dir,
        cache_encoder_features=cache_encoder_features,
    )
