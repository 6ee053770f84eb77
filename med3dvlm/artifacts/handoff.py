"""Hand-off folders of stages 2 and 3: what ``pretrain`` passes to ``finetune`` and what ``finetune``
passes to ``python -m med3dvlm.export``, and the VLM each rebuilds.

A hand-off folder holds safetensors files and ``handoff.json`` (written last, the folder built beside
its place and renamed into it, so a folder with it is complete). ``handoff.json`` records the
component configs (``_target_`` nodes with the derived sizes filled in) so that the next step
rebuilds exactly the trained modules and loads them strictly.

* :data:`PROJECTOR_HANDOFF` (pretrain): ``projector.safetensors``, ``image_token.safetensors``.
* :data:`ADAPTER_HANDOFF` (finetune): ``adapter/`` (peft), ``vision_tower.safetensors``,
  ``projector.safetensors``, ``image_token.safetensors``, optionally ``embeddings.safetensors``
  (input embedding / LM-head weights when those were trained), ``tokenizer/``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

from med3dvlm.artifacts.latest import ArtifactKind
from med3dvlm.artifacts.tensors import load_state_strict, save_tensors
from med3dvlm.models.components import build_component
from med3dvlm.models.llm import LanguageModel
from med3dvlm.models.lora import load_lora
from med3dvlm.models.vlm import VisionLanguageModel
from med3dvlm.utils.atomic import atomic_folder

HANDOFF_FILE = "handoff.json"
PROJECTOR_HANDOFF = ArtifactKind("projector hand-off", HANDOFF_FILE, {"kind": "projector"},
                                 "python -m med3dvlm.train stage=pretrain", "stage.pretrain_export")
ADAPTER_HANDOFF = ArtifactKind("adapter hand-off", HANDOFF_FILE, {"kind": "adapter"},
                               "python -m med3dvlm.train stage=finetune", "source")
IMAGE_TOKEN_FILE = "image_token.safetensors"


def write_handoff(folder: str | os.PathLike, kind: ArtifactKind, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                  meta: Mapping[str, Any], write_files: Callable[[Path], None] | None = None) -> Path:
    """Write (or replace) the hand-off ``folder``: each ``tensors`` entry as a safetensors file of that
    name, ``write_files(staging folder)`` for anything else, then ``handoff.json``."""
    with atomic_folder(folder, HANDOFF_FILE) as staging:
        for name, state in tensors.items():
            save_tensors(staging / name, state)
        if write_files is not None:
            write_files(staging)
        record = {**kind.identity, **meta, "created": time.time()}
        (staging / HANDOFF_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return Path(folder)


def read_handoff(folder: str | os.PathLike, kind: ArtifactKind) -> dict[str, Any]:
    """The metadata of a complete hand-off folder of ``kind``; a clear error otherwise."""
    meta_file = Path(folder) / HANDOFF_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{folder}: no complete {kind.name} here ({HANDOFF_FILE} missing); it is written by `{kind.produced_by}`")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if not kind.matches(meta):
        raise ValueError(f"{meta_file}: a {meta.get('kind')!r} hand-off, expected a {kind.name}")
    return meta


def load_image_token_row(path: str | os.PathLike, hidden_size: int) -> torch.Tensor:
    """The trained ``<im_patch>`` embedding row stored by a stage."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: <im_patch> embedding not found")
    row = load_file(str(path))["embedding"]
    if row.shape != (hidden_size,):
        raise ValueError(f"{path}: <im_patch> row has shape {tuple(row.shape)}, the LLM expects ({hidden_size},)")
    return row


def load_pretrain_handoff(
    folder: str | Path, vision_tower: nn.Module, llm: LanguageModel
) -> tuple[VisionLanguageModel, dict[str, Any]]:
    """Rebuild the stage-2 VLM: vision tower, projector (strict) and ``<im_patch>`` row from ``folder``."""
    folder = Path(folder)
    meta = read_handoff(folder, PROJECTOR_HANDOFF)
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
        model.image_token_embedding.copy_(load_image_token_row(folder / IMAGE_TOKEN_FILE, hidden))
    return model, meta


def load_finetune_handoff(folder: str | Path, dtype: str = "float32") -> tuple[VisionLanguageModel, dict[str, Any]]:
    """Rebuild the stage-3 VLM (LoRA attached, not merged) from its hand-off folder, strictly."""
    folder = Path(folder)
    meta = read_handoff(folder, ADAPTER_HANDOFF)
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
        model.image_token_embedding.copy_(load_image_token_row(folder / IMAGE_TOKEN_FILE, model.hidden_size))
    load_lora(model, folder / "adapter")
    return model.eval(), meta
