"""Stage 3, ``stage=finetune``: LoRA on the LLM, projector trainable, encoder trainable or frozen.

The encoder and projector come strictly from the pretrain hand-off (which names the encoder export
it used); the ``<im_patch>`` row comes from it too. The hand-off written here holds the adapter
and every other trained tensor; ``python -m med3dvlm.export`` merges it into one model folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from peft import LoraConfig
from torch import nn

from med3dvlm.artifacts.encoder_export import load_encoder_export
from med3dvlm.artifacts.handoff import (
    ADAPTER_HANDOFF,
    HANDOFF_FILE,
    IMAGE_TOKEN_FILE,
    PROJECTOR_HANDOFF,
    load_pretrain_handoff,
    read_handoff,
    write_handoff,
)
from med3dvlm.artifacts.latest import resolve
from med3dvlm.models.lora import add_lora
from med3dvlm.models.vlm import VisionLanguageModel
from med3dvlm.stages.vlm import VLMStage, check_input_size
from med3dvlm.training.optim import SchedulerFactory

log = logging.getLogger(__name__)


class FinetuneStage(VLMStage):
    """LoRA fine-tuning.

    Args:
        model: the stage-2 VLM (see :func:`med3dvlm.artifacts.handoff.load_pretrain_handoff`).
        pretrain_meta: the pretrain hand-off metadata (component configs, recorded in this hand-off).
        lora: peft ``LoraConfig`` (r, alpha, dropout, target modules; ``all-linear`` by default).
        train_vision_tower: train the encoder too (the paper does); else frozen in eval mode.
        vision_tower_lr: the encoder's learning rate when trained (``None``: the optimiser's).
        train_input_embeddings / train_lm_head: also train the full input embedding / output head.
    """

    def __init__(
        self,
        model: VisionLanguageModel,
        pretrain_meta: dict[str, Any],
        pretrain_export: str,
        vision_tower_config: dict[str, Any],
        lora: LoraConfig,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: SchedulerFactory,
        train_vision_tower: bool = True,
        vision_tower_lr: float | None = None,
        train_input_embeddings: bool = False,
        train_lm_head: bool = False,
        weight_decay: float = 0.0,
        experiment: str = "default",
        export_dir: str | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, weight_decay, export_dir)
        self.model = model
        self.pretrain_meta = pretrain_meta
        self.pretrain_export = str(pretrain_export)
        self.vision_tower_config = vision_tower_config
        self.experiment = experiment
        self.frozen_base_source = {"pretrain_export": self.pretrain_export, "llm": pretrain_meta.get("llm")}
        add_lora(model, lora)
        if train_vision_tower:
            model.vision_tower.requires_grad_(True)
            if vision_tower_lr is not None:
                self.lr_by_prefix = {"model.vision_tower.": vision_tower_lr}
        else:
            model.freeze_vision_tower()
        model.projector.requires_grad_(True)
        model.image_token_embedding.requires_grad_(True)
        self.extra_trained = [name for name, on in (("input_embeddings", train_input_embeddings),
                                                    ("lm_head", train_lm_head)) if on]
        for weight in self.extra_trained_weights().values():
            weight.requires_grad_(True)
        log.info("finetune: %d trainable parameters", self.trainable_parameter_count())

    def extra_trained_weights(self) -> dict[str, nn.Parameter]:
        """The fully trained embedding matrices, looked up now (sharding replaces the parameters)."""
        weights = {"input_embeddings": lambda: self.model.llm.get_input_embeddings().weight,
                   "lm_head": lambda: self.model.llm.get_output_embeddings().weight}
        return {name: weights[name]() for name in self.extra_trained}

    def write_export(self, folder: Path) -> Path:
        tensors = {"vision_tower.safetensors": self.model.vision_tower.state_dict(),
                   "projector.safetensors": self.model.projector.state_dict(),
                   IMAGE_TOKEN_FILE: {"embedding": self.model.image_token_embedding}}
        if self.extra_trained:
            tensors["embeddings.safetensors"] = self.extra_trained_weights()

        def adapter_and_tokenizer(staging: Path) -> None:
            self.model.llm.save_pretrained(staging / "adapter")
            self.model.tokenizer.save_pretrained(staging / "tokenizer")

        meta = {k: v for k, v in self.pretrain_meta.items() if k not in ("kind", "created")}
        return write_handoff(folder, ADAPTER_HANDOFF, tensors, {
            **meta,
            "experiment": self.experiment,
            "pretrain_export": self.pretrain_export,
            "vision_tower": self.vision_tower_config,
            "trained_embeddings": sorted(self.extra_trained),
        }, adapter_and_tokenizer)


def finetune_stage(
    pretrain_export: str | None,
    experiment: str,
    log_dir: str,
    llm: Mapping,
    lora: Mapping,
    optimizer: Mapping,
    scheduler: Mapping,
    export_dir: str,
    train_vision_tower: bool = True,
    vision_tower_lr: float | None = None,
    train_input_embeddings: bool = False,
    train_lm_head: bool = False,
    weight_decay: float = 0.0,
    input_size: Sequence[int] | None = None,
) -> FinetuneStage:
    """Hydra entry: resolve the pretrain hand-off (explicit path, else the latest of ``experiment``),
    check it was trained at the data's ``input_size``, load encoder, projector and ``<im_patch>``
    row strictly, then build the stage."""
    folder = resolve(pretrain_export, PROJECTOR_HANDOFF, experiment, log_dir)
    meta = read_handoff(folder, PROJECTOR_HANDOFF)
    if input_size is not None:
        check_input_size(meta["input_size"], input_size, folder / HANDOFF_FILE, "projector")
    vision_tower, vision_tower_config = load_encoder_export(meta["encoder_export"])
    model, meta = load_pretrain_handoff(folder, vision_tower, instantiate(llm))
    return FinetuneStage(
        model, meta, str(folder), vision_tower_config, instantiate(lora), instantiate(optimizer),
        instantiate(scheduler), train_vision_tower=train_vision_tower, vision_tower_lr=vision_tower_lr,
        train_input_embeddings=train_input_embeddings, train_lm_head=train_lm_head, weight_decay=weight_decay,
        experiment=experiment, export_dir=export_dir,
    )
