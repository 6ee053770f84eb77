"""Model folders: one self-contained VLM (``python -m med3dvlm.export`` and ``import_weights`` write
one; ``evaluate``, ``infer`` and the web page load one).

Layout: ``llm/`` (the LLM with the trained ``<im_patch>`` row merged in, and its tokenizer, a Hugging
Face folder), ``vision_tower.safetensors``, ``projector.safetensors``, and the record (``record.json``,
written last: the component configs that rebuild them, the input size, the image token, the
preprocessing and prompt format of the training data, its parents, and the SHA-256 of every other
file). The folder is built beside its place and renamed into it. ``export`` adds its model card
(``README.md``, :mod:`med3dvlm.artifacts.model_card`), which no loader reads. A folder pushed to the
Hugging Face Hub and fetched into the local cache loads by its Hub id (:mod:`med3dvlm.artifacts.hub`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from med3dvlm.artifacts.handoff import load_finetune_handoff
from med3dvlm.artifacts.hub import cached_model_folder
from med3dvlm.artifacts.record import (
    ArtifactRecord,
    RecordError,
    parent,
    read_record,
    record_file,
    write_artifact,
)
from med3dvlm.artifacts.tensors import load_state_strict, save_tensors
from med3dvlm.models.components import build_component
from med3dvlm.models.llm import LanguageModel, load_llm_folder
from med3dvlm.models.lora import merge_lora
from med3dvlm.models.vlm import VisionLanguageModel

log = logging.getLogger(__name__)

LLM_DIR = "llm"
LLM_SHARD_SIZE = "5GB"
"""Largest file of ``llm/``'s weights (Hugging Face's own default, 50GB, puts a 7B float32 LLM in one file)."""


@dataclass
class Pretrained:
    """A loaded model folder: the model (eval mode) and its record."""

    model: VisionLanguageModel
    record: ArtifactRecord


def save_pretrained(
    model: VisionLanguageModel,
    path: str | os.PathLike,
    record: ArtifactRecord,
    write_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` as the model folder ``path`` (replacing it) with ``record`` (kind
    ``model_folder``; its image-token fields are taken from the model). ``write_files(staging folder)``
    adds files (the importer's record of its source), which the fingerprint then covers."""
    model.sync_image_token_row()
    return write_model_folder(
        path,
        record,
        lambda folder: model.llm.save_pretrained(folder, max_shard_size=LLM_SHARD_SIZE),
        model.tokenizer,
        model.vision_tower,
        model.projector,
        model.image_token,
        model.reference_placement,
        write_files,
    )


def write_model_folder(
    path: str | os.PathLike,
    record: ArtifactRecord,
    write_llm: Callable[[Path], None],
    tokenizer: PreTrainedTokenizerBase,
    vision_tower: nn.Module,
    projector: nn.Module,
    image_token: str,
    reference_placement: bool,
    write_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write the model folder ``path`` from its parts: ``write_llm(folder)`` writes the LLM's config and
    weights into ``llm/`` (the model's ``save_pretrained``, or an importer streaming a release into it),
    the tokenizer goes beside them; ``record`` as in :func:`save_pretrained`."""
    record = replace(
        record,
        kind="model_folder",
        image_token=image_token,
        num_image_tokens=int(projector.num_tokens),
        reference_placement=reference_placement,
    )

    def files(staging: Path) -> None:
        write_llm(staging / LLM_DIR)
        tokenizer.save_pretrained(staging / LLM_DIR)
        save_tensors(staging / "vision_tower.safetensors", vision_tower.state_dict())
        save_tensors(staging / "projector.safetensors", projector.state_dict())
        if write_files is not None:
            write_files(staging)

    return write_artifact(path, record, files)


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a model folder (by its record; no weights are read)."""
    try:
        return read_record(path, "model_folder", quiet=True).kind == "model_folder"
    except (RecordError, OSError):
        return False


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | str = "float32",
    reference_placement: bool | None = None,
    verify_files: bool = True,
) -> Pretrained:
    """Rebuild a VLM written by ``save_pretrained`` / ``python -m med3dvlm.export`` (eval mode), with its
    record. ``path``: the folder, or the Hub id (``org/name``) of one in the local Hugging Face cache.

    Strict: the vision tower and projector are our own components (``med3dvlm.models.components``),
    every weight file fits its module exactly, and the LLM folder is complete and consistent with its
    tokenizer (``load_llm_folder``; the ``<im_patch>`` id inside the embedding matrix).
    ``verify_files`` checks each file's SHA-256 against the record first (off: skip hashing a very
    large folder; everything else is still checked).
    """
    path = cached_model_folder(path)
    record = read_record(path, "model_folder", verify_files=verify_files)
    source = record_file(path)
    vision_tower = build_component(record.components["vision_tower"], source, "vision_tower")
    projector = build_component(record.components["projector"], source, "projector")
    load_state_strict(vision_tower, path / "vision_tower.safetensors")
    load_state_strict(projector, path / "projector.safetensors")
    llm, tokenizer = load_llm_folder(path / LLM_DIR, dtype=dtype)
    token_id = tokenizer.get_vocab().get(record.image_token)
    rows = llm.get_input_embeddings().weight.shape[0]
    if token_id is None or token_id >= rows:
        found = "is not in the tokenizer" if token_id is None else f"has id {token_id}"
        raise ValueError(
            f"{path / LLM_DIR / 'tokenizer.json'}: {record.image_token} {found}; the LLM's embedding "
            f"matrix has {rows} rows"
        )
    placement = record.reference_placement if reference_placement is None else reference_placement
    model = VisionLanguageModel(
        vision_tower, projector, llm, tokenizer, image_token=record.image_token, reference_placement=placement
    )
    if model.num_image_tokens != record.num_image_tokens:
        raise ValueError(
            f"{source}: num_image_tokens {record.num_image_tokens} but the projector gives "
            f"{model.num_image_tokens}"
        )
    return Pretrained(model.to(llm.dtype).eval(), record)


def write_merged_model(
    handoff: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str = "float32",
    llm: LanguageModel | None = None,
) -> Path:
    """``python -m med3dvlm.export``: merge a finetune hand-off's adapter into the LLM and write the
    model folder ``out``, recording the hand-off as its parent."""
    model, record = load_finetune_handoff(handoff, dtype, llm)
    merge_lora(model)
    folder = replace(
        record,
        kind="model_folder",
        parents=(parent("adapter", handoff),),
        files={},
        extra={},
        created=time.time(),
    )
    return save_pretrained(model, out, folder)
