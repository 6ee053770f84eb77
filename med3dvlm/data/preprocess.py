"""Turn raw scans into model-ready volumes: stack slices, intensity to [0, 1], crop, resize.

Shared by ``prepare`` (M3D-Cap JPEG series, the user's scans) and inference on new scans, so a
volume seen at inference time goes through exactly the steps the training data went through.

Intensity: M3D-Cap's slices are display-windowed 8-bit JPEGs, min-max normalised as the original
does. A CT in Hounsfield units (about -1024 ... 3000) min-maxed that way puts soft tissue into a
sliver of [0, 1]; a CT *window* (``WINDOWS``: soft tissue W400/L40, lung W1500/L-600, bone
W1800/L400, brain W80/L40, or an explicit ``[low, high]``) clips it to ``[low, high]`` and scales
that to [0, 1], as a radiologist's display (and M3D's JPEGs) do.

Foreground crop: after min-max normalisation the volume is cropped to the bounding box of the
voxels strictly above ``foreground_threshold`` (default 0, i.e. everything brighter than the
darkest voxel), which is what the original's ``monai.transforms.CropForeground()`` does with its
default ``select_fn``. A volume with no voxel above the threshold is kept whole.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from med3dvlm.data.errors import DataError
from med3dvlm.data.scans import DEFAULT_MAX_VOXELS, read_scan
from med3dvlm.data.volume_io import is_prepared, read_volume

log = logging.getLogger(__name__)

SLICE_SUFFIXES: tuple[str, ...] = (".jpeg", ".jpg", ".png")
_NUMBER = re.compile(r"\d+")


def spatial_size_tuple(spatial_size: Sequence[int]) -> tuple[int, int, int]:
    """Validate a ``(D, H, W)`` target size."""
    size = tuple(int(s) for s in spatial_size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"spatial_size must be three positive integers (D, H, W), got {list(spatial_size)}")
    return size  # type: ignore[return-value]


def list_slices(series_dir: str | os.PathLike) -> list[Path]:
    """The slice images of a series folder in numeric order (``2.jpeg`` before ``10.jpeg``)."""
    series_dir = Path(series_dir)
    if not series_dir.is_dir():
        raise DataError(series_dir, "series folder not found")
    slices = []
    for path in series_dir.iterdir():
        if path.suffix.lower() not in SLICE_SUFFIXES or path.name.startswith("."):
            continue
        if not _NUMBER.fullmatch(path.stem):
            raise DataError(path, "slice file name is not a number (expected <k>.jpeg)")
        slices.append(path)
    if not slices:
        raise DataError(series_dir, f"no slice images ({', '.join(SLICE_SUFFIXES)}) in the series folder")
    return sorted(slices, key=lambda p: int(p.stem))


def read_slice(path: str | os.PathLike) -> np.ndarray:
    """One 2D slice as 8-bit grayscale, converted as the original's prepare converts it: palette
    images through RGBA, everything else straight to ``L``."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            opened.load()  # decode now so truncated files fail here, naming the file
            image = opened.convert("RGBA") if opened.mode == "P" else opened
            array = np.asarray(image if image.mode == "L" else image.convert("L"))
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
        raise DataError(path, f"unreadable or truncated image ({type(exc).__name__}: {exc})") from exc
    if array.ndim != 2 or array.size == 0:
        raise DataError(path, f"expected a 2D grayscale slice, got shape {array.shape}")
    return array


@dataclass(frozen=True)
class StackedSeries:
    """A stacked ``(D, H, W)`` series and the slices left out because their shape was a minority."""

    volume: np.ndarray
    dropped: tuple[str, ...]


def _slice_pixels(path: Path) -> int:
    from PIL import Image

    try:
        with Image.open(path) as opened:  # reads the header only
            width, height = opened.size
    except Exception as exc:  # Pillow raises OSError, SyntaxError, DecompressionBombError...
        raise DataError(path, f"unreadable or truncated image ({type(exc).__name__}: {exc})") from exc
    return width * height


def stack_series(series_dir: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> StackedSeries:
    """Read a folder of numbered slices into ``(D, H, W)``; slices of a minority shape are dropped.

    The kept shape is the most common one; ties go to the shape of the lowest-numbered slice. The
    slices' sizes (from their headers) must add up to at most ``max_voxels`` before any is decoded.
    """
    paths = list_slices(series_dir)
    total = sum(_slice_pixels(p) for p in paths)
    if total > max_voxels:
        raise DataError(series_dir, f"the series' {len(paths)} slices hold {total:,} voxels, more than "
                                    f"max_voxels={max_voxels:,} (raise max_voxels to read larger series)")
    arrays = [read_slice(p) for p in paths]
    counts = Counter(a.shape for a in arrays)
    best = max(counts.values())
    kept_shape = next(a.shape for a in arrays if counts[a.shape] == best)
    kept = [a for a in arrays if a.shape == kept_shape]
    dropped = tuple(p.name for p, a in zip(paths, arrays) if a.shape != kept_shape)
    return StackedSeries(volume=np.stack(kept), dropped=dropped)


# CT display windows, (width, level) in Hounsfield units: [level - width/2, level + width/2] -> [0, 1].
WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (400.0, 40.0), "lung": (1500.0, -600.0), "bone": (1800.0, 400.0), "brain": (80.0, 40.0),
}
WindowSpec = str | Sequence[float] | None


def window_range(window: WindowSpec) -> tuple[float, float] | None:
    """``(low, high)`` of ``window``: a preset of ``WINDOWS``, an explicit ``[low, high]``, or
    ``None`` / ``"none"`` (no window: min-max, as the original)."""
    if window is None or (isinstance(window, str) and window.lower() == "none"):
        return None
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"intensity.window={window!r}: use one of {sorted(WINDOWS)}, [low, high] in HU, or none")
        width, level = WINDOWS[window]
        return level - width / 2, level + width / 2
    values = [float(v) for v in window]
    if len(values) != 2 or not values[1] > values[0]:
        raise ValueError(f"intensity.window={list(window)}: an explicit window is [low, high] with low < high")
    return values[0], values[1]


def looks_like_hu(volume: np.ndarray) -> bool:
    """Raw CT in Hounsfield units: air far below zero (< -500) and tissue or bone above 200."""
    return float(np.min(volume)) < -500 and float(np.max(volume)) > 200


def apply_window(volume: np.ndarray, low: float, high: float, source: str | os.PathLike = "<array>") -> np.ndarray:
    """Clip to ``[low, high]`` and scale to float32 [0, 1]; NaN/Inf is bad input."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.size == 0:
        raise DataError(source, f"empty volume, shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise DataError(source, "volume contains NaN or Inf values")
    clipped = np.clip(volume, np.float32(low), np.float32(high))
    return (clipped - np.float32(low)) * np.float32(1.0 / (high - low))


def minmax_normalize(volume: np.ndarray, source: str | os.PathLike = "<array>") -> np.ndarray:
    """Scale to float32 in [0, 1]; a constant volume (no contrast) or NaN/Inf is bad input."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.size == 0:
        raise DataError(source, f"empty volume, shape {volume.shape}")
    low, high = float(volume.min()), float(volume.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        raise DataError(source, "volume contains NaN or Inf values")
    if high <= low:
        raise DataError(source, f"constant volume (every voxel is {low:g}); nothing to normalise")
    return (volume - np.float32(low)) * np.float32(1.0 / (high - low))


def crop_foreground(volume: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Crop ``(D, H, W)`` to the bounding box of voxels ``> threshold`` (whole volume if none)."""
    mask = volume > threshold
    if not mask.any():
        return volume
    box = []
    for axis in range(volume.ndim):
        others = tuple(a for a in range(volume.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return volume[tuple(box)]


def resize_trilinear(volume: np.ndarray, spatial_size: Sequence[int]) -> np.ndarray:
    """Trilinear resize of a float ``(D, H, W)`` volume (``align_corners=False``, like MONAI's Resize)."""
    import torch
    import torch.nn.functional as F

    size = spatial_size_tuple(spatial_size)
    if tuple(volume.shape) == size:
        return np.asarray(volume, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    with torch.no_grad():
        out = F.interpolate(tensor, size=size, mode="trilinear", align_corners=False)
    return out[0, 0].numpy()


def preprocess_volume(
    volume: np.ndarray,
    spatial_size: Sequence[int],
    foreground_threshold: float = 0.0,
    source: str | os.PathLike = "<array>",
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Raw ``(D, H, W)`` array of any dtype -> float32 ``spatial_size`` volume in [0, 1].

    ``window`` ``(low, high)`` (see :func:`window_range`) or min-max to [0, 1], then foreground crop,
    trilinear resize. ``source`` names the input in errors.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise DataError(source, f"expected a 3D (D, H, W) volume, got shape {volume.shape}")
    normalized = minmax_normalize(volume, source) if window is None else apply_window(volume, *window, source)
    cropped = crop_foreground(normalized, foreground_threshold)
    resized = resize_trilinear(cropped, spatial_size)
    # Interpolation is a convex combination, so only float rounding can leave [0, 1].
    return np.clip(resized, 0.0, 1.0, out=resized)


@dataclass(frozen=True)
class PreparedScan:
    """A scan as read (canonical ``(D, H, W)``, as stored) and as the model receives it."""

    raw: np.ndarray
    volume: np.ndarray
    hu_unwindowed: bool  # raw CT in HU min-maxed for want of a window
    already_prepared: bool = False  # a volume prepare wrote, used as it is


def prepare_scan(path: str | os.PathLike, spatial_size: Sequence[int], window: tuple[float, float] | None = None,
                 foreground_threshold: float = 0.0, max_voxels: int = DEFAULT_MAX_VOXELS) -> PreparedScan:
    """One of the user's scans (any format of ``data.scans``) through the steps ``prepare`` applies:
    the one code path of ``prepare``, ``infer`` and the app."""
    raw = read_scan(path, max_voxels)
    volume = preprocess_volume(raw, spatial_size, foreground_threshold, path, window)
    return PreparedScan(raw, volume, window is None and looks_like_hu(raw))


def model_input(path: str | os.PathLike, input_size: Sequence[int], window: WindowSpec = None,
                max_voxels: int = DEFAULT_MAX_VOXELS) -> PreparedScan:
    """What a model of ``input_size`` receives from the file at ``path`` (``infer`` and the web page).

    A volume ``prepare`` wrote (``.npy``, or a NIfTI with its header mark) is read as it is and must
    have the model's size; any other scan (``data.scans``: NIfTI, NRRD, MetaImage, a DICOM folder; up
    to ``max_voxels``) goes through exactly ``prepare``'s steps (:func:`prepare_scan`): ``window``
    (HU) or min-max, foreground crop, resize. A raw-HU scan without a window is min-maxed, with a
    warning naming the setting.
    """
    if is_prepared(path):
        if window_range(window) is not None:
            log.info("%s was prepared already (window as prepare chose); intensity.window is not applied again", path)
        volume = read_volume(path, shape=tuple(input_size))
        return PreparedScan(volume, volume, hu_unwindowed=False, already_prepared=True)
    scan = prepare_scan(path, input_size, window_range(window), max_voxels=max_voxels)
    if scan.hu_unwindowed:
        log.warning("%s looks like raw CT in Hounsfield units and no intensity.window is set: it was min-max "
                    "normalised, which squeezes soft tissue into a sliver of [0, 1]; pass the window the "
                    "training data was prepared with (e.g. intensity.window=soft_tissue)", path)
    return scan
