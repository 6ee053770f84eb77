"""Stage exports: the trained encoder handed from one stage to the next.

An export is a folder holding ``encoder.safetensors`` and ``export.json`` (the encoder's
``_target_`` config, the input size it was trained at, the stage, the experiment, which weights:
``final`` = end of training, ``best`` = best checkpoint by the monitored metric). The folder is
built beside its destination and renamed into place, so a folder with ``export.json`` is always
complete and consistent. Later stages take an explicit path or find the newest one
(``med3dvlm.artifacts.latest`` with :data:`SIGLIP_EXPORT`), and rebuild the encoder with
``load_encoder_export`` (strict).

The SigLIP stage's export also holds the rest of the model, as the importer of the released
weights writes it beside its ``encoder/`` export (``med3dvlm.artifacts.released``):
``text_encoder/`` (the text encoder and its tokenizer as a Hugging Face folder) and
``siglip_heads.safetensors`` (both projection heads, the loss's scale and bias, under the stage's
attribute names). ``load_siglip_export`` rebuilds both towers from either folder (retrieval).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from med3dvlm.artifacts.latest import ArtifactKind
from med3dvlm.artifacts.tensors import load_state_strict, save_tensors
from med3dvlm.models.components import build_component
from med3dvlm.models.towers import ImageTower, TextTower
from med3dvlm.utils.atomic import atomic_folder

EXPORT_FILE = "export.json"
WEIGHTS_FILE = "encoder.safetensors"
FORMAT = "med3dvlm-encoder-export/1"
WHICH = ("final", "best")
TEXT_ENCODER_DIR = "text_encoder"
HEADS_FILE = "siglip_heads.safetensors"
IMPORTED_ENCODER_DIR = "encoder"
# The original's text pooling (first token): the pooling of an export that does not record one.
DEFAULT_TEXT_POOLING = "first"
SIGLIP_EXPORT = ArtifactKind("siglip export", EXPORT_FILE, {"format": FORMAT, "stage": "siglip", "which": "final"},
                             "python -m med3dvlm.train stage=siglip", "stage.encoder_export")
"""Stage 1's export at the end of training (what stage 2 reads)."""
SIGLIP_BEST_EXPORT = ArtifactKind("best siglip export", EXPORT_FILE,
                                  {"format": FORMAT, "stage": "siglip", "which": "best"},
                                  "python -m med3dvlm.train stage=siglip", "stage.encoder_export")
"""Stage 1's export of its best validation."""


def write_encoder_export(
    folder: str | os.PathLike,
    encoder: nn.Module,
    encoder_config: Mapping[str, Any],
    input_size: Sequence[int],
    stage: str,
    experiment: str,
    which: str = "final",
    extra: Mapping[str, Any] | None = None,
    write_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write (or replace) the export ``folder``: weights first, ``export.json`` last, then rename.

    ``write_files(staging_folder)`` adds further files (the SigLIP towers) before ``export.json``.
    """
    if which not in WHICH:
        raise ValueError(f"export kind {which!r} unknown; one of {WHICH}")
    if "_target_" not in encoder_config:
        raise ValueError("encoder_config must be a `_target_` node that rebuilds the encoder")
    with atomic_folder(folder, EXPORT_FILE) as staging:
        save_tensors(staging / WEIGHTS_FILE, encoder.state_dict())
        if write_files is not None:
            write_files(staging)
        meta = {
            "format": FORMAT,
            "stage": stage,
            "experiment": experiment,
            "which": which,
            "encoder": dict(encoder_config),
            "input_size": [int(n) for n in input_size],
            "created": time.time(),
            **(extra or {}),
        }
        (staging / EXPORT_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(folder)


def _folder(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent if path.name in (EXPORT_FILE, WEIGHTS_FILE) else path


def read_export(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an export folder (or of the folder holding the given export file)."""
    meta_file = _folder(path) / EXPORT_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{meta_file}: no complete encoder export here; it is written by "
            "`python -m med3dvlm.train stage=siglip` into <run folder>/export/"
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_file}: not valid JSON ({error})") from error
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: not an encoder export (format={meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def load_encoder_export(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the exported encoder and load its weights strictly; returns it with its config.

    Missing files, missing/unexpected keys and shape mismatches are errors naming the file.
    """
    meta = read_export(path)
    encoder = build_component(meta["encoder"], _folder(path) / EXPORT_FILE, "encoder")
    load_state_strict(encoder, _folder(path) / WEIGHTS_FILE)
    return encoder, meta["encoder"]


def siglip_files(text_encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 heads: Mapping[str, Tensor]) -> Callable[[Path], None]:
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
    input_size: tuple[int, int, int]
    log_scale: float
    bias: float
    meta: dict[str, Any]


def siglip_layout(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(encoder export folder, folder of text_encoder/ and the heads)`` of a SigLIP stage export
    (one folder) or of the importer's SigLIP folder (``encoder/`` inside it)."""
    path = _folder(path)
    encoder = path if (path / EXPORT_FILE).is_file() else path / IMPORTED_ENCODER_DIR
    read_export(encoder)
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
            problem = "missing" if key not in shapes else f"shape {list(shapes[key])}, expected {list(tensor.shape)}"
            raise ValueError(f"{weights}: key {key!r} {problem}")


def load_siglip_export(path: str | os.PathLike) -> SigLIPTowers:
    """Rebuild the image tower (encoder + head) and the text tower (encoder + head) of a SigLIP
    export or imported folder, strictly; see :func:`siglip_layout`."""
    encoder_folder, folder = siglip_layout(path)
    encoder, _ = load_encoder_export(encoder_folder)
    meta = read_export(encoder_folder)
    heads = load_file(str(folder / HEADS_FILE))
    expected = {"image_tower.mm_vision_proj.weight", "image_tower.mm_vision_proj.bias",
                "text_tower.mm_language_proj.weight", "text_tower.mm_language_proj.bias", "loss.log_scale",
                "loss.bias"}
    if set(heads) != expected:
        raise ValueError(f"{folder / HEADS_FILE}: keys {sorted(heads)}, expected {sorted(expected)}")
    embed_dim = int(heads["image_tower.mm_vision_proj.weight"].shape[0])
    pooling = meta.get("text_tower", {}).get("pooling", DEFAULT_TEXT_POOLING)
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
            target = params.get(key[len(prefix):])
            if target is None or target.shape != value.shape:
                raise ValueError(f"{folder / HEADS_FILE}: {key} of shape {list(value.shape)} does not fit the "
                                 f"towers built from {encoder_folder} and {folder / TEXT_ENCODER_DIR}")
            with torch.no_grad():
                target.copy_(value)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / TEXT_ENCODER_DIR))
    return SigLIPTowers(image_tower.eval(), text_tower.eval(), tokenizer, tuple(meta["input_size"]),
                        float(heads["loss.log_scale"]), float(heads["loss.bias"]), meta)
