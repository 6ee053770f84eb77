"""Stage exports: the trained encoder handed from one stage to the next.

An export is a folder holding ``encoder.safetensors`` and ``export.json`` (the encoder's
``_target_`` config, the input size it was trained at, the stage, the experiment, which weights:
``final`` = end of training, ``best`` = best checkpoint by the monitored metric). The folder is
built beside its destination and renamed into place, so a folder with ``export.json`` is always
complete and consistent. Later stages find the newest one with ``latest_export`` or take an
explicit path, and rebuild the encoder with ``load_encoder_export`` (strict).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from safetensors.torch import save_file
from torch import nn

from med3dvlm.config import PROJECT_ROOT
from med3dvlm.models.vlm import load_state_strict

EXPORT_FILE = "export.json"
WEIGHTS_FILE = "encoder.safetensors"
FORMAT = "med3dvlm-encoder-export/1"
WHICH = ("final", "best")
DEFAULT_LOG_DIR = PROJECT_ROOT / "outputs"


def write_encoder_export(
    folder: str | os.PathLike,
    encoder: nn.Module,
    encoder_config: Mapping[str, Any],
    input_size: Sequence[int],
    stage: str,
    experiment: str,
    which: str = "final",
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write (or replace) the export ``folder``: weights first, ``export.json`` last, then rename."""
    if which not in WHICH:
        raise ValueError(f"export kind {which!r} unknown; one of {WHICH}")
    if "_target_" not in encoder_config:
        raise ValueError("encoder_config must be a `_target_` node that rebuilds the encoder")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
        save_file(state, str(staging / WEIGHTS_FILE))
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
        # Move the previous export aside first: a crash in between leaves the new or the old one.
        retired = None
        if folder.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".old-{folder.name}-", dir=folder.parent))
            os.replace(folder, retired / folder.name)
        os.replace(staging, folder)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


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
    encoder = instantiate(meta["encoder"])
    load_state_strict(encoder, _folder(path) / WEIGHTS_FILE)
    return encoder, meta["encoder"]


def latest_export(
    stage: str, experiment: str, log_dir: str | os.PathLike | None = None, which: str = "final"
) -> Path | None:
    """The newest complete export of ``stage`` (``which`` weights) by ``experiment`` under ``log_dir``
    (default: ``outputs/`` of the checkout), or ``None``."""
    root = Path(log_dir) if log_dir is not None else DEFAULT_LOG_DIR
    found: list[tuple[float, str]] = []
    for meta_file in root.glob(f"**/{EXPORT_FILE}"):
        if any(part.startswith((".tmp-", ".old-")) for part in meta_file.relative_to(root).parts):
            continue
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if (meta.get("format"), meta.get("stage"), meta.get("experiment"), meta.get("which")) == (
            FORMAT, stage, experiment, which,
        ):
            found.append((float(meta.get("created", 0.0)), str(meta_file.parent)))
    return Path(max(found)[1]) if found else None
