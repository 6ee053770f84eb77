"""The user's own scans, in the formats hospitals and toolkits export, as ``(D, H, W)`` arrays.

* NIfTI (``.nii``, ``.nii.gz``): nibabel (the fastest reader here);
* NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and DICOM series (a folder of
  slices): MONAI's readers (``NrrdReader``, ``ITKReader``, ``PydicomReader``; the optional
  ``scans`` extra installs pynrrd, ITK and pydicom). DICOM slices are sorted by position and
  their rescale slope and intercept applied, so CT comes in Hounsfield units.

A scan is returned as ``(D, H, W)``: the voxel axes ``(k, j, i)`` of the NIfTI convention, so
``(z, y, x)`` for an axial acquisition. ``orientation`` names the voxel order the caller wants, as
the axis codes of ``(i, j, k)`` = ``(W, H, D)`` (nibabel's convention): ``"RAS"`` (the closest
canonical orientation: W runs to the patient's right, H to anterior, D to superior), ``"LPI"`` (M3D's
display order: W to the patient's left, H to posterior, D to inferior), any other permutation of
one letter of each pair, or ``None`` for the order the file stores (what SimpleITK's
``GetArrayFromImage`` gives, and what the FLARE and CT-RATE reference code reads). Its size is read
from the header (NIfTI, NRRD and MetaImage headers, each DICOM slice's rows, columns and frames) and
checked against ``max_voxels`` before any voxel is read or decompressed.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from med3dvlm.data.errors import DataError

log = logging.getLogger(__name__)

try:
    from isal import igzip as _igzip
except ImportError:  # optional speed-up; zlib through nibabel otherwise
    _igzip = None

DEFAULT_MAX_VOXELS = (
    1 << 30
)  # 1 Gi voxels (a 512x512x4096 CT; 4 GiB as float32); one scan per worker at a time
SUFFIXES: dict[str, str] = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
}
# Format -> (the module MONAI's reader needs, the package that provides it).
_NEEDS = {"nrrd": ("nrrd", "pynrrd"), "metaimage": ("itk", "itk"), "dicom": ("pydicom", "pydicom")}
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"


def check_voxels(shape: Iterable[int], max_voxels: int, source: str | os.PathLike) -> None:
    """Refuse a scan whose header claims more than ``max_voxels`` voxels."""
    shape = [int(n) for n in shape]
    count = math.prod(shape)
    if count > max_voxels:
        raise DataError(
            source,
            f"the header claims {'x'.join(map(str, shape))} = {count:,} voxels, more than "
            f"max_voxels={max_voxels:,} (raise max_voxels to read larger scans)",
        )


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and _is_dicom(p))


def scan_format(path: str | os.PathLike) -> str | None:
    """``nifti``, ``nrrd``, ``metaimage`` or ``dicom`` (a folder of DICOM files); ``None`` otherwise."""
    path = Path(path)
    if path.is_dir():
        return "dicom" if dicom_files(path) else None
    name = path.name.lower()
    return next((kind for suffix, kind in SUFFIXES.items() if name.endswith(suffix)), None)


def missing_reader(kind: str) -> str | None:
    """What to install for ``kind`` when its reader's package is missing, else ``None``."""
    if kind not in _NEEDS:
        return None
    module, package = _NEEDS[kind]
    if importlib.util.find_spec(module) is None:
        return f"reading {kind} scans needs {package}: pip install 'med3dvlm[scans]'"
    return None


ORIENTATION_PAIRS: tuple[str, ...] = ("LR", "PA", "IS")


def check_orientation(orientation: str | None) -> str | None:
    """``orientation`` upper-cased if it names one letter of each of L/R, P/A, I/S (or is ``None``)."""
    if orientation is None:
        return None
    codes = str(orientation).upper()
    pairs = sorted(
        next((i for i, pair in enumerate(ORIENTATION_PAIRS) if code in pair), -1) for code in codes
    )
    if pairs != [0, 1, 2]:
        raise ValueError(
            f"orientation={orientation!r}: three axis codes, one of each of L/R, P/A, I/S "
            "(e.g. RAS, LPS, LPI), or null for the stored order"
        )
    return codes


def axis_codes(affine: np.ndarray) -> str:
    """The axis codes of the voxel axes ``(i, j, k)`` of an affine, e.g. ``"LPS"``."""
    import nibabel as nib

    return "".join(nib.orientations.aff2axcodes(affine))


@dataclass(frozen=True)
class Scan:
    """A scan as ``(D, H, W)`` in the requested orientation, its voxel spacing in mm in the same
    order, and the axis codes its file stores (``None`` where the format has no orientation)."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    stored_axes: str | None


def reorient_to_dhw(data: np.ndarray, affine: np.ndarray, orientation: str | None) -> Scan:
    """An ``(i, j, k)`` array with its affine -> ``(D, H, W) = (k, j, i)`` in ``orientation`` (see the
    module docstring; ``None``: as stored)."""
    import nibabel as nib

    spacing = [float(z) for z in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))]
    if orientation is not None:
        current = nib.orientations.io_orientation(affine)
        wanted = nib.orientations.axcodes2ornt(tuple(check_orientation(orientation)))
        transform = nib.orientations.ornt_transform(current, wanted)
        data = nib.orientations.apply_orientation(data, transform)
        moved = [0.0, 0.0, 0.0]
        for axis, (target, _) in enumerate(transform):
            moved[int(target)] = spacing[axis]
        spacing = moved
    return Scan(
        np.ascontiguousarray(data.transpose(2, 1, 0)),
        (spacing[2], spacing[1], spacing[0]),
        axis_codes(affine),
    )


def _frames(path: Path, shape: tuple[int, ...], first_frame: bool) -> tuple[int, ...]:
    """The 3-D shape read from a stored ``shape``: trailing singleton axes squeezed; several frames
    refused, or the first one taken with ``first_frame`` (FLARE's reference takes index 0)."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4 and first_frame:
        return shape[:3]
    if len(shape) != 3:
        hint = "" if len(shape) != 4 else " (a series of several frames; first_frame takes the first)"
        raise DataError(path, f"expected a 3D volume, got shape {tuple(shape)}{hint}")
    return shape


def _nifti_data(path: Path, image: Any) -> np.ndarray:
    """The stored array of a NIfTI ``image`` read from ``path``, as nibabel's ``dataobj`` gives it.

    A gzipped file without intensity scaling is decompressed with ISA-L (``isal``, 2-3x faster than
    zlib, which is most of reading a CT) and viewed in place (read-only) where nibabel's array proxy
    says the data lie; anything else, or without ``isal``, goes through nibabel.
    """
    proxy = image.dataobj
    scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
    if path.suffix != ".gz" or _igzip is None or scaled or not hasattr(proxy, "offset"):
        return np.asanyarray(proxy)
    buffer = _igzip.decompress(path.read_bytes())
    return np.frombuffer(buffer, proxy.dtype, math.prod(proxy.shape), int(proxy.offset)).reshape(
        proxy.shape, order=proxy.order
    )


def load_nifti_as_dhw(
    path: str | os.PathLike,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    orientation: str | None = "RAS",
    first_frame: bool = False,
) -> np.ndarray:
    """The array of :func:`load_nifti`."""
    return load_nifti(path, max_voxels, orientation, first_frame).array


def load_nifti(
    path: str | os.PathLike,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    orientation: str | None = "RAS",
    first_frame: bool = False,
) -> Scan:
    """A 3D NIfTI as ``(D, H, W)`` in ``orientation`` (default the closest canonical, RAS+).

    Trailing singleton dimensions (``(x, y, z, 1)``) are squeezed; a true 4D series (several
    frames) is rejected rather than silently reduced to one frame, unless ``first_frame``. The
    header's size is checked against ``max_voxels`` before the data is decompressed.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        image = nib.load(str(path))
        shape = _frames(path, tuple(image.shape), first_frame)
        check_voxels(shape, max_voxels, path)
        data = _nifti_data(path, image)
        data = data.reshape(data.shape[:3] + (-1,))[..., 0] if data.ndim > 3 else data
    except DataError:
        raise
    except Exception as exc:  # nibabel/gzip/numpy raise many types for truncated or corrupt files
        raise DataError(path, f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})") from exc
    return reorient_to_dhw(data, image.affine, orientation)


def _header_shape(path: Path, kind: str) -> list[int]:
    """The voxel grid a header claims, read without touching the voxels."""
    if kind == "nrrd":
        import nrrd

        return [int(n) for n in nrrd.read_header(str(path))["sizes"]]
    if kind == "metaimage":
        with open(path, "rb") as fh:
            head = fh.read(8192).decode("latin-1")
        match = re.search(r"^\s*DimSize\s*=\s*([\d ]+)$", head, re.MULTILINE)
        if not match:
            raise DataError(path, "MetaImage header without DimSize")
        return [int(n) for n in match.group(1).split()]
    import pydicom

    total = 0
    for file in dicom_files(path):
        header = pydicom.dcmread(file, stop_before_pixels=True)
        total += (
            int(header.get("Rows", 0))
            * int(header.get("Columns", 0))
            * int(header.get("NumberOfFrames", 1) or 1)
        )
    return [total]


def read_scan(
    path: str | os.PathLike,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    orientation: str | None = "RAS",
    first_frame: bool = False,
) -> np.ndarray:
    """The array of :func:`load_scan`."""
    return load_scan(path, max_voxels, orientation, first_frame).array


def load_scan(
    path: str | os.PathLike,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    orientation: str | None = "RAS",
    first_frame: bool = False,
) -> Scan:
    """A scan of any supported format (``SUPPORTED``) as ``(D, H, W)`` in ``orientation`` (module
    docstring), with its stored values (HU for CT) and spacing."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    kind = scan_format(path)
    if kind is None:
        raise DataError(path, f"not a supported scan: expected {SUPPORTED}")
    if kind == "nifti":
        return load_nifti(path, max_voxels, orientation, first_frame)
    needed = missing_reader(kind)
    if needed:
        raise DataError(path, needed)
    from monai.data import ITKReader, NrrdReader, PydicomReader

    try:
        check_voxels(_header_shape(path, kind), max_voxels, path)
        reader = {"nrrd": NrrdReader, "metaimage": ITKReader, "dicom": PydicomReader}[kind]()
        data, meta = reader.get_data(reader.read(str(path)))
        data = np.asarray(data)
        data = data.reshape(_frames(path, data.shape, first_frame) + (-1,))[..., 0]
        return reorient_to_dhw(data, np.asarray(meta["affine"], dtype=np.float64), orientation)
    except DataError:
        raise
    except Exception as exc:  # each reader raises its own types for broken files
        raise DataError(path, f"unreadable {kind} scan ({type(exc).__name__}: {exc})") from exc


def stored_orientation(paths: list[Path], sampled: int = 64) -> str | None:
    """The voxel order most of the first ``sampled`` NIfTI ``paths`` store (their headers), or ``None``."""
    import nibabel as nib

    found: Counter[str] = Counter()
    for path in paths[:sampled]:
        try:
            found[axis_codes(nib.load(str(path)).affine)] += 1
        except Exception as exc:  # noqa: BLE001 (nibabel raises many types; preparing it reports the file)
            log.debug("%s: header unreadable (%s); its voxel order is not counted", path, exc)
    return found.most_common(1)[0][0] if found else None
