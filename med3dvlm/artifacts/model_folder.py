"""Model folders: one self-contained VLM (``python -m med3dvlm.export`` and ``import_weights`` write
one; ``evaluate``, ``infer`` and the web page load one).

Layout: ``llm/`` (the LLM with the trained ``<im_patch>`` row merged in, and its tokenizer, a Hugging
Face folder), ``vision_tower.safetensors``, ``projector.safetensors``, and ``config.json`` (written
last) with the component configs that rebuild them, the input size, the image token, and the SHA-256
of every other file. The folder is built beside its place and renamed into it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from med3dvlm.artifacts.handoff import load_finetune_handoff
from med3dvlm.artifacts.tensors import load_state_strict, save_tensors
from med3dvlm.models.components import build_component
from med3dvlm.models.llm import load_llm_folder
from med3dvlm.models.lora import merge_lora
from med3dvlm.models.vlm import VisionLanguageModel
from med3dvlm.utils.atomic import atomic_folder
from med3dvlm.utils.fingerprint import folder_fingerprint, verify_fingerprint

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LLM_DIR = "llm"
EXPORT_FORMAT = "med3dvlm-vlm"
EXPORT_VERSION = 1


def save_pretrained(
    model: VisionLanguageModel,
    path: str | os.PathLike,
    vision_tower_config: dict,
    projector_config: dict,
    input_size: tuple[int, int, int] | list[int],
    extra: dict[str, Any] | None = None,
    write_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` as the model folder ``path`` (replacing it).

    The component configs are the ``_target_`` nodes that rebuild the vision tower and the
    projector; ``input_size`` is the volume size ``(D, H, W)`` they were built for; ``extra`` adds
    fields to ``config.json``; ``write_files(staging folder)`` adds files (the importer's record of
    its source), which the fingerprint then covers.
    """
    model.sync_image_token_row()
    with atomic_folder(path, CONFIG_FILE) as staging:
        model.llm.save_pretrained(staging / LLM_DIR)
        model.tokenizer.save_pretrained(staging / LLM_DIR)
        save_tensors(staging / "vision_tower.safetensors", model.vision_tower.state_dict())
        save_tensors(staging / "projector.safetensors", model.projector.state_dict())
        if write_files is not None:
            write_files(staging)
        config = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "image_token": model.image_token,
            "num_image_tokens": model.num_image_tokens,
            "reference_placement": model.reference_placement,
            "input_size": list(input_size),
            "vision_tower": vision_tower_config,
            "projector": projector_config,
            **(extra or {}),
            "files": folder_fingerprint(staging, skip={CONFIG_FILE}),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return Path(path)


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a model folder (by its ``config.json``'s format; nothing is loaded)."""
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | str = "float32",
    reference_placement: bool | None = None,
    verify_files: bool = True,
) -> VisionLanguageModel:
    """Rebuild a VLM written by ``save_pretrained`` / ``python -m med3dvlm.export`` (eval mode).

    Strict: the vision tower and projector are our own components (``med3dvlm.models.components``),
    every weight file fits its module exactly, and the LLM folder is complete and consistent with its
    tokenizer (``load_llm_folder``; the ``<im_patch>`` id inside the embedding matrix).
    ``verify_files`` checks each file's SHA-256 against ``config.json`` first (off: skip hashing a
    very large folder; everything else is still checked).
    """
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: not found; write a VLM folder with `python -m med3dvlm.export`")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file}: not valid JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{config_file}: not a {EXPORT_FORMAT} folder")
    if verify_files:
        if "files" in config:
            verify_fingerprint(path, config["files"], config_file, closed=[LLM_DIR])
        else:
            log.warning("%s records no file fingerprints (written by an older version); files not verified",
                        config_file)
    vision_tower = build_component(config["vision_tower"], config_file, "vision_tower")
    projector = build_component(config["projector"], config_file, "projector")
    load_state_strict(vision_tower, path / "vision_tower.safetensors")
    load_state_strict(projector, path / "projector.safetensors")
    llm, tokenizer = load_llm_folder(path / LLM_DIR, dtype=dtype)
    image_token = config["image_token"]
    token_id = tokenizer.get_vocab().get(image_token)
    rows = llm.get_input_embeddings().weight.shape[0]
    if token_id is None or token_id >= rows:
        found = "is not in the tokenizer" if token_id is None else f"has id {token_id}"
        raise ValueError(f"{path / LLM_DIR / 'tokenizer.json'}: {image_token} {found}; the LLM's embedding "
                         f"matrix has {rows} rows")
    placement = config["reference_placement"] if reference_placement is None else reference_placement
    model = VisionLanguageModel(vision_tower, projector, llm, tokenizer, image_token=image_token,
                                reference_placement=placement)
    model.input_size = tuple(config["input_size"])
    if model.num_image_tokens != config["num_image_tokens"]:
        raise ValueError(
            f"{config_file}: num_image_tokens {config['num_image_tokens']} but the projector gives "
            f"{model.num_image_tokens}"
        )
    return model.to(llm.dtype).eval()


def write_merged_model(handoff: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32") -> Path:
    """``python -m med3dvlm.export``: merge a finetune hand-off's adapter into the LLM and write the
    model folder ``out``."""
    model, meta = load_finetune_handoff(handoff, dtype)
    merge_lora(model)
    return save_pretrained(model, out, meta["vision_tower"], meta["projector"], meta["input_size"],
                           extra={"experiment": meta.get("experiment", "default")})
