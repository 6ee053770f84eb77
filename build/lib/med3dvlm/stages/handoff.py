"""Hand-off folders of stages 2 and 3: what ``pretrain`` passes to ``finetune`` and what ``finetune``
passes to ``python -m med3dvlm.export``.

A hand-off folder holds safetensors files and ``handoff.json`` (written last, so a folder with it is
complete). ``handoff.json`` records the component configs (``_target_`` nodes with the derived sizes
filled in) so that the next step rebuilds exactly the trained modules and loads them strictly.

* ``kind="projector"`` (pretrain): ``projector.safetensors``, ``image_token.safetensors``.
* ``kind="adapter"`` (finetune): ``adapter/`` (peft), ``vision_tower.safetensors``,
  ``projector.safetensors``, ``image_token.safetensors``, optionally ``embeddings.safetensors``
  (input embedding / LM-head weights when those were trained), ``tokenizer/``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from med3dvlm.utils.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

HANDOFF_FILE = "handoff.json"
KINDS = ("projector", "adapter")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def write_handoff(folder: str | os.PathLike, kind: str, meta: dict[str, Any]) -> Path:
    """Write ``handoff.json`` (after the weight files) marking ``folder`` complete."""
    if kind not in KINDS:
        raise ValueError(f"unknown hand-off kind {kind!r}; one of {KINDS}")
    folder = Path(folder)
    atomic_write_text(folder / HANDOFF_FILE, json.dumps({"kind": kind, **meta}, indent=2))
    return folder


def read_handoff(folder: str | os.PathLike, kind: str, produced_by: str) -> dict[str, Any]:
    """The metadata of a complete hand-off folder of ``kind``; a clear error otherwise."""
    folder = Path(folder)
    meta_file = folder / HANDOFF_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{folder}: no complete {kind} export here ({HANDOFF_FILE} missing); it is produced by `{produced_by}`"
        )
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("kind") != kind:
        raise ValueError(f"{meta_file}: a {meta.get('kind')!r} export, expected a {kind!r} export")
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


def latest_handoff(log_dir: str | os.PathLike, kind: str, experiment: str) -> Path | None:
    """The most recently completed hand-off folder of ``kind`` written by ``experiment`` under ``log_dir``."""
    found = []
    for meta_file in Path(log_dir).glob(f"**/{HANDOFF_FILE}"):
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("kind") == kind and meta.get("experiment") == experiment:
            found.append((meta_file.stat().st_mtime, meta_file.parent))
    return max(found)[1] if found else None


def resolve_handoff(
    explicit: str | os.PathLike | None, log_dir: str | os.PathLike, kind: str, experiment: str, produced_by: str
) -> Path:
    """An explicit path wins; otherwise the latest completed ``kind`` hand-off of ``experiment``
    (named in the log); none -> an error saying which command produces it."""
    if explicit:
        return Path(explicit)
    found = latest_handoff(log_dir, kind, experiment)
    if found is None:
        raise FileNotFoundError(
            f"no completed {kind} export of experiment {experiment!r} under {log_dir}; "
            f"run `{produced_by}` first or pass its folder explicitly"
        )
    log.info("using the latest %s export of experiment %r: %s", kind, experiment, found)
    return found
