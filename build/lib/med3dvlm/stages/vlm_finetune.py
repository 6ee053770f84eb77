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
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

from med3dvlm.exports import load_encoder_export
from med3dvlm.models.components import build_component
from med3dvlm.models.llm import LanguageModel
from med3dvlm.models.lora import add_lora, load_lora, merge_lora
from med3dvlm.models.vlm import VisionLanguageModel, load_state_strict
from med3dvlm.stages.handoff import (
    HANDOFF_FILE,
    load_image_token_row,
    read_handoff,
    resolve_handoff,
    save_tensors,
    write_handoff,
)
from med3dvlm.stages.optim import SchedulerFactory
from med3dvlm.stages.vlm_stage import VLMStage, check_input_size

log = logging.getLogger(__name__)

PRETRAIN_COMMAND = "python -m med3dvlm.train stage=pretrain"


def load_pretrain_handoff(
    folder: str | Path, vision_tower: nn.Module, llm: LanguageModel
) -> tuple[VisionLanguageModel, dict[str, Any]]:
    """Rebuild the stage-2 VLM: vision tower, projector (strict) and ``<im_patch>`` row from ``folder``."""
    folder = Path(folder)
    meta = read_handoff(folder, "projector", PRETRAIN_COMMAND)
    projector = build_component(meta["projector"], folder / HANDOFF_FILE, "projector")
    load_state_strict(projector, folder / "projector.safetensors")
    language_model = llm.load_model()
    hidden = language_model.get_input_embeddings().weight.shape[1]
    if meta["projector"].get("llm_dim", hidden) != hidden:
        raise ValueError(
            f"{folder}: the projector was trained for an LLM width of {meta['projector']['llm_dim']} "
            f"({meta['llm']}), the configured LLM {llm.name_or_path} has {hidden}"
        )
    model = VisionLanguageModel(vision_tower, projector, language_model, llm.load_tokenizer(),
                                image_token=meta["image_token"], reference_placement=meta["reference_placement"])
    with torch.no_grad():
        model.image_token_embedding.copy_(load_image_token_row(folder / "image_token.safetensors", hidden))
    return model, meta


class FinetuneStage(VLMStage):
    """LoRA fine-tuning.

    Args:
        model: the stage-2 VLM (see ``load_pretrain_handoff``).
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
        folder.mkdir(parents=True, exist_ok=True)
        self.model.llm.save_pretrained(folder / "adapter")
        self.model.tokenizer.save_pretrained(folder / "tokenizer")
        save_tensors(folder / "vision_tower.safetensors", self.model.vision_tower.state_dict())
        save_tensors(folder / "projector.safetensors", self.model.projector.state_dict())
        save_tensors(folder / "image_token.safetensors", {"embedding": self.model.image_token_embedding})
        if self.extra_trained:
            save_tensors(folder / "embeddings.safetensors", self.extra_trained_weights())
        meta = {k: v for k, v in self.pretrain_meta.items() if k != "kind"}
        return write_handoff(folder, "adapter", {
            **meta,
            "experiment": self.experiment,
            "pretrain_export": self.pretrain_export,
            "vision_tower": self.vision_tower_config,
            "trained_embeddings": sorted(self.extra_trained),
        })


FINETUNE_COMMAND = "python -m med3dvlm.train stage=finetune"


def load_finetune_handoff(folder: str | Path, dtype: str = "float32") -> tuple[VisionLanguageModel, dict[str, Any]]:
    """Rebuild the stage-3 VLM (LoRA attached, not merged) from its hand-off folder, strictly."""
    folder = Path(folder)
    meta = read_handoff(folder, "adapter", FINETUNE_COMMAND)
    vision_tower = build_component(meta["vision_tower"], folder / HANDOFF_FILE, "vision_tower")
    load_state_strict(vision_tower, folder / "vision_tower.safetensors")
    projector = build_component(meta["projector"], folder / HANDOFF_FILE, "projector")
    load_state_strict(projector, folder / "projector.safetensors")
    source = LanguageModel(meta["llm"], dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    model = VisionLanguageModel(vision_tower, projector, source.load_model(), tokenizer,
                                image_token=meta["image_token"], reference_placement=meta["reference_placement"])
    if meta["trained_embeddings"]:
        tensors = load_file(str(folder / "embeddings.safetensors"))
        targets = {"input_embeddings": model.llm.get_input_embeddings().weight,
                   "lm_head": model.llm.get_output_embeddings().weight}
        with torch.no_grad():
            for name in meta["trained_embeddings"]:
                if tensors[name].shape != targets[name].shape:
                    raise ValueError(f"{folder}/embeddings.safetensors: {name} has shape "
                                     f"{tuple(tensors[name].shape)}, the LLM expects {tuple(targets[name].shape)}")
                targets[name].copy_(tensors[name])
    with torch.no_grad():
        model.image_token_embedding.copy_(load_image_token_row(folder / "image_token.safetensors", model.hidden_size))
    load_lora(model, folder / "adapter")
    return model.eval(), meta


def export_merged(handoff: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Merge a finetune hand-off's adapter and write one reloadable model folder (see ``load_pretrained``)."""
    model, meta = load_finetune_handoff(handoff, dtype)
    merge_lora(model)
    return model.save_pretrained(out, meta["vision_tower"], meta["projector"], meta["input_size"],
                                 extra={"experiment": meta.get("experiment", "default")})


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
    folder = resolve_handoff(pretrain_export, log_dir, "projector", experiment, PRETRAIN_COMMAND)
    meta = read_handoff(folder, "projector", PRETRAIN_COMMAND)
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
