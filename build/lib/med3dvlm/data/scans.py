"""The user's own scans, in the formats hospitals and toolkits export, as ``(D, H, W)`` arrays.

* NIfTI (``.nii``, ``.nii.gz``): nibabel (the fastest reader here);
* NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``) and DICOM series (a folder of
  slices): MONAI's readers (``NrrdReader``, ``ITKReader``, ``PydicomReader``; the optional
  ``scans`` extra installs pynrrd, ITK and pydicom). DICOM slices are sorted by position and
  their rescale slope and intercept applied, so CT comes in Hounsfield units.

Every scan is reoriented to the closest canonical (RAS+) orientation and returned as
``(D, H, W) = (z, y, x)``, whatever its on-disk axis order. Its size is read from the header (NIfTI,
NRRD and MetaImage headers, each DICOM slice's rows, columns and frames) and checked against
``max_voxels`` before any voxel is read or decompressed.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from med3dvlm.data.errors import DataError

DEFAULT_MAX_VOXELS = 1 << 30  # 1 Gi voxels (a 512x512x4096 CT; 4 GiB as float32); one scan per worker at a time
SUFFIXES: dict[str, str] = {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd",
                            ".mha": "metaimage", ".mhd": "metaimage"}
# Format -> (the module MONAI's reader needs, the package that provides it).
_NEEDS = {"nrrd": ("nrrd", "pynrrd"), "metaimage": ("itk", "itk"), "dicom": ("pydicom", "pydicom")}
SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"


def check_voxels(shape: Iterable[int], max_voxels: int, source: str | os.PathLike) -> None:
    """Refuse a scan whose header claims more than ``max_voxels`` voxels."""
    shape = [int(n) for n in shape]
    count = math.prod(shape)
    if count > max_voxels:
        raise DataError(source, f"the header claims {'x'.join(map(str, shape))} = {count:,} voxels, more than "
                                f"max_voxels={max_voxels:,} (raise max_voxels to read larger scans)")


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


def to_canonical_dhw(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """An ``(x, y, z)`` array with a RAS affine -> ``(z, y, x)`` in the closest canonical orientation."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    canonical = nib.orientations.apply_orientation(data, ornt)
    return np.ascontiguousarray(canonical.transpose(2, 1, 0))


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
        total += int(header.get("Rows", 0)) * int(header.get("Columns", 0)) * int(header.get("NumberOfFrames", 1) or 1)
    return [total]


def read_scan(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> np.ndarray:
    """A scan of any supported format (``SUPPORTED``) as canonical ``(D, H, W)``, as stored (HU for CT)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    kind = scan_format(path)
    if kind is None:
        raise DataError(path, f"not a supported scan: expected {SUPPORTED}")
    if kind == "nifti":
        return load_nifti_as_dhw(path, max_voxels)
    needed = missing_reader(kind)
    if needed:
        raise DataError(path, needed)
    from monai.data import ITKReader, NrrdReader, PydicomReader

    try:
        check_voxels(_header_shape(path, kind), max_voxels, path)
        reader = {"nrrd": NrrdReader, "metaimage": ITKReader, "dicom": PydicomReader}[kind]()
        data, meta = reader.get_data(reader.read(str(path)))
        data = np.asarray(data)
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise DataError(path, f"expected a 3D volume, got shape {data.shape}")
        return to_canonical_dhw(data, np.asarray(meta["affine"], dtype=np.float64))
    except DataError:
        raise
    except Exception as exc:  # each reader raises its own types for broken files
        raise DataError(path, f"unreadable {kind} scan ({type(exc).__name__}: {exc})") from exc
