"""Synthetic CT-RATE (v1, v2) + RadGenome-ChestCT: tree, CSV headers, HU storage, labels in the voxels."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from med3dvlm.data.releases.ctrate import synthetic as syn

# datasets.md §2.2 and §3, spelled out here rather than taken from the module under test.
METADATA_HEADER = (
    "VolumeName,Manufacturer,SeriesDescription,ManufacturerModelName,PatientSex,PatientAge,"
    "ReconstructionDiameter,DistanceSourceToDetector,DistanceSourceToPatient,GantryDetectorTilt,TableHeight,"
    "RotationDirection,ExposureTime,XRayTubeCurrent,Exposure,FilterType,GeneratorPower,FocalSpots,"
    "ConvolutionKernel,PatientPosition,RevolutionTime,SingleCollimationWidth,TotalCollimationWidth,TableSpeed,"
    "TableFeedPerRotation,SpiralPitchFactor,DataCollectionCenterPatient,ReconstructionTargetCenterPatient,"
    "ExposureModulationType,CTDIvol,ImagePositionPatient,ImageOrientationPatient,SliceLocation,SamplesPerPixel,"
    "PhotometricInterpretation,Rows,Columns,XYSpacing,RescaleIntercept,RescaleSlope,RescaleType,NumberofSlices,"
    "ZSpacing,StudyDate"
)
REPORT_HEADER = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
LABELS = [
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
]
RADGENOME_HEADERS = {
    "region_report": ["Volumename", "Anatomy", "Sentence"],
    "vqa_abnormality": ["Volumename", "Anatomy", "Abnormality"],
    "vqa_location": ["Volumename", "Anatomy", "Abnormality"],
    "vqa_presence": ["Volumename", "Anatomy", "Finding", "Presence"],
    "vqa_size": ["Volumename", "Anatomy", "Abnormality", "Size"],
    "case_disorders": ["Volumename", "Disorders"],
}
SPLIT_CSV = {"train": "train", "valid": "validation"}


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def expected_volumes(patients: int) -> dict[str, list[str]]:
    """The documented plan: every fourth patient in valid, ids from 1 per split; scans a+b when
    i % 3 == 1; reconstructions 1+2 for scan s when (i + s) % 2 == 0."""
    names: dict[str, list[str]] = {"train": [], "valid": []}
    counts = {"train": 0, "valid": 0}
    for i in range(patients):
        split = "valid" if i % 4 == 3 else "train"
        counts[split] += 1
        for s, letter in enumerate("ab" if i % 3 == 1 else "a"):
            for recon in (1, 2) if (i + s) % 2 == 0 else (1,):
                names[split].append(f"{split}_{counts[split]}_{letter}_{recon}.nii.gz")
    return names


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, syn.GenerationSummary]:
    out = tmp_path_factory.mktemp("ctrate")
    return out, syn.generate(out, seed=0, workers=1)


def metadata(out: Path) -> dict[str, dict[str, str]]:
    return {
        r["VolumeName"]: r
        for s in SPLIT_CSV.values()
        for r in read_csv(out / f"dataset/metadata/{s}_metadata.csv")[1]
    }


def labels_of(out: Path) -> dict[str, dict[str, str]]:
    return {
        r["VolumeName"]: r
        for s in ("train", "valid")
        for r in read_csv(out / f"dataset/multi_abnormality_labels/{s}_predicted_labels.csv")[1]
    }


def xy_spacing(row: dict[str, str]) -> float:
    """CT-CLIP's parse: drop the first character and the last two, split on ',', take the first."""
    return float(row["XYSpacing"][1:-2].split(",")[0])


def test_tree_is_exactly_the_release_layout_for_both_versions(dataset):
    out, summary = dataset
    volumes = expected_volumes(16)
    assert summary.volumes == volumes
    expected = {
        f"dataset/{folder}/{name.rsplit('_', 2)[0]}/{name.rsplit('_', 1)[0]}/{name}"
        for split, names in volumes.items()
        for folder in (split, f"{split}_fixed")
        for name in names
    }
    expected |= {
        f"dataset/{family}/{split}_{suffix}.csv"
        for family, suffix, splits in (
            ("radiology_text_reports", "reports", ("train", "validation")),
            ("metadata", "metadata", ("train", "validation")),
            ("multi_abnormality_labels", "predicted_labels", ("train", "valid")),
        )
        for split in splits
    }
    expected |= {
        f"radgenome/{split}_{key}.csv" for split in ("train", "validation") for key in RADGENOME_HEADERS
    }
    assert set(tree_bytes(out)) == expected
    assert (len(volumes["train"]), len(volumes["valid"])) == (26, 6)


def test_patients_have_several_scans_and_reconstructions_and_a_quarter_validate(dataset):
    _, summary = dataset
    assert len(summary.patients["valid"]) == 4 and len(summary.patients["train"]) == 12
    for split, names in summary.volumes.items():
        parts = [n.removesuffix(".nii.gz").split("_") for n in names]
        assert all(p[0] == split and p[1].isdigit() and p[3].isdigit() for p in parts)
        scans = {(p[1], p[2]) for p in parts}
        assert any(p[2] == "b" for p in parts), "a patient with two scans"
        assert len(scans) < len(parts), "a scan with two reconstructions"
        # A split by volume would put one patient's volumes on both sides.
        assert len({p[1] for p in parts}) < len(scans)


def test_csv_headers_are_exact(dataset):
    out, summary = dataset
    for split, full in SPLIT_CSV.items():
        header, rows = read_csv(out / f"dataset/metadata/{full}_metadata.csv")
        assert ",".join(header) == METADATA_HEADER and len(header) == 44
        assert [r["VolumeName"] for r in rows] == summary.volumes[split]
        header, rows = read_csv(out / f"dataset/radiology_text_reports/{full}_reports.csv")
        assert header == REPORT_HEADER
        assert [r["VolumeName"] for r in rows] == summary.volumes[split]
        header, rows = read_csv(out / f"dataset/multi_abnormality_labels/{split}_predicted_labels.csv")
        assert header == ["VolumeName", *LABELS]
        assert all(r[label] in ("0", "1") for r in rows for label in LABELS)
        for key, columns in RADGENOME_HEADERS.items():
            assert read_csv(out / f"radgenome/{full}_{key}.csv")[0] == columns


def test_volumes_are_lps_int16_and_match_the_metadata(dataset):
    out, summary = dataset
    meta = metadata(out)
    for name in summary.labels:
        row = meta[name]
        assert name.endswith(".nii.gz")
        assert re.fullmatch(r"\[\d+\.\d+, \d+\.\d+\]", row["XYSpacing"])
        assert (row["RescaleIntercept"], row["RescaleSlope"]) == ("-1024", "1")
        for version in ("v1", "v2"):
            image = nib.load(syn.volume_path(out, version, name))
            assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
            assert image.get_data_dtype() == np.int16
            assert (
                image.shape
                == (int(row["Columns"]), int(row["Rows"]), int(row["NumberofSlices"]))
                == (48, 48, 24)
            )
            spacing = image.header.get_zooms()
            np.testing.assert_allclose(
                spacing, (xy_spacing(row), xy_spacing(row), float(row["ZSpacing"])), rtol=1e-6
            )
            assert 0.70 <= xy_spacing(row) * 48 / 512 <= 0.80
            # ImagePositionPatient (LPS) is voxel (0, 0, 0): RAS with the first two signs flipped.
            position = [float(v) for v in row["ImagePositionPatient"].strip("[]").split(",")]
            np.testing.assert_allclose(image.affine[:3, 3] * [-1, -1, 1], position, atol=1e-3)


def test_v1_stores_hu_minus_intercept_and_v2_stores_hu(dataset):
    out, summary = dataset
    meta = metadata(out)
    for name in summary.labels:
        v1 = np.asarray(nib.load(syn.volume_path(out, "v1", name)).dataobj)
        v2 = np.asarray(nib.load(syn.volume_path(out, "v2", name)).dataobj)
        slope, intercept = float(meta[name]["RescaleSlope"]), float(meta[name]["RescaleIntercept"])
        assert v1.min() == 0 and abs(int(v2.min()) + 1000) <= 30
        np.testing.assert_array_equal(slope * v1.astype(np.float64) + intercept, v2)
        # The trap: the intercept applied to v2 too shifts air below the scanner's range.
        assert slope * v2.min() + intercept < -2000


def test_calibration_region_is_40_hu_and_windows_to_052(dataset):
    out, summary = dataset
    meta = metadata(out)
    for name in summary.labels:
        row = meta[name]
        image = nib.load(syn.volume_path(out, "v1", name))
        spacing = (xy_spacing(row), xy_spacing(row), float(row["ZSpacing"]))
        region = syn.calibration_region(image.shape, spacing)
        hu = float(row["RescaleSlope"]) * np.asarray(image.dataobj)[region] + float(row["RescaleIntercept"])
        assert hu.size >= image.shape[2] and np.all(hu == 40)
        np.testing.assert_allclose((np.clip(hu, -1000, 1000) + 1000) / 2000, 0.52)
        v2 = np.asarray(nib.load(syn.volume_path(out, "v2", name)).dataobj)
        assert np.all(v2[region] == syn.CALIBRATION_HU)


def test_reports_name_exactly_the_present_labels(dataset):
    out, _ = dataset
    labels = labels_of(out)
    reports = [
        r
        for s in SPLIT_CSV.values()
        for r in read_csv(out / f"dataset/radiology_text_reports/{s}_reports.csv")[1]
    ]
    assert any(r["Findings_EN"] == "Not given." for r in reports)
    assert any(r["Impressions_EN"] == "Not given." for r in reports)
    for report in reports:
        text = f"{report['Findings_EN']} {report['Impressions_EN']}".lower()
        row = labels[report["VolumeName"]]
        for label in LABELS:
            assert (label.lower() in text) == (row[label] == "1"), (report["VolumeName"], label)
    by_scan: dict[str, set[str]] = {}
    for report in reports:
        by_scan.setdefault(report["VolumeName"].rsplit("_", 1)[0], set()).add(report["Findings_EN"])
    assert all(len(texts) == 1 for texts in by_scan.values()), "reconstructions share their scan's report"


def test_a_patients_volumes_share_its_labels(dataset):
    _, summary = dataset
    by_patient: dict[str, set[tuple[int, ...]]] = {}
    for name, labels in summary.labels.items():
        by_patient.setdefault(name.rsplit("_", 2)[0], set()).add(labels)
    assert all(len(v) == 1 for v in by_patient.values())


def mm_grid(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    """Voxel centres in mm from the volume centre; the axes are L, P, S (X left, Y posterior, Z up)."""
    axes = [(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, spacing)]
    return [a.reshape([-1 if i == k else 1 for k in range(3)]) for i, a in enumerate(axes)]


def voxel_rules(hu: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, bool]:
    """One threshold per learnable label, on HU in fixed boxes of the chest (documented anatomy)."""
    x, y, z = mm_grid(hu.shape, spacing)
    voxel = float(np.prod(spacing))

    def volume(mask: np.ndarray) -> float:
        return float(np.count_nonzero(np.broadcast_to(mask, hu.shape))) * voxel

    cavity = x**2 / 118**2 + y**2 / 93**2 < 1
    heart_box = (x > -55) & (x < 60) & (y > -85) & (y < 22) & (z > -110) & (z < 0)
    return {
        "Emphysema": float(np.median(hu[(hu < -500) & cavity])) < -900,
        "Arterial wall calcification": volume(hu > 550) > 0,
        "Cardiomegaly": volume(heart_box & (hu >= 25) & (hu <= 70)) > 550e3,
        "Pericardial effusion": volume(heart_box & (hu >= -20) & (hu <= 20)) > 100e3,
        "Pleural effusion": volume(cavity & (abs(x) > 30) & (y > 32) & (z < 0) & (hu >= -20) & (hu <= 25))
        > 50e3,
        "Lung nodule": volume((z > 10) & (hu >= 100) & (hu <= 300)) > 0,
        "Consolidation": volume(cavity & (abs(x) > 62) & (y < 15) & (z > 15) & (hu >= 15) & (hu <= 60))
        > 15e3,
    }


@pytest.mark.parametrize("grid", [{}, {"size": 24, "slices": 12}], ids=["default", "coarsest"])
def test_learnable_labels_are_recovered_from_the_voxels(tmp_path, grid):
    out = tmp_path / "many"
    summary = syn.generate(out, patients=40, seed=5, versions=("v2",), radgenome=False, workers=1, **grid)
    meta = metadata(out)
    assert set(syn.LEARNABLE) <= set(LABELS)
    hits = {label: [] for label in syn.LEARNABLE}
    for name, labels in summary.labels.items():
        hu = np.asarray(nib.load(syn.volume_path(out, "v2", name)).dataobj).astype(np.float32)
        row = meta[name]
        found = voxel_rules(hu, (xy_spacing(row), xy_spacing(row), float(row["ZSpacing"])))
        for label in syn.LEARNABLE:
            hits[label].append((found[label], bool(labels[LABELS.index(label)])))
    for label, pairs in hits.items():
        truth = [t for _, t in pairs]
        assert 0 < sum(truth) < len(truth), f"{label}: both classes present"
        accuracy = np.mean([f == t for f, t in pairs])
        assert accuracy >= 0.9, f"{label}: {accuracy:.2f}"


def test_radgenome_rows_join_ctrate_and_agree_with_the_labels(dataset):
    out, summary = dataset
    labels = labels_of(out)
    for split, full in SPLIT_CSV.items():
        names = set(summary.volumes[split])
        frames = {key: pd.read_csv(out / f"radgenome/{full}_{key}.csv") for key in RADGENOME_HEADERS}
        for key, frame in frames.items():
            assert set(frame["Volumename"]) <= names, key
        assert set(frames["vqa_presence"]["Volumename"]) == names
        region = frames["region_report"]
        assert region["Anatomy"].isna().any() and region["Anatomy"].str.contains("/", na=False).any()
        presence = frames["vqa_presence"]
        assert set(presence["Presence"]) <= {"Yes", "No"}
        for row in presence.itertuples():
            label = next(lab for lab in LABELS if lab.lower() == row.Finding)
            assert (row.Presence == "Yes") == (labels[row.Volumename][label] == "1")
        located = {(r.Volumename, r.Abnormality) for r in frames["vqa_location"].itertuples()}
        assert located == {(n, lab.lower()) for n in names for lab in LABELS if labels[n][lab] == "1"}
        assert frames["vqa_size"]["Size"].str.fullmatch(r"\d+x\d+ mm").all()
        nodules = frames["vqa_size"][frames["vqa_size"]["Abnormality"] == "lung nodule"]
        assert (
            nodules["Anatomy"].str.fullmatch(r"lung/(left|right) lung/upper lobe of (left|right) lung").all()
        )
        abnormality = frames["vqa_abnormality"]
        assert abnormality["Abnormality"].isna().any()  # no finding in a region: NaN ("No Findings")


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, dataset):
    out, _ = dataset
    syn.generate(tmp_path / "again", seed=0, workers=2)
    assert tree_bytes(tmp_path / "again") == tree_bytes(out)
    syn.generate(tmp_path / "other", seed=1, workers=1, radgenome=False, versions=("v2",))
    name = "dataset/train_fixed/train_1/train_1_a/train_1_a_1.nii.gz"
    assert tree_bytes(tmp_path / "other")[name] != tree_bytes(out)[name]


def test_rerun_removes_what_it_no_longer_writes(tmp_path):
    out = tmp_path / "ctrate"
    syn.generate(out, patients=8, size=24, slices=12, workers=1)
    summary = syn.generate(out, patients=4, size=24, slices=12, versions=("v2",), radgenome=False, workers=1)
    files = {str(p.relative_to(out)) for p in out.rglob("*.nii.gz")}
    assert files == {
        str(syn.volume_path(out, "v2", n).relative_to(out))
        for names in summary.volumes.values()
        for n in names
    }
    assert not list((out / "radgenome").glob("*.csv"))


@pytest.mark.parametrize(
    "kwargs",
    [{"versions": ("v3",)}, {"versions": ()}, {"versions": ("v1", "v1")}, {"size": 16}, {"patients": 0}],
)
def test_bad_arguments_are_refused(tmp_path, kwargs):
    with pytest.raises(ValueError):
        syn.generate(tmp_path, workers=1, **kwargs)
