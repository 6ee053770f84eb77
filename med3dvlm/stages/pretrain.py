"""Stage 2, ``stage=pretrain``: train the projector and the ``<im_patch>`` row, everything else frozen.

The stage-1 encoder export is loaded strictly; the encoder runs in eval mode (BatchNorm running
statistics frozen) and the LLM is frozen. The hand-off holds the encoder (so stage 3 needs no other
folder), the projector and the row.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from med3dvlm.artifacts.encoder_export import SIGLIP_EXPORT, load_encoder_export
from med3dvlm.artifacts.handoff import IMAGE_TOKEN_FILE, PROJECTOR_FILE, VISION_TOWER_FILE, write_handoff
from med3dvlm.artifacts.latest import resolve
from med3dvlm.artifacts.record import ArtifactRecord, parent
from med3dvlm.models.build import build_vlm
from med3dvlm.stages.vlm import VLMStage, check_input_size

log = logging.getLogger(__name__)


class PretrainStage(VLMStage):
    """Projector pre-training, built from config nodes (``stage=pretrain``'s ``module``).

    Args:
        encoder_export: the stage-1 export (``None``: the newest ``siglip`` export of ``experiment``
            under ``log_dir``); loaded strictly, trained at ``input_size``.
        projector: projector config node (``_target_`` with derived sizes left open).
        llm: the causal LM's node (``med3dvlm.models.llm.LanguageModel``).
        input_size: volume size ``(D, H, W)`` of the data; must be the export's.
        optimizer / scheduler: ``_partial_`` nodes (parameter groups; ``(optimizer, total_steps)``).
        reference_placement: the original's image-token placement (only to continue released weights).
        cache_encoder_features: keep each volume's encoder outputs after the first epoch (keyed by a
            hash of the volume), valid because the encoder is frozen in eval mode. Only with
            augmentation off (each augmented volume is new, so the cache would only grow); it holds
            every stage output of every volume in memory, so it suits small inputs.
    """

    def __init__(
        self,
        encoder_export: str | None,
        projector: Mapping[str, Any],
        llm: Mapping[str, Any],
        input_size: Sequence[int],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        experiment: str = "default",
        log_dir: str | None = None,
        export_dir: str | None = None,
        weight_decay: float = 0.0,
        reference_placement: bool = False,
        cache_encoder_features: bool = False,
    ) -> None:
        super().__init__(instantiate(optimizer), instantiate(scheduler), weight_decay, export_dir)
        self.encoder_export = resolve(encoder_export, SIGLIP_EXPORT, experiment, log_dir)
        vision_tower, self.encoder_record = load_encoder_export(self.encoder_export)
        check_input_size(self.encoder_record.input_size, input_size, self.encoder_export, "encoder")
        self.llm_source = instantiate(llm)
        self.model, self.projector_config = build_vlm(
            vision_tower, projector, self.llm_source, input_size, reference_placement
        )
        self.experiment = experiment
        self.input_size = [int(n) for n in input_size]
        self.model.freeze_vision_tower()
        self.model.llm.requires_grad_(False)
        self.model.projector.requires_grad_(True)
        self.model.image_token_embedding.requires_grad_(True)
        self.frozen_base_source = {
            "encoder_export": str(self.encoder_export),
            "llm": self.llm_source.name_or_path,
        }
        self.cache_encoder_features = cache_encoder_features
        self.feature_cache: dict[str, list[torch.Tensor]] = {}
        log.info(
            "pretrain: %d trainable parameters (projector + <im_patch> row)", self.trainable_parameter_count()
        )

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
        out = self.model(
            batch["input_ids"], batch["attention_mask"], encoder_outputs=self.encoder_outputs(batch["image"])
        )
        return self.lm_loss(out.logits, batch["labels"])

    def parent_record(self) -> ArtifactRecord:
        return self.encoder_record

    def write_export(self, folder: Path) -> Path:
        tensors = {
            VISION_TOWER_FILE: self.model.vision_tower.state_dict(),
            PROJECTOR_FILE: self.model.projector.state_dict(),
            IMAGE_TOKEN_FILE: {"embedding": self.model.image_token_embedding},
        }
        preprocessing, prompt_format = self.training_data()
        record = ArtifactRecord(
            "projector_handoff",
            self.experiment,
            self.input_size,
            preprocessing,
            {"vision_tower": self.encoder_record.components["encoder"], "projector": self.projector_config},
            prompt_format=prompt_format,
            image_token=self.model.image_token,
            num_image_tokens=self.model.num_image_tokens,
            reference_placement=self.model.reference_placement,
            llm=self.llm_source.name_or_path,
            stage="pretrain",
            parents=(parent("encoder", self.encoder_export),),
        )
        return write_handoff(folder, record, tensors)
