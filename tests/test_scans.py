"""The user's own CT: NIfTI, NRRD, MetaImage and DICOM series read to one canonical volume, HU
windows, the MONAI reference of the preprocessing, and infer's one code path with prepare."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import monai.transforms as mtf
import nibabel as nib
import numpy as np
import pytest

from med3dvlm.data.errors import DataError
from med3dvlm.data.preparation import prepare_dataset
from med3dvlm.data.preprocess import (
    WINDOWS,
    SourcePreprocessing,
    model_input,
    prepare_scan,
    preprocess_volume,
    window_range,
)
from med3dvlm.data.scans import load_nifti_as_dhw, read_scan, scan_format
from med3dvlm.data.volume_io import is_prepared, read_volume

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
SPACING = (0.7, 0.8, 2.5)  # x, y, z in mm
SIZE = (8, 16, 16)


def ct_volume(shape: tuple[int, int, int] = (14, 12, 10), seed: int = 0) -> np.ndarray:
    """An (x, y, z) int16 CT in HU: air around a body of fat and soft tissue with a bone."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    volume = np.full(shape, -1000.0)
    volume[x**2 + y**2 < 0.8] = -100.0
    volume[(x - 0.2) ** 2 + y**2 < 0.3] = 50.0
    volume[(x + 0.4) ** 2 + (y + 0.3) ** 2 < 0.02] = 900.0
    volume += rng.normal(0, 10, shape) + 3.0 * z  # the z ramp makes the slice order visible
    return np.round(volume).astype(np.int16)


def write_nifti(path: Path, volume: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(volume, np.diag([*SPACING, 1.0])), str(path))
    return path


def write_nrrd(path: Path, volume: np.ndarray) -> Path:
    import nrrd

    directions = np.diag([-SPACING[0], -SPACING[1], SPACING[2]])  # RAS axes written in LPS space
    nrrd.write(
        str(path),
        volume,
        {"space": "left-posterior-superior", "space directions": directions, "space origin": np.zeros(3)},
    )
    return path


def write_mha(path: Path, volume: np.ndarray) -> Path:
    import itk

    image = itk.image_from_array(np.ascontiguousarray(volume.transpose(2, 1, 0)))  # ITK arrays are (z, y, x)
    image.SetSpacing(SPACING)
    image.SetDirection(np.diag([-1.0, -1.0, 1.0]))  # LPS
    itk.imwrite(image, str(path))
    return path


def write_dicom_series(folder: Path, volume: np.ndarray) -> Path:
    """A CT series: one file per z, stored as HU + 1024 (signed) with the rescale intercept -1024,
    with file names and instance numbers out of order (a reader must sort by position)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series, study = generate_uid(), generate_uid()
    depth = volume.shape[2]
    for k in range(depth):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{(k * 7) % depth:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.PatientName, ds.PatientID, ds.InstanceNumber = "Phantom^Test", "0", depth - k
        ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]  # rows along -L (= +R), columns along -P (= +A)
        ds.ImagePositionPatient = [0, 0, SPACING[2] * k]
        ds.PixelSpacing = [SPACING[1], SPACING[0]]  # between rows (y), between columns (x)
        ds.SliceThickness = SPACING[2]
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (volume[:, :, k].T.astype(np.int32) + 1024).astype(np.int16).tobytes()
        ds.save_as(ds.filename, enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("scans")
    volume = ct_volume()
    return {
        "nifti": write_nifti(root / "ct.nii.gz", volume),
        "nrrd": write_nrrd(root / "ct.nrrd", volume),
        "metaimage": write_mha(root / "ct.mha", volume),
        "dicom": write_dicom_series(root / "ct_dicom", volume),
    }


def test_every_format_reads_to_the_same_canonical_volume(scans):
    reference = load_nifti_as_dhw(scans["nifti"])
    assert reference.shape == (10, 12, 14) and reference.min() < -900  # (z, y, x), HU as stored
    for kind, path in scans.items():
        assert scan_format(path) == kind
        np.testing.assert_array_equal(read_scan(path), reference, err_msg=kind)


def test_a_header_claiming_too_many_voxels_is_refused_in_every_format(scans):
    for path in scans.values():
        with pytest.raises(DataError, match=rf"{path.name}: the header claims .* more than max_voxels=1,000"):
            read_scan(path, max_voxels=1000)


def test_preprocessing_matches_monai_crop_foreground_and_resize():
    rng = np.random.default_rng(0)
    real = [
        load_nifti_as_dhw(NIBABEL_DATA / "anatomical.nii"),
        load_nifti_as_dhw(NIBABEL_DATA / "standard.nii.gz"),
        ct_volume((40, 33, 21)).transpose(2, 1, 0),
    ]
    random = []
    for shape in ((20, 33, 41), (7, 64, 50), (64, 9, 30)):
        volume = rng.random(shape).astype(np.float32)
        volume[:2], volume[:, :5], volume[..., -3:] = 0.0, 0.0, 0.0  # a border for the crop to remove
        random.append(volume)
    for size in ((8, 16, 16), (16, 32, 24)):
        for volume in [*real, *random]:
            minmax = mtf.Compose(
                [
                    mtf.ScaleIntensity(minv=0.0, maxv=1.0),
                    mtf.CropForeground(allow_smaller=True),
                    mtf.Resize(spatial_size=size, mode="trilinear"),
                ]
            )
            expected = np.asarray(minmax(volume.astype(np.float32)[None]))[0]
            np.testing.assert_allclose(preprocess_volume(volume, size), expected, atol=1e-5)
        for name in WINDOWS:
            low, high = window_range(name)
            windowed = mtf.Compose(
                [
                    mtf.ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
                    mtf.CropForeground(allow_smaller=True),
                    mtf.Resize(spatial_size=size, mode="trilinear"),
                ]
            )
            volume = real[2].astype(np.float32)
            expected = np.asarray(windowed(volume[None]))[0]
            spec = SourcePreprocessing(window=(low, high), scale="window")
            np.testing.assert_allclose(preprocess_volume(volume, size, spec), expected, atol=1e-5)


def test_window_presets_and_explicit_ranges():
    assert window_range("soft_tissue") == (-160.0, 240.0) and window_range("lung") == (-1350.0, 150.0)
    assert window_range("bone") == (-500.0, 1300.0) and window_range("brain") == (0.0, 80.0)
    assert window_range([-100, 300]) == (-100.0, 300.0)
    assert window_range(None) is None and window_range("none") is None
    with pytest.raises(ValueError, match="intensity.window='abdomen'"):
        window_range("abdomen")
    with pytest.raises(ValueError, match=r"low < high"):
        window_range([300, -100])


def _own_csv(path: Path, scan: Path) -> Path:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("image", "report"), (str(scan), "A CT of the abdomen.")])
    return path


def test_a_raw_hu_ct_prepares_with_a_window_and_without_one_says_which(scans, tmp_path, caplog):
    for kind in ("nifti", "dicom"):
        listing = _own_csv(tmp_path / f"{kind}.csv", scans[kind])
        with caplog.at_level(logging.WARNING, logger="med3dvlm.data.preparation"):
            bare = prepare_dataset(
                listing,
                tmp_path / f"{kind}_bare",
                spatial_size=SIZE,
                format="nii.gz",
                workers=0,
                progress=False,
                split={"train": 1.0},
            )
        assert (
            "look like raw CT in Hounsfield units" in caplog.text
            and "intensity.window=soft_tissue" in caplog.text
        )
        assert bare["intensity"] == {"window": None, "hu_like_min_maxed": 1}
        assert bare["preprocessing"]["sources"]["own"]["window"] is None
        caplog.clear()
        out = tmp_path / f"{kind}_soft"
        manifest = prepare_dataset(
            listing,
            out,
            spatial_size=SIZE,
            format="nii.gz",
            workers=0,
            progress=False,
            split={"train": 1.0},
            window="soft_tissue",
        )
        assert "Hounsfield" not in caplog.text
        assert manifest["intensity"] == {"window": "soft_tissue", "hu_like_min_maxed": 0}
        soft = SourcePreprocessing.from_dict(manifest["preprocessing"]["sources"]["own"])
        assert soft == SourcePreprocessing(window=(-160.0, 240.0), scale="window", orientation="RAS")
        (image,) = manifest["volumes"]
        prepared = read_volume(out / image, SIZE)
        np.testing.assert_allclose(prepared, prepare_scan(scans[kind], SIZE, soft).volume, atol=1e-6)
        assert is_prepared(out / image) and not is_prepared(scans["nifti"])
        # One code path: infer gives the model what prepare wrote, for the raw scan and for the prepared file.
        np.testing.assert_allclose(model_input(scans[kind], SIZE, soft).volume, prepared, atol=1e-6)
        np.testing.assert_array_equal(model_input(out / image, SIZE, soft).volume, prepared)
    explicit = prepare_dataset(
        _own_csv(tmp_path / "none.csv", scans["nifti"]),
        tmp_path / "none",
        spatial_size=SIZE,
        workers=0,
        progress=False,
        split={"train": 1.0},
        window="none",
    )
    assert explicit["intensity"]["window"] == "none"


def test_a_changed_window_prepares_the_volume_again(scans, tmp_path):
    listing = _own_csv(tmp_path / "own.csv", scans["nrrd"])
    options = {
        "spatial_size": SIZE,
        "format": "npy",
        "workers": 0,
        "progress": False,
        "split": {"train": 1.0},
    }
    first = prepare_dataset(listing, tmp_path / "out", window="soft_tissue", **options)
    second = prepare_dataset(listing, tmp_path / "out", window="bone", **options)
    (image,) = first["volumes"]
    assert first["volumes"][image]["sha256"] != second["volumes"][image]["sha256"]


def test_a_window_on_m3d_slices_is_refused(tmp_path):
    (tmp_path / "M3D_Cap").mkdir()
    with pytest.raises(ValueError, match="M3D-Cap's slices are display-windowed"):
        prepare_dataset(tmp_path, tmp_path / "out", window="soft_tissue")


def test_unsupported_scans_and_missing_readers_name_the_file(tmp_path, monkeypatch):
    listing = tmp_path / "own.csv"
    (tmp_path / "scan.dcm.zip").write_bytes(b"PK")
    _own_csv(listing, tmp_path / "scan.dcm.zip")
    with pytest.raises(DataError, match=r"scan.dcm.zip: not a supported scan \(expected NIfTI"):
        prepare_dataset(listing, tmp_path / "out", workers=0, progress=False)
    import med3dvlm.data.scans as scans_module

    monkeypatch.setattr(scans_module.importlib.util, "find_spec", lambda name: None)
    write_nrrd(tmp_path / "ct.nrrd", ct_volume())
    _own_csv(listing, tmp_path / "ct.nrrd")
    with pytest.raises(
        DataError, match=r"ct.nrrd: reading nrrd scans needs pynrrd: pip install 'med3dvlm\[scans\]'"
    ):
        prepare_dataset(listing, tmp_path / "out2", workers=0, progress=False)
    assert not (tmp_path / "out2" / "manifest.json").exists()


def _stored_as(
    volume_dhw: np.ndarray, codes: str, permutation: tuple[int, int, int] = (0, 1, 2)
) -> nib.Nifti1Image:
    """``volume_dhw`` laid out in ``codes`` (axis codes of (W, H, D)); with a ``permutation`` other than
    the identity, stored with its first voxel axis flipped and the axes permuted, the header saying so."""
    data = volume_dhw.transpose(2, 1, 0)  # voxel axes (i, j, k) = (W, H, D)
    affine = np.diag([-1.0 if code in "LPI" else 1.0 for code in codes] + [1.0])
    if permutation != (0, 1, 2):
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, data.shape[0] - 1  # new index i' reads old index n - 1 - i'
        data, affine = np.flip(data, 0), affine @ flip
        data = data.transpose(permutation)
        affine = np.column_stack([affine[:, list(permutation)], affine[:, 3]])
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


@pytest.mark.parametrize("codes", ["LPI", "RAS", "LPS"])
def test_a_scan_in_a_sources_layout_reaches_the_model_unchanged_and_identically_from_any_stored_orientation(
    tmp_path, codes
):
    rng = np.random.default_rng(1)
    volume = (rng.random((6, 7, 8)) * 0.9 + 0.05).astype(np.float32)  # (D, H, W), distinct sizes
    volume[3, 3, 3], volume[2, 4, 5] = 0.0, 1.0  # min-max is the identity, the crop keeps everything
    spec = SourcePreprocessing(orientation=codes)
    as_laid_out = tmp_path / "laid_out.nii.gz"
    nib.save(_stored_as(volume, codes), str(as_laid_out))
    np.testing.assert_array_equal(model_input(as_laid_out, volume.shape, spec).volume, volume)
    for permutation in ((1, 0, 2), (2, 0, 1)):
        other = tmp_path / f"stored_{''.join(map(str, permutation))}.nii.gz"
        image = _stored_as(volume, codes, permutation)
        assert "".join(nib.aff2axcodes(image.affine)) != codes
        nib.save(image, str(other))
        np.testing.assert_array_equal(model_input(other, volume.shape, spec).volume, volume)
    assert not np.array_equal(model_input(other, volume.shape, SourcePreprocessing()).volume, volume)
