"""Hand-off folders of stages 2 and 3: what ``pretrain`` passes to ``finetune`` and what ``finetune``
passes to ``python -m med3dvlm.export``, and the VLM each rebuilds.

A hand-off folder holds safetensors files and its record (``record.json``,
:mod:`med3dvlm.artifacts.record`) with the component configs (``_target_`` nodes with the derived
sizes filled in), so the next step rebuilds exactly the trained modules and loads them strictly.
Each is self-contained: it holds every trained tensor the next step needs, and names only its base
LLM (``llm``, a Hugging Face name or folder; ``llm=`` of the loaders takes another place).

* :data:`PROJECTOR_HANDOFF` (pretrain): ``vision_tower.safetensors`` (the frozen stage-1 encoder),
  ``projector.safetensors``, ``image_token.safetensors``.
* :data:`ADAPTER_HANDOFF` (finetune): ``adapter/`` (peft), ``vision_tower.safetensors``,
  ``projector.safetensors``, ``image_token.safetensors``, optionally ``embeddings.safetensors``
  (input embedding / LM-head weights when those were trained), ``tokenizer/``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

from med3dvlm.artifacts.latest import ArtifactKind
from med3dvlm.artifacts.record import ArtifactRecord, read_record, record_file, write_artifact
from med3dvlm.artifacts.tensors import load_state_strict, save_tensors
from med3dvlm.models.components import build_component
from med3dvlm.models.llm import LanguageModel
from med3dvlm.models.lora import load_lora
from med3dvlm.models.vlm import VisionLanguageModel

PROJECTOR_HANDOFF = ArtifactKind(
    "projector hand-off",
    "projector_handoff",
    "python -m med3dvlm.train stage=pretrain",
    "python -m med3dvlm.train stage=finetune",
    "stage.module.pretrain_export",
)
ADAPTER_HANDOFF = ArtifactKind(
    "adapter hand-off",
    "adapter_handoff",
    "python -m med3dvlm.train stage=finetune",
    "python -m med3dvlm.export",
    "source",
)
IMAGE_TOKEN_FILE = "image_token.safetensors"
VISION_TOWER_FILE = "vision_tower.safetensors"
PROJECTOR_FILE = "projector.safetensors"


def write_handoff(
    folder: str | os.PathLike,
    record: ArtifactRecord,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    write_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write (or replace) the hand-off ``folder``: each ``tensors`` entry as a safetensors file of that
    name, ``write_files(staging folder)`` for anything else, then the record."""

    def files(staging: Path) -> None:
        for name, state in tensors.items():
            save_tensors(staging / name, state)
        if write_files is not None:
            write_files(staging)

    return write_artifact(folder, record, files)


def load_image_token_row(path: str | os.PathLike, hidden_size: int) -> torch.Tensor:
    """The trained ``<im_patch>`` embedding row stored by a stage."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: <im_patch> embedding not found")
    row = load_file(str(path))["embedding"]
    if row.shape != (hidden_size,):
        raise ValueError(
            f"{path}: <im_patch> row has shape {tuple(row.shape)}, the LLM expects ({hidden_size},)"
        )
    return row


def _vision_tower(
    folder: Path, record: ArtifactRecord, encoder_export: str | os.PathLike | None = None
) -> nn.Module:
    """The hand-off's vision tower. A projector hand-off of an older version holds none: it names the
    encoder export it was trained on, found where it names it or at ``encoder_export``."""
    tower = build_component(record.components["vision_tower"], record_file(folder), "vision_tower")
    weights = folder / VISION_TOWER_FILE
    if not weights.is_file() and record.kind == "projector_handoff":
        named = record.parent("encoder").path if record.parent("encoder") else "?"
        candidates = [Path(encoder_export)] if encoder_export else [Path(named), folder / named]
        found = [c / "encoder.safetensors" for c in candidates if (c / "encoder.safetensors").is_file()]
        if not found:
            raise FileNotFoundError(
                f"{folder}: a hand-off of an older version, which holds no encoder; the encoder "
                f"export it names ({named}) is not there (a path relative to where stage 2 ran): run "
                "from that folder, give load_pretrain_handoff its place (encoder_export argument), "
                "or run stage 2 again"
            )
        weights = found[0]
    load_state_strict(tower, weights)
    return tower


def _llm(record: ArtifactRecord, llm: LanguageModel | None, dtype: str) -> LanguageModel:
    if llm is not None:
        return llm
    if not record.llm:
        raise ValueError("the hand-off records no base LLM; give the loader one (its llm argument)")
    return LanguageModel(record.llm, dtype=dtype)


def load_pretrain_handoff(
    folder: str | Path,
    llm: LanguageModel | None = None,
    encoder_export: str | os.PathLike | None = None,
) -> tuple[VisionLanguageModel, ArtifactRecord]:
    """Rebuild the stage-2 VLM: vision tower, projector (strict) and ``<im_patch>`` row from ``folder``,
    on its base LLM (``llm`` for another source of the same model; ``encoder_export`` for the moved
    encoder of an older version's hand-off)."""
    folder = Path(folder)
    record = read_record(folder, "projector_handoff")
    projector = build_component(record.components["projector"], record_file(folder), "projector")
    load_state_strict(projector, folder / PROJECTOR_FILE)
    source = _llm(record, llm, "float32")
    language_model = source.load_model()
    hidden = language_model.get_input_embeddings().weight.shape[1]
    if record.components["projector"].get("llm_dim", hidden) != hidden:
        raise ValueError(
            f"{folder}: the projector was trained for an LLM width of {record.components['projector']['llm_dim']} "
            f"({record.llm}), the configured LLM {source.name_or_path} has {hidden}"
        )
    model = VisionLanguageModel(
        _vision_tower(folder, record, encoder_export),
        projector,
        language_model,
        source.load_tokenizer(),
        image_token=record.image_token,
        reference_placement=record.reference_placement,
    )
    with torch.no_grad():
        model.image_token_embedding.copy_(load_image_token_row(folder / IMAGE_TOKEN_FILE, hidden))
    return model, record


def load_finetune_handoff(
    folder: str | Path,
    dtype: str = "float32",
    llm: LanguageModel | None = None,
) -> tuple[VisionLanguageModel, ArtifactRecord]:
    """Rebuild the stage-3 VLM (LoRA attached, not merged) from its hand-off folder, strictly, on its
    base LLM (``llm`` for another source of the same model)."""
    folder = Path(folder)
    record = read_record(folder, "adapter_handoff")
    projector = build_component(record.components["projector"], record_file(folder), "projector")
    load_state_strict(projector, folder / PROJECTOR_FILE)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    model = VisionLanguageModel(
        _vision_tower(folder, record),
        projector,
        _llm(record, llm, dtype).load_model(),
        tokenizer,
        image_token=record.image_token,
        reference_placement=record.reference_placement,
    )
    if record.trained_embeddings:
        tensors = load_file(str(folder / "embeddings.safetensors"))
        targets = {
            "input_embeddings": model.llm.get_input_embeddings().weight,
            "lm_head": model.llm.get_output_embeddings().weight,
        }
        with torch.no_grad():
            for name in record.trained_embeddings:
                if tensors[name].shape != targets[name].shape:
                    raise ValueError(
                        f"{folder}/embeddings.safetensors: {name} has shape "
                        f"{tuple(tensors[name].shape)}, the LLM expects {tuple(targets[name].shape)}"
                    )
                targets[name].copy_(tensors[name])
    with torch.no_grad():
        model.image_token_embedding.copy_(load_image_token_row(folder / IMAGE_TOKEN_FILE, model.hidden_size))
    load_lora(model, folder / "adapter")
    return model.eval(), record
