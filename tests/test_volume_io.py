"""The single volume reader/writer and atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from med3dvlm.data.errors import DataError
from med3dvlm.data.volume_io import read_volume, read_volume_raw, write_volume
from med3dvlm.utils.atomic import atomic_path, atomic_write_text


@pytest.mark.parametrize(
    "suffix,npy_dtype,tolerance",
    [(".npy", "uint8", 1 / 510 + 1e-7), (".npy", "float16", 2**-12), (".nii.gz", "uint8", 0.0)],
)
def test_round_trip_within_documented_error(tmp_path, suffix, npy_dtype, tolerance):
    volume = np.random.default_rng(0).random((6, 7, 8), dtype=np.float32)
    path = tmp_path / f"v{suffix}"
    write_volume(path, volume, npy_dtype=npy_dtype)
    back = read_volume(path, shape=(6, 7, 8))
    assert back.dtype == np.float32 and back.shape == (6, 7, 8)
    assert np.abs(back - volume).max() <= tolerance


def test_bad_volumes_name_the_file(tmp_path):
    volume = np.zeros((4, 4, 4), dtype=np.float32)
    good = tmp_path / "good.npy"
    write_volume(good, volume)
    with pytest.raises(DataError, match="good.npy: wrong shape"):
        read_volume(good, shape=(4, 4, 5))
    truncated = tmp_path / "cut.npy"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(DataError, match="cut.npy: unreadable or truncated"):
        read_volume(truncated)
    with pytest.raises(DataError, match="missing.npy: file not found"):
        read_volume(tmp_path / "missing.npy")
    nan = volume.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="nan.npy: volume contains NaN or Inf"):
        write_volume(tmp_path / "nan.npy", nan)


def test_atomic_write_leaves_nothing_on_failure_and_normal_permissions(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    atomic_write_text(target, "whole")
    umask = os.umask(0)
    os.umask(umask)
    assert target.read_text() == "whole" and (target.stat().st_mode & 0o777) == 0o666 & ~umask


def test_a_prepared_nifti_of_the_wrong_size_is_refused_from_its_header(tmp_path):
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((2048, 2048, 1024))  # (W, H, D): 4 Gi voxels claimed, 1 KiB held
    path = tmp_path / "M3D_Cap" / "prepared.nii.gz"
    path.parent.mkdir()
    with gzip.open(path, "wb") as fh:
        fh.write(header.binaryblock + b"\0" * 4 + b"\0" * 1024)
    with pytest.raises(
        DataError, match=r"prepared.nii.gz: wrong shape \(1024, 2048, 2048\), expected \(8, 16, 16\)"
    ):
        read_volume_raw(path, shape=(8, 16, 16))
