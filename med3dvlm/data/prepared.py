"""A prepared folder, as ``python -m med3dvlm.prepare`` leaves it, read the same way for every dataset.

``manifest.json`` records which release wrote the folder (``dataset``), the volume size, the
preprocessing of every source (:class:`~med3dvlm.data.preprocess.Preprocessing`) and the split file
of ``{"image", "text"}`` lists stage 1 trains on (``caption_file``). Folders written before the
manifest carried the preprocessing have it reconstructed from what they did record (M3D's slices
min-maxed in their display order; own scans reoriented to RAS, with the recorded window), and the
log says so.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from med3dvlm.data.errors import DataError
from med3dvlm.data.preprocess import Preprocessing, SourcePreprocessing

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
MANIFEST_FILE = "manifest.json"
"""What ``prepare`` wrote into a prepared folder, with its settings (``spatial_size``, preprocessing, ...)."""
DEFAULT_CAPTION_FILE = "M3D_Cap.json"
VOLUME_SUFFIXES: tuple[str, ...] = (".npy", ".nii.gz", ".nii")
M3D_ORIENTATION = "LPI"
"""M3D-Cap's JPEG slices as displayed: W to the patient's left, H to posterior, D to inferior."""
OWN_ORIENTATION = "RAS"


def subfolders(folder: Path) -> list[Path]:
    """Sorted subfolders, without hidden ones (a writer's ``.tmp-*`` staging folders)."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_manifest(data_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The folder's ``manifest.json``, or ``None`` when there is none (a folder not written by prepare)."""
    path = Path(data_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"unreadable manifest ({type(exc).__name__}: {exc})") from exc
    if not isinstance(manifest, dict):
        raise DataError(path, "not a prepare manifest (expected a JSON object)")
    return manifest


def prepared_spatial_size(data_dir: str | os.PathLike) -> list[int] | None:
    """The ``(D, H, W)`` size ``prepare`` wrote the volumes of ``data_dir`` at (its manifest's
    ``spatial_size``), or ``None`` when there is no readable manifest."""
    try:
        manifest = read_manifest(data_dir)
        return [int(n) for n in manifest["spatial_size"]] if manifest else None
    except (DataError, KeyError, TypeError, ValueError):
        return None


def caption_file(data_dir: str | os.PathLike) -> Path:
    """The split file of ``{"image", "text"}`` lists in ``data_dir`` (``M3D_Cap.json`` for M3D and
    own data, the release's for others)."""
    manifest = read_manifest(data_dir) or {}
    return Path(data_dir) / str(manifest.get("caption_file") or DEFAULT_CAPTION_FILE)


def m3d_preprocessing(inferred: bool = False) -> Preprocessing:
    """M3D-Cap's recipe: 8-bit display-windowed slices min-maxed, cropped to the foreground, resized
    trilinearly, in their display order (the original's prepare)."""
    spec = SourcePreprocessing(scale="minmax", orientation=M3D_ORIENTATION, foreground_threshold=0.0)
    return Preprocessing("m3d", {"m3d": spec}, {}, inferred)


def dataset_preprocessing(data_dir: str | os.PathLike) -> Preprocessing | None:
    """What the volumes of ``data_dir`` went through (``None``: no manifest). A manifest of an older
    version has it reconstructed, with a log line saying so."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        return None
    if "preprocessing" in manifest:
        return Preprocessing.from_dict(manifest["preprocessing"])
    settings = manifest.get("settings", {})
    volumes = manifest.get("volumes", {})
    if volumes and all(str(name).startswith("own/") for name in volumes):
        window = (manifest.get("intensity") or {}).get("range")
        spec = SourcePreprocessing(
            window=window,
            scale="window" if window else "minmax",
            orientation=OWN_ORIENTATION,
            foreground_threshold=settings.get("foreground_threshold", 0.0),
        )
        found = Preprocessing("own", {"own": spec}, settings, inferred=True)
    else:
        found = m3d_preprocessing(inferred=True)
    log.info(
        "%s records no preprocessing (prepared by an older version): taken as %s's %s",
        Path(data_dir),
        found.dataset,
        {k: v.to_dict() for k, v in found.sources.items()},
    )
    return found
