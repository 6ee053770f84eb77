"""Stage 3, ``stage=finetune``: LoRA on the LLM, projector trainable, encoder trainable or frozen.

The encoder, the projector and the ``<im_patch>`` row come strictly from the pretrain hand-off. The
hand-off written here holds the adapter and every other trained tensor; ``python -m med3dvlm.export``
merges it into one model folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from torch import nn

from med3dvlm.artifacts.handoff import (
    ADAPTER_HANDOFF,
    IMAGE_TOKEN_FILE,
    PROJECTOR_FILE,
    PROJECTOR_HANDOFF,
    VISION_TOWER_FILE,
    load_pretrain_handoff,
    write_handoff,
)
from med3dvlm.artifacts.latest import resolve
from med3dvlm.artifacts.record import ArtifactRecord, parent
from med3dvlm.models.lora import add_lora, save_lora
from med3dvlm.stages.vlm import VLMStage, check_input_size

log = logging.getLogger(__name__)


class FinetuneStage(VLMStage):
    """LoRA fine-tuning, built from config nodes (``stage=finetune``'s ``module``).

    Args:
        pretrain_export: the stage-2 hand-off (``None``: the newest ``pretrain`` hand-off of
            ``experiment`` under ``log_dir``), loaded strictly (encoder, projector, ``<im_patch>`` row).
        llm: the base LLM's node (``med3dvlm.models.llm.LanguageModel``; the hand-off's, at the place
            this run has it).
        lora: peft ``LoraConfig`` node (r, alpha, dropout, target modules; ``all-linear`` by default).
        optimizer / scheduler: ``_partial_`` nodes.
        input_size: the data's ``(D, H, W)``; must be the hand-off's.
        train_vision_tower: train the encoder too (the paper does); else frozen in eval mode.
        vision_tower_lr: the encoder's learning rate when trained (``None``: the optimiser's).
        train_input_embeddings / train_lm_head: also train the full input embedding / output head.
    """

    def __init__(
        self,
        pretrain_export: str | None,
        llm: Mapping[str, Any],
        lora: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        input_size: Sequence[int] | None = None,
        experiment: str = "default",
        log_dir: str | None = None,
        export_dir: str | None = None,
        train_vision_tower: bool = True,
        vision_tower_lr: float | None = None,
        train_input_embeddings: bool = False,
        train_lm_head: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(instantiate(optimizer), instantiate(scheduler), weight_decay, export_dir)
        self.pretrain_export = resolve(pretrain_export, PROJECTOR_HANDOFF, experiment, log_dir)
        model, self.pretrain_record = load_pretrain_handoff(self.pretrain_export, instantiate(llm))
        if input_size is not None:
            check_input_size(self.pretrain_record.input_size, input_size, self.pretrain_export, "projector")
        self.model = model
        self.experiment = experiment
        self.frozen_base_source = {
            "pretrain_export": str(self.pretrain_export),
            "llm": self.pretrain_record.llm,
        }
        add_lora(model, instantiate(lora))
        if train_vision_tower:
            model.vision_tower.requires_grad_(True)
            if vision_tower_lr is not None:
                self.lr_by_prefix = {"model.vision_tower.": vision_tower_lr}
        else:
            model.freeze_vision_tower()
        model.projector.requires_grad_(True)
        model.image_token_embedding.requires_grad_(True)
        self.extra_trained = [
            name
            for name, on in (("input_embeddings", train_input_embeddings), ("lm_head", train_lm_head))
            if on
        ]
        for weight in self.extra_trained_weights().values():
            weight.requires_grad_(True)
        log.info("finetune: %d trainable parameters", self.trainable_parameter_count())

    def extra_trained_weights(self) -> dict[str, nn.Parameter]:
        """The fully trained embedding matrices, looked up now (sharding replaces the parameters)."""
        weights = {
            "input_embeddings": lambda: self.model.llm.get_input_embeddings().weight,
            "lm_head": lambda: self.model.llm.get_output_embeddings().weight,
        }
        return {name: weights[name]() for name in self.extra_trained}

    def parent_record(self) -> ArtifactRecord:
        return self.pretrain_record

    def write_export(self, folder: Path) -> Path:
        tensors = {
            VISION_TOWER_FILE: self.model.vision_tower.state_dict(),
            PROJECTOR_FILE: self.model.projector.state_dict(),
            IMAGE_TOKEN_FILE: {"embedding": self.model.image_token_embedding},
        }
        if self.extra_trained:
            tensors["embeddings.safetensors"] = self.extra_trained_weights()

        def adapter_and_tokenizer(staging: Path) -> None:
            save_lora(self.model, staging / "adapter")
            self.model.tokenizer.save_pretrained(staging / "tokenizer")

        preprocessing, prompt_format = self.training_data()
        record = replace(
            self.pretrain_record,
            kind=ADAPTER_HANDOFF.kind,
            experiment=self.experiment,
            preprocessing=preprocessing,
            prompt_format=prompt_format,
            stage="finetune",
            trained_embeddings=tuple(sorted(self.extra_trained)),
            files={},
            extra={},
            parents=(parent("projector", self.pretrain_export),),
            created=time.time(),
        )
        return write_handoff(folder, record, tensors, adapter_and_tokenizer)
