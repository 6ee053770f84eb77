"""Turn raw scans into model-ready volumes: stack slices, min-max to [0, 1], crop, resize.

Shared by ``prepare`` (M3D-Cap JPEG series, user NIfTI) and inference on new scans, so a volume
seen at inference time goes through exactly the steps the training data went through.

Foreground crop: after min-max normalisation the volume is cropped to the bounding box of the
voxels strictly above ``foreground_threshold`` (default 0, i.e. everything brighter than the
darkest voxel), which is what the original's ``monai.transforms.CropForeground()`` does with its
default ``select_fn``. A volume with no voxel above the threshold is kept whole.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from med3dvlm.data.errors import DataError

SLICE_SUFFIXES: tuple[str, ...] = (".jpeg", ".jpg", ".png")
# The largest scan read by default: 1 Gi voxels (a 512x512x4096 CT; 4 GiB as float32). A header is
# checked against it before anything is decompressed or allocated; a worker holds one scan at a time.
DEFAULT_MAX_VOXELS = 1 << 30
_NUMBER = re.compile(r"\d+")


def check_voxels(shape: Sequence[int], max_voxels: int, source: str | os.PathLike) -> None:
    """Refuse a scan whose header claims a ``shape`` of more than ``max_voxels`` voxels (checked
    before anything is decompressed or allocated)."""
    count = math.prod(int(n) for n in shape)
    if count > max_voxels:
        raise DataError(source, f"the header claims {'x'.join(str(int(n)) for n in shape)} = {count:,} voxels, "
                                f"more than max_voxels={max_voxels:,} (raise max_voxels to read larger scans)")


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


def load_nifti_as_dhw(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> np.ndarray:
    """A 3D NIfTI reoriented to the closest canonical (RAS+) orientation, as ``(D, H, W) = (z, y, x)``.

    Trailing singleton dimensions (``(x, y, z, 1)``) are squeezed; a true 4D series (several
    frames) is rejected rather than silently reduced to one frame. The header's size is checked
    against ``max_voxels`` before the data is decompressed.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        image = nib.load(str(path))
        shape = tuple(image.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 3:
            raise DataError(path, f"expected a 3D volume, got shape {tuple(image.shape)}")
        check_voxels(shape, max_voxels, path)
        if len(image.shape) > 3:
            image = nib.Nifti1Image(np.asanyarray(image.dataobj).reshape(shape), image.affine, image.header)
        data = np.asanyarray(nib.as_closest_canonical(image).dataobj)
    except DataError:
        raise
    except Exception as exc:  # nibabel/gzip/numpy raise many types for truncated or corrupt files
        raise DataError(path, f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})") from exc
    return np.ascontiguousarray(data.transpose(2, 1, 0))


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
) -> np.ndarray:
    """Raw ``(D, H, W)`` array of any dtype -> float32 ``spatial_size`` volume in [0, 1].

    Min-max to [0, 1], foreground crop, trilinear resize. ``source`` names the input in errors.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise DataError(source, f"expected a 3D (D, H, W) volume, got shape {volume.shape}")
    normalized = minmax_normalize(volume, source)
    cropped = crop_foreground(normalized, foreground_threshold)
    resized = resize_trilinear(cropped, spatial_size)
    # Interpolation is a convex combination, so only float rounding can leave [0, 1].
    return np.clip(resized, 0.0, 1.0, out=resized)
