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

Each dataset has its own recipe (:class:`SourcePreprocessing`: voxel order, window, scale, crop,
resize), per named source (FLARE's abdomen and chest CT differ); :class:`Preprocessing` is what a
prepared folder's manifest and every artifact trained on it record.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from med3dvlm.data.errors import DataError
from med3dvlm.data.resize import resize_antialiased
from med3dvlm.data.scans import DEFAULT_MAX_VOXELS, check_orientation, load_scan
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
        raise DataError(
            series_dir,
            f"the series' {len(paths)} slices hold {total:,} voxels, more than "
            f"max_voxels={max_voxels:,} (raise max_voxels to read larger series)",
        )
    arrays = [read_slice(p) for p in paths]
    counts = Counter(a.shape for a in arrays)
    best = max(counts.values())
    kept_shape = next(a.shape for a in arrays if counts[a.shape] == best)
    kept = [a for a in arrays if a.shape == kept_shape]
    dropped = tuple(p.name for p, a in zip(paths, arrays) if a.shape != kept_shape)
    return StackedSeries(volume=np.stack(kept), dropped=dropped)


# CT display windows, (width, level) in Hounsfield units: [level - width/2, level + width/2] -> [0, 1].
WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}
WindowSpec = str | Sequence[float] | None
SCALES: tuple[str, ...] = ("minmax", "window")
RESIZES: tuple[str, ...] = ("trilinear", "antialiased")


def window_range(window: WindowSpec) -> tuple[float, float] | None:
    """``(low, high)`` of ``window``: a preset of ``WINDOWS``, an explicit ``[low, high]``, or
    ``None`` / ``"none"`` (no window: min-max, as the original)."""
    if window is None or (isinstance(window, str) and window.lower() == "none"):
        return None
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(
                f"intensity.window={window!r}: use one of {sorted(WINDOWS)}, [low, high] in HU, or none"
            )
        width, level = WINDOWS[window]
        return level - width / 2, level + width / 2
    values = [float(v) for v in window]
    if len(values) != 2 or not values[1] > values[0]:
        raise ValueError(
            f"intensity.window={list(window)}: an explicit window is [low, high] with low < high"
        )
    return values[0], values[1]


def _floats(values: Sequence[float] | None, count: int, name: str) -> tuple[float, ...] | None:
    if values is None:
        return None
    result = tuple(float(v) for v in values)
    if len(result) != count:
        raise ValueError(f"{name}={list(values)}: expected {count} numbers")
    return result


@dataclass(frozen=True)
class SourcePreprocessing:
    """How the scans of one source become model input, ``(D, H, W)`` float32 in [0, 1].

    The steps, in order: read in ``orientation`` (axis codes of ``(W, H, D)``, see
    :mod:`med3dvlm.data.scans`; ``None``: as stored), the first frame of a 4-D series when
    ``first_frame``, resample to ``spacing`` (mm, ``(D, H, W)``) when set, clip to ``window`` (HU)
    when set, scale to [0, 1] (``window``: ``(x - low) / (high - low)``; ``minmax``: by the volume's
    own minimum and maximum after the clip), crop to the voxels above ``foreground_threshold`` when
    set, resize to the model's input size (``trilinear``: MONAI's ``Resize``; ``antialiased``:
    scikit-image's ``resize`` with anti-aliasing, as FLARE's reference).
    """

    window: tuple[float, float] | None = None
    scale: str = "minmax"
    orientation: str | None = None
    first_frame: bool = False
    spacing: tuple[float, float, float] | None = None
    foreground_threshold: float | None = 0.0
    resize: str = "trilinear"

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale={self.scale!r}: one of {SCALES}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize={self.resize!r}: one of {RESIZES}")
        if self.scale == "window" and self.window is None:
            raise ValueError("scale='window' needs a window")
        object.__setattr__(self, "window", window_range(self.window))
        object.__setattr__(self, "spacing", _floats(self.spacing, 3, "spacing"))
        object.__setattr__(self, "orientation", check_orientation(self.orientation))

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": list(self.window) if self.window else None,
            "scale": self.scale,
            "orientation": self.orientation,
            "first_frame": self.first_frame,
            "spacing": list(self.spacing) if self.spacing else None,
            "foreground_threshold": self.foreground_threshold,
            "resize": self.resize,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SourcePreprocessing:
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown preprocessing settings {sorted(unknown)}")
        return cls(**values)

    def differences(self, other: SourcePreprocessing) -> list[str]:
        """``"<setting>: <self> vs <other>"`` for every setting that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key}: {mine[key]} vs {theirs[key]}" for key in mine if mine[key] != theirs[key]]


@dataclass(frozen=True)
class Preprocessing:
    """What a prepared folder's volumes went through, per named source, and the ``prepare`` settings
    that made them: ``prepare`` writes it into ``manifest.json``, every artifact trained on the
    folder records it, ``infer``, ``evaluate`` and the web page apply it."""

    dataset: str
    sources: Mapping[str, SourcePreprocessing]
    prepare: Mapping[str, Any] = field(default_factory=dict)
    inferred: bool = False
    """True when reconstructed for an artifact or folder that recorded none (an older version)."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("preprocessing needs at least one source")

    def source(self, name: str | None = None) -> tuple[str, SourcePreprocessing]:
        """The source ``name``; without one, the only source (or the first, when all are the same)."""
        if name is not None:
            if name not in self.sources:
                raise ValueError(f"source={name!r}: this model knows the sources {sorted(self.sources)}")
            return name, self.sources[name]
        first, spec = next(iter(self.sources.items()))
        if any(other != spec for other in self.sources.values()):
            raise ValueError(
                f"this model was trained on several sources prepared differently "
                f"({', '.join(self.sources)}): pass source=<one of them>"
            )
        return first, spec

    def for_input(self, source: str | None = None, window: WindowSpec = None) -> SourcePreprocessing:
        """The recipe a new scan gets: ``source``'s, with ``window`` instead of its own when one is given
        (``"none"``: min-max); a window other than the recorded one is allowed, with a warning naming
        both."""
        name, spec = self.source(source)
        if window is None:
            return spec
        chosen = window_range(window)
        if chosen != spec.window:
            log.warning(
                "intensity.window=%s differs from the window this model's %s data was prepared with "
                "(%s): the model sees other intensities than in training",
                window,
                name,
                list(spec.window) if spec.window else "none: min-max",
            )
        return replace(spec, window=chosen, scale="window" if chosen else "minmax")

    def with_orientations(self, orientations: Mapping[str, str]) -> Preprocessing:
        """The recipes with the voxel order each source's files store, for sources read in it
        (orientation ``None``): the order a new scan is reoriented to."""
        sources = {
            name: replace(spec, orientation=orientations.get(name)) if spec.orientation is None else spec
            for name, spec in self.sources.items()
        }
        return replace(self, sources=sources)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "sources": {k: v.to_dict() for k, v in self.sources.items()},
            "prepare": dict(self.prepare),
            "inferred": self.inferred,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        return cls(
            str(values["dataset"]),
            {str(k): SourcePreprocessing.from_dict(v) for k, v in dict(values["sources"]).items()},
            dict(values.get("prepare") or {}),
            bool(values.get("inferred", False)),
        )


AIR_HU = (-1100.0, -800.0)
"""Where :func:`air_level` lies for a CT in Hounsfield units."""


def air_level(volume: np.ndarray, stride: int = 4) -> float:
    """The 1st percentile of every ``stride``-th voxel along each axis, leaving out the minimum's voxels.

    A CT in HU has air (around the body, in airways, lungs and bowel) near -1000, so this lies within
    :data:`AIR_HU`; shifted by an intercept applied twice or not at all it moves by 1024, and an MRI's
    dark background sits near 0. The value a scanner writes outside its field of view (one value,
    the minimum) is left out.
    """
    sample = np.asarray(volume[(slice(None, None, stride),) * volume.ndim])
    above = sample[sample > sample.min()]
    return float(np.percentile(above if above.size else sample, 1))


def looks_like_ct(volume: np.ndarray) -> bool:
    """Intensities of a CT in Hounsfield units: air near -1000 HU (:func:`air_level`) and tissue or
    bone above 200 HU. An MRI (arbitrary units, background near 0) or a CT stored without its rescale
    has no air at -1000, and a CT window makes nonsense of it: under the soft-tissue window an MRI's
    background becomes 0.4 and the foreground crop keeps everything."""
    return AIR_HU[0] <= air_level(volume) <= AIR_HU[1] and float(np.max(volume)) > 200


def _finite(volume: np.ndarray, source: str | os.PathLike) -> np.ndarray:
    volume = np.asarray(volume, dtype=np.float32)
    if volume.size == 0:
        raise DataError(source, f"empty volume, shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise DataError(source, "volume contains NaN or Inf values")
    return volume


def apply_window(
    volume: np.ndarray, low: float, high: float, source: str | os.PathLike = "<array>"
) -> np.ndarray:
    """Clip to ``[low, high]`` and scale to float32 [0, 1]; NaN/Inf is bad input."""
    clipped = np.clip(_finite(volume, source), np.float32(low), np.float32(high))
    return (clipped - np.float32(low)) * np.float32(1.0 / (high - low))


def minmax_normalize(volume: np.ndarray, source: str | os.PathLike = "<array>") -> np.ndarray:
    """Scale to float32 in [0, 1]; a constant volume (no contrast) or NaN/Inf is bad input."""
    volume = _finite(volume, source)
    low, high = float(volume.min()), float(volume.max())
    if high <= low:
        raise DataError(source, f"constant volume (every voxel is {low:g}); nothing to normalise")
    return (volume - np.float32(low)) * np.float32(1.0 / (high - low))


def scale_intensity(
    volume: np.ndarray,
    spec: SourcePreprocessing,
    source: str | os.PathLike = "<array>",
) -> np.ndarray:
    """``spec``'s window clip and scale to [0, 1]."""
    if spec.scale == "window":
        return apply_window(volume, *spec.window, source)
    if spec.window is not None:
        volume = np.clip(_finite(volume, source), np.float32(spec.window[0]), np.float32(spec.window[1]))
    return minmax_normalize(volume, source)


def foreground_box(volume: np.ndarray, threshold: float = 0.0) -> tuple[slice, ...]:
    """The bounding box of voxels ``> threshold`` (the whole volume if none)."""
    mask = volume > threshold
    if not mask.any():
        return tuple(slice(0, n) for n in volume.shape)
    box = []
    for axis in range(volume.ndim):
        others = tuple(a for a in range(volume.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def crop_foreground(volume: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Crop ``(D, H, W)`` to the bounding box of voxels ``> threshold`` (whole volume if none)."""
    return volume[foreground_box(volume, threshold)]


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


def resample_to_spacing(volume: np.ndarray, spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """Trilinear resampling of ``(D, H, W)`` from voxel ``spacing`` to ``target`` (mm): each axis gets
    ``floor(n * spacing / target)`` voxels, as CT-CLIP's ``resize_array`` computes them."""
    size = [max(1, int(n * s / t)) for n, s, t in zip(volume.shape, spacing, target)]
    return resize_trilinear(volume, size)


def resize_volume(volume: np.ndarray, spatial_size: Sequence[int], method: str = "trilinear") -> np.ndarray:
    """``volume`` at ``spatial_size`` by ``method`` (see :class:`SourcePreprocessing`)."""
    if method == "antialiased":
        return resize_antialiased(volume, spatial_size_tuple(spatial_size))
    return resize_trilinear(volume, spatial_size)


def preprocess_volume(
    volume: np.ndarray,
    spatial_size: Sequence[int],
    spec: SourcePreprocessing = SourcePreprocessing(),
    source: str | os.PathLike = "<array>",
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """A read ``(D, H, W)`` array of any dtype -> float32 ``spatial_size`` volume in [0, 1] by ``spec``
    (from the resampling on; ``spacing`` is the array's voxel spacing, needed when ``spec`` resamples).
    ``source`` names the input in errors."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise DataError(source, f"expected a 3D (D, H, W) volume, got shape {volume.shape}")
    if spec.spacing is not None:
        if spacing is None:
            raise DataError(source, f"resampling to {list(spec.spacing)} mm needs the scan's voxel spacing")
        volume = resample_to_spacing(_finite(volume, source), spacing, spec.spacing)
    scaled = scale_intensity(volume, spec, source)
    if spec.foreground_threshold is not None:
        scaled = crop_foreground(scaled, spec.foreground_threshold)
    resized = resize_volume(scaled, spatial_size, spec.resize)
    # Interpolation is a convex combination, so only float rounding can leave [0, 1].
    return np.clip(resized, 0.0, 1.0, out=resized)


@dataclass(frozen=True)
class PreparedScan:
    """A scan as read (``(D, H, W)`` in the source's orientation, as stored) and as the model receives it."""

    raw: np.ndarray
    volume: np.ndarray
    hu_unwindowed: bool  # raw CT in HU min-maxed for want of a window
    already_prepared: bool = False  # a volume prepare wrote, used as it is
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # of ``raw``, mm, (D, H, W)
    unlike_ct: bool = False  # a CT window applied to intensities that do not look like CT


def prepare_scan(
    path: str | os.PathLike,
    spatial_size: Sequence[int],
    spec: SourcePreprocessing = SourcePreprocessing(),
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> PreparedScan:
    """One scan (any format of ``data.scans``) through ``spec``: the one code path of ``prepare``,
    ``infer`` and the app."""
    scan = load_scan(path, max_voxels, spec.orientation, spec.first_frame)
    volume = preprocess_volume(scan.array, spatial_size, spec, path, scan.spacing)
    return PreparedScan(
        scan.array,
        volume,
        spec.window is None and looks_like_ct(scan.array),
        spacing=scan.spacing,
        unlike_ct=spec.window is not None and not looks_like_ct(scan.array),
    )


def model_input(
    path: str | os.PathLike,
    input_size: Sequence[int],
    spec: SourcePreprocessing,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> PreparedScan:
    """What a model of ``input_size`` trained on ``spec``'s data receives from the file at ``path``
    (``infer`` and the web page).

    A volume ``prepare`` wrote (``.npy``, or a NIfTI with its header mark) is read as it is and must
    have the model's size; any other scan (``data.scans``: NIfTI, NRRD, MetaImage, a DICOM folder; up
    to ``max_voxels``) goes through exactly ``prepare``'s steps (:func:`prepare_scan`). A raw-HU scan
    without a window is min-maxed, and a scan that does not look like CT gets a CT window, each with a
    warning naming the setting.
    """
    if is_prepared(path):
        volume = read_volume(path, shape=tuple(input_size))
        return PreparedScan(volume, volume, hu_unwindowed=False, already_prepared=True)
    scan = prepare_scan(path, input_size, spec, max_voxels)
    if scan.hu_unwindowed:
        log.warning(
            "%s looks like raw CT in Hounsfield units and neither the model nor intensity.window sets a "
            "window: it was min-max normalised, which squeezes soft tissue into a sliver of [0, 1]; pass "
            "the window the training data was prepared with (e.g. intensity.window=soft_tissue)",
            path,
        )
    if scan.unlike_ct:
        log.warning(
            "%s does not look like CT in Hounsfield units (no air near -1000: its 1st percentile is %g, "
            "maximum %g): the CT window [%g, %g] HU maps it to intensities unlike the model's training "
            "data; for an MRI or another non-CT scan pass intensity.window=none (min-max)",
            path,
            air_level(scan.raw),
            float(np.max(scan.raw)),
            *spec.window,
        )
    return scan
