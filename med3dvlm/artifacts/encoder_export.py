"""Stage exports: the trained encoder handed from one stage to the next.

An export is a folder holding ``encoder.safetensors`` and its record (``record.json``,
:mod:`med3dvlm.artifacts.record`: the encoder's ``_target_`` config, the input size and
preprocessing it was trained with, the stage, the experiment, which weights: ``final`` = end of
training, ``best`` = best checkpoint by the monitored metric). Later stages take an explicit path or
find the newest one (``med3dvlm.artifacts.latest`` with :data:`SIGLIP_EXPORT`), and rebuild the
encoder with ``load_encoder_export`` (strict).

The SigLIP stage's export also holds the rest of the model, as the importer of the released
weights writes it beside its ``encoder/`` export (``med3dvlm.artifacts.released``):
``text_encoder/`` (the text encoder and its tokenizer as a Hugging Face folder) and
``siglip_heads.safetensors`` (both projection heads, the loss's scale and bias, under the stage's
attribute names). ``load_siglip_export`` rebuilds both towers from either folder (retrieval).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from med3dvlm.artifacts.latest import IMPORTED_ENCODER_DIR, ArtifactKind
from med3dvlm.artifacts.record import ArtifactRecord, read_record, record_file, write_artifact
from med3dvlm.artifacts.tensors import load_state_strict, save_tensors
from med3dvlm.models.components import build_component
from med3dvlm.models.towers import ImageTower, TextTower

WEIGHTS_FILE = "encoder.safetensors"
WHICH = ("final", "best")
TEXT_ENCODER_DIR = "text_encoder"
HEADS_FILE = "siglip_heads.safetensors"
# The original's text pooling (first token): the pooling of an export that does not record one.
DEFAULT_TEXT_POOLING = "first"
SIGLIP_EXPORT = ArtifactKind(
    "siglip export",
    "encoder_export",
    "python -m med3dvlm.train stage=siglip",
    "python -m med3dvlm.train stage=pretrain",
    "stage.module.encoder_export",
    {"stage": "siglip", "which": "final"},
)
"""Stage 1's export at the end of training (what stage 2 reads)."""
SIGLIP_BEST_EXPORT = ArtifactKind(
    "best siglip export",
    "encoder_export",
    "python -m med3dvlm.train stage=siglip",
    "python -m med3dvlm.train stage=pretrain",
    "stage.module.encoder_export",
    {"stage": "siglip", "which": "best"},
)
"""Stage 1's export of its best validation."""


def write_encoder_export(
    folder: str | os.PathLike,
    encoder: nn.Module,
    record: ArtifactRecord,
    write_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write (or replace) the export ``folder``: the weights, ``write_files(staging_folder)`` (the
    SigLIP towers), then the record."""
    if record.kind != "encoder_export" or record.which not in WHICH:
        raise ValueError(f"an encoder export's record has kind encoder_export and which in {WHICH}")
    if "_target_" not in record.components.get("encoder", {}):
        raise ValueError(
            "the record's components.encoder must be a `_target_` node that rebuilds the encoder"
        )

    def files(staging: Path) -> None:
        save_tensors(staging / WEIGHTS_FILE, encoder.state_dict())
        if write_files is not None:
            write_files(staging)

    return write_artifact(folder, record, files)


def _folder(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent if path.is_file() else path


def load_encoder_export(path: str | os.PathLike) -> tuple[nn.Module, ArtifactRecord]:
    """Rebuild the exported encoder and load its weights strictly; returns it with the export's record.

    Missing files, missing/unexpected keys and shape mismatches are errors naming the file.
    """
    folder = _folder(path)
    record = read_record(folder, "encoder_export")
    encoder = build_component(record.components["encoder"], record_file(folder), "encoder")
    load_state_strict(encoder, folder / WEIGHTS_FILE)
    return encoder, record


def siglip_files(
    text_encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, heads: Mapping[str, Tensor]
) -> Callable[[Path], None]:
    """``write_files`` for :func:`write_encoder_export`: the text encoder with its tokenizer and the
    heads (``image_tower.mm_vision_proj.*``, ``text_tower.mm_language_proj.*``, ``loss.*``)."""

    def write(folder: Path) -> None:
        text_encoder.save_pretrained(folder / TEXT_ENCODER_DIR)
        tokenizer.save_pretrained(folder / TEXT_ENCODER_DIR)
        save_tensors(folder / HEADS_FILE, heads)

    return write


@dataclass
class SigLIPTowers:
    """Both towers of a SigLIP export (eval mode) and what retrieval needs around them."""

    image_tower: ImageTower
    text_tower: TextTower
    tokenizer: PreTrainedTokenizerBase
    log_scale: float
    bias: float
    record: ArtifactRecord


def siglip_layout(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(encoder export folder, folder of text_encoder/ and the heads)`` of a SigLIP stage export
    (one folder) or of the importer's SigLIP folder (``encoder/`` inside it)."""
    path = _folder(path)
    encoder = path if record_file(path) is not None else path / IMPORTED_ENCODER_DIR
    read_record(encoder, "encoder_export", quiet=True)
    for needed in (path / TEXT_ENCODER_DIR, path / HEADS_FILE):
        if not needed.exists():
            raise FileNotFoundError(
                f"{needed}: not found; retrieval needs both towers: a stage-1 export written by this version "
                "(`python -m med3dvlm.train stage=siglip`, <run folder>/export) or the folder "
                "`python -m med3dvlm.import_weights` writes for the released DCFormer_SigLIP"
            )
    return encoder, path


def _check_text_weights(folder: Path, module: nn.Module) -> None:
    """Every tensor of ``module`` must be in the folder's ``model.safetensors`` with its shape
    (Hugging Face would initialise a missing one at random without failing)."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the text encoder's weights are missing")
    with safe_open(str(weights), framework="pt") as fh:
        names = fh.keys()
        shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in names}
    for key, tensor in module.state_dict().items():
        if shapes.get(key) != tuple(tensor.shape):
            problem = (
                "missing"
                if key not in shapes
                else f"shape {list(shapes[key])}, expected {list(tensor.shape)}"
            )
            raise ValueError(f"{weights}: key {key!r} {problem}")


def load_siglip_export(path: str | os.PathLike) -> SigLIPTowers:
    """Rebuild the image tower (encoder + head) and the text tower (encoder + head) of a SigLIP
    export or imported folder, strictly; see :func:`siglip_layout`."""
    encoder_folder, folder = siglip_layout(path)
    encoder, record = load_encoder_export(encoder_folder)
    heads = load_file(str(folder / HEADS_FILE))
    expected = {
        "image_tower.mm_vision_proj.weight",
        "image_tower.mm_vision_proj.bias",
        "text_tower.mm_language_proj.weight",
        "text_tower.mm_language_proj.bias",
        "loss.log_scale",
        "loss.bias",
    }
    if set(heads) != expected:
        raise ValueError(f"{folder / HEADS_FILE}: keys {sorted(heads)}, expected {sorted(expected)}")
    embed_dim = int(heads["image_tower.mm_vision_proj.weight"].shape[0])
    pooling = record.text_pooling or DEFAULT_TEXT_POOLING
    image_tower = ImageTower(encoder, embed_dim)
    # Hugging Face would report the BERT pooler, which TextTower drops, as missing and newly
    # initialised; the strict check below is the one that counts.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        text_tower = TextTower(str(folder / TEXT_ENCODER_DIR), embed_dim, pooling=pooling)
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_text_weights(folder / TEXT_ENCODER_DIR, text_tower.language_encoder)
    for tower, prefix in ((image_tower, "image_tower."), (text_tower, "text_tower.")):
        params = dict(tower.named_parameters())
        for key, value in heads.items():
            if not key.startswith(prefix):
                continue
            target = params.get(key[len(prefix) :])
            if target is None or target.shape != value.shape:
                raise ValueError(
                    f"{folder / HEADS_FILE}: {key} of shape {list(value.shape)} does not fit the "
                    f"towers built from {encoder_folder} and {folder / TEXT_ENCODER_DIR}"
                )
            with torch.no_grad():
                target.copy_(value)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / TEXT_ENCODER_DIR))
    return SigLIPTowers(
        image_tower.eval(),
        text_tower.eval(),
        tokenizer,
        float(heads["loss.log_scale"]),
        float(heads["loss.bias"]),
        record,
    )
