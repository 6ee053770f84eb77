"""prepare: preprocessing steps, M3D and own-data preparation, bad input, resume after SIGKILL."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from med3dvlm.data.errors import DataError
from med3dvlm.data.preparation import JOURNAL_FILE, LOCK_FILE, prepare_dataset
from med3dvlm.data.preprocess import (
    crop_foreground,
    list_slices,
    preprocess_volume,
    stack_series,
)
from med3dvlm.data.releases.base import hash_split
from med3dvlm.data.releases.m3d.layout import VQA_COLUMNS, series_key
from med3dvlm.data.releases.m3d.plan import extract_report
from med3dvlm.data.scans import load_nifti_as_dhw
from med3dvlm.data.volume_io import read_volume, read_volume_raw

REPO_ROOT = Path(__file__).resolve().parents[1]
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
SERIES = ("Axial_non_contrast", "Coronal_arterial_phase")
SMALL = [8, 16, 16]


# ----------------------------------------------------------------------------- raw fixtures


def write_series(folder: Path, slices: int, shape: tuple[int, int] = (24, 20), seed: int = 0) -> None:
    """Numbered JPEG slices: a bright block on black whose intensity grows with the slice number."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(slices):
        image = np.zeros(shape, np.uint8)
        image[3:-3, 2:-2] = 40 + 10 * k + rng.integers(0, 5, (shape[0] - 6, shape[1] - 4))
        Image.fromarray(image).save(folder / f"{k}.jpeg", quality=95)


def write_raw_m3d(root: Path, cases: int = 3, slices: int = 10, split_file: bool = False) -> Path:
    """A raw M3D folder following the data contract (cases x SERIES, VQA CSVs)."""
    vqa_rows = []
    entries: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    for c in range(cases):
        case = f"{c:06d}"
        case_dir = root / "M3D_Cap" / "ct_case" / case
        for s, series in enumerate(SERIES):
            write_series(case_dir / series, slices, seed=10 * c + s)
            image = f"ct_case/{case}/{series}.npy"
            entries[("train", "validation", "test")[c % 3]].append(
                {"image": image, "text": f"ct_case/{case}/text.txt"}
            )
            vqa_rows.append(
                {
                    "Image Path": image,
                    "Text": "report",
                    "Question Type": "3",
                    "Question": "Which organ?",
                    "Choice A": "liver",
                    "Choice B": "spleen",
                    "Choice C": "kidney",
                    "Choice D": "lung",
                    "Answer": "liver",
                    "Answer Choice": "A",
                }
            )
        (case_dir / "text.txt").write_text(
            f"study_findings: Case {case} shows a 12 mm lesion in the liver.\ndiscussion: benign cyst."
        )
    if split_file:
        (root / "M3D_Cap" / "M3D_Cap.json").write_text(json.dumps(entries))
    vqa_dir = root / "M3D-VQA"
    vqa_dir.mkdir(parents=True, exist_ok=True)
    with open(vqa_dir / "M3D_VQA_train.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=VQA_COLUMNS)
        writer.writeheader()
        writer.writerows(vqa_rows)
    return root


def write_own_csv(
    path: Path, rows: list[tuple[str, str]], columns: tuple[str, str] = ("image", "report")
) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` but the manifest (it names the source), the journal and
    the lock (it names the process)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in ("manifest.json", JOURNAL_FILE, LOCK_FILE)
    }


def prepare(source: Path, out: Path, **kwargs) -> dict:
    options = {"spatial_size": SMALL, "format": "npy", "workers": 1, "progress": False}
    return prepare_dataset(source, out, **{**options, **kwargs})


# ----------------------------------------------------------------------------- preprocessing


def test_extract_report_takes_findings_then_discussion_then_whole_text(tmp_path: Path) -> None:
    assert extract_report("study_findings: Liver cyst.\ndiscussion: benign", "r") == "Liver cyst."
    assert extract_report("study_findings:   \ndiscussion: Benign.", "r") == "Benign."
    assert extract_report("  Plain report text. ", "r") == "Plain report text."
    with pytest.raises(DataError, match=r"^case/text\.txt: empty report"):
        extract_report("study_findings:  \n discussion: ", "case/text.txt")
    with pytest.raises(DataError, match="empty report"):
        extract_report("   ", "x")


def test_slices_are_read_in_numeric_order_and_minority_shapes_dropped(tmp_path: Path) -> None:
    write_series(tmp_path / "s", 12)
    assert [p.name for p in list_slices(tmp_path / "s")][:4] == ["0.jpeg", "1.jpeg", "2.jpeg", "3.jpeg"]
    assert list_slices(tmp_path / "s")[-1].name == "11.jpeg"
    Image.fromarray(np.full((30, 30), 200, np.uint8)).save(tmp_path / "s" / "5.jpeg")
    stacked = stack_series(tmp_path / "s")
    assert stacked.dropped == ("5.jpeg",)
    assert stacked.volume.shape == (11, 24, 20)
    centre_means = stacked.volume[:, 12, 10].astype(int)
    assert (np.diff(centre_means) > 0).all(), "slices must stack in numeric order (2 before 10)"


def test_preprocess_normalises_crops_foreground_and_resizes() -> None:
    volume = np.zeros((20, 40, 40), np.int16)
    volume[5:15, 10:30, 20:40] = 1000
    volume[10, 20, 25] = 3000
    assert crop_foreground(volume.astype(np.float32)).shape == (10, 20, 20)
    out = preprocess_volume(volume, (8, 16, 16))
    assert out.shape == (8, 16, 16) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    # Everything outside the block was cropped, so no background voxel survives the resize.
    assert out.min() == pytest.approx(1000 / 3000, abs=1e-6)


def test_preprocess_rejects_constant_and_non_finite_volumes() -> None:
    with pytest.raises(DataError, match="scan.nii: constant volume"):
        preprocess_volume(np.ones((4, 4, 4)), (2, 2, 2), source="scan.nii")
    bad = np.random.default_rng(0).random((4, 4, 4))
    bad[1, 1, 1] = np.nan
    with pytest.raises(DataError, match="scan.nii: volume contains NaN or Inf"):
        preprocess_volume(bad, (2, 2, 2), source="scan.nii")


def test_load_nifti_reorients_to_canonical_dhw() -> None:
    las = nib.load(NIBABEL_DATA / "anatomical.nii")  # x axis runs right-to-left
    raw = np.asanyarray(las.dataobj)
    dhw = load_nifti_as_dhw(NIBABEL_DATA / "anatomical.nii")
    assert dhw.shape == (raw.shape[2], raw.shape[1], raw.shape[0])
    np.testing.assert_array_equal(dhw, raw[::-1].transpose(2, 1, 0))
    ras = nib.load(NIBABEL_DATA / "standard.nii.gz")
    np.testing.assert_array_equal(
        load_nifti_as_dhw(NIBABEL_DATA / "standard.nii.gz"), np.asanyarray(ras.dataobj).transpose(2, 1, 0)
    )


def test_load_nifti_rejects_4d_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"4d\.nii\.gz: expected a 3D volume, got shape \(128, 96, 24, 2"):
        load_nifti_as_dhw(NIBABEL_DATA / "example4d.nii.gz")
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes((NIBABEL_DATA / "standard.nii.gz").read_bytes()[:-20])
    with pytest.raises(DataError, match=r"cut\.nii\.gz: unreadable or truncated NIfTI"):
        load_nifti_as_dhw(truncated)
    with pytest.raises(DataError, match=r"missing\.nii: file not found"):
        load_nifti_as_dhw(tmp_path / "missing.nii")


def test_hash_split_is_deterministic_and_follows_fractions() -> None:
    fractions = {"train": 0.8, "validation": 0.1, "test": 0.1}
    splits = [hash_split(f"{i:06d}", fractions) for i in range(2000)]
    assert splits == [hash_split(f"{i:06d}", fractions) for i in range(2000)]
    assert 0.75 < splits.count("train") / 2000 < 0.85
    assert hash_split("x", {"train": 0.0, "validation": 0.0, "test": 1.0}) == "test"
    series = "ct_case/000123/Axial_C__portal_venous_phase"
    assert series_key(f"{series}.npy") == series_key(f"M3D_Cap/{series}.nii.gz") == series


# ----------------------------------------------------------------------------- M3D preparation


def test_m3d_prepare_writes_contract_layout_in_both_formats(tmp_path: Path) -> None:
    raw = write_raw_m3d(tmp_path / "raw", cases=3)
    odd_slice = raw / "M3D_Cap/ct_case/000001/Axial_non_contrast/3.jpeg"
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(odd_slice)
    volumes = {}
    for fmt in ("npy", "nii.gz"):
        out = tmp_path / f"out_{fmt}"
        manifest = prepare(raw, out, format=fmt)
        assert manifest["counts"]["volumes_ok"] == 6 and manifest["skipped"] == []
        assert manifest["counts"]["slices_dropped"] == 1
        entry = manifest["volumes"][f"M3D_Cap/ct_case/000001/Axial_non_contrast.{fmt}"]
        assert entry["dropped_slices"] == ["3.jpeg"] and entry["shape"] == SMALL
        assert entry["dtype"] == ("uint8" if fmt == "npy" else "float32")
        assert entry["source"] == "M3D_Cap/ct_case/000001/Axial_non_contrast"
        split = json.loads((out / "M3D_Cap.json").read_text())
        listed = [item for name in ("train", "validation", "test") for item in split[name]]
        assert len(listed) == 6
        for item in listed:
            path = out / item["image"]
            sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
            assert sha256 == manifest["volumes"][item["image"]]["sha256"]
            assert (out / item["text"]).read_text().startswith("Case ")
            assert "benign" not in (out / item["text"]).read_text()
        # A case is in exactly one split.
        case_splits = {(i["image"].split("/")[2], name) for name in split for i in split[name]}
        assert len(case_splits) == 3
        with open(out / "M3D-VQA" / "M3D_VQA_train.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 6 and all((out / r["Image Path"]).is_file() for r in rows)
        assert list(rows[0]) == list(VQA_COLUMNS)
        volumes[fmt] = {i["image"]: read_volume(out / i["image"], tuple(SMALL)) for i in listed}
    for key, volume in volumes["nii.gz"].items():
        npy = volumes["npy"][key.replace(".nii.gz", ".npy")]
        np.testing.assert_allclose(npy, volume, atol=1 / 510 + 1e-6)


def test_m3d_split_file_is_followed(tmp_path: Path) -> None:
    raw = write_raw_m3d(tmp_path / "raw", cases=3, split_file=True)
    prepare(raw, tmp_path / "out")
    split = json.loads((tmp_path / "out" / "M3D_Cap.json").read_text())
    assert {name: sorted({i["image"].split("/")[2] for i in items}) for name, items in split.items()} == {
        "train": ["000000"],
        "validation": ["000001"],
        "test": ["000002"],
    }


def test_bad_jpeg_fails_naming_the_file_or_is_skipped_and_listed(tmp_path: Path) -> None:
    raw = write_raw_m3d(tmp_path / "raw", cases=2)
    bad = raw / "M3D_Cap/ct_case/000001/Coronal_arterial_phase/4.jpeg"
    bad.write_bytes(bad.read_bytes()[:150])
    with pytest.raises(DataError, match=rf"^{bad}: unreadable or truncated image"):
        prepare(raw, tmp_path / "fail")
    manifest = prepare(raw, tmp_path / "skip", on_error="skip")
    assert manifest["counts"]["volumes_ok"] == 3 and manifest["counts"]["skipped"] == 1
    assert manifest["skipped"][0]["source"] == "M3D_Cap/ct_case/000001/Coronal_arterial_phase"
    assert str(bad) in manifest["skipped"][0]["reason"]
    assert str(bad) in (tmp_path / "skip" / "skipped.txt").read_text()
    dropped = manifest["vqa"]["M3D_VQA_train.csv"]["dropped_images"]
    assert dropped == ["ct_case/000001/Coronal_arterial_phase.npy"]
    assert manifest["counts"]["vqa_rows_kept"] == 3 and manifest["counts"]["vqa_rows_dropped"] == 1


def test_empty_report_and_missing_vqa_column_fail_naming_the_file(tmp_path: Path) -> None:
    raw = write_raw_m3d(tmp_path / "raw", cases=2)
    report = raw / "M3D_Cap/ct_case/000000/text.txt"
    report.write_text("study_findings: \n")
    with pytest.raises(DataError, match=rf"^{report}: empty report"):
        prepare(raw, tmp_path / "a")
    manifest = prepare(raw, tmp_path / "b", on_error="skip")
    assert sorted(s["source"] for s in manifest["skipped"]) == [f"M3D_Cap/ct_case/000000/{s}" for s in SERIES]
    report.write_text("study_findings: fine")
    vqa = raw / "M3D-VQA" / "M3D_VQA_train.csv"
    vqa.write_text(vqa.read_text().replace("Answer Choice", "Letter"))
    with pytest.raises(DataError, match=rf"^{vqa}: missing column 'Answer Choice'"):
        prepare(raw, tmp_path / "c")


def test_resume_reuses_valid_outputs_and_redoes_damaged_ones(tmp_path: Path) -> None:
    raw = write_raw_m3d(tmp_path / "raw", cases=2)
    out = tmp_path / "out"
    prepare(raw, out)
    reference = checksums(out)
    kept = out / "M3D_Cap/ct_case/000000/Axial_non_contrast.npy"
    damaged = out / "M3D_Cap/ct_case/000001/Axial_non_contrast.npy"
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"\0" * 10)
    kept_mtime = kept.stat().st_mtime_ns
    prepare(raw, out)
    assert kept.stat().st_mtime_ns == kept_mtime
    assert checksums(out) == reference
    manifest = prepare(raw, out, spatial_size=[4, 8, 8])  # other settings: nothing is reused
    assert kept.stat().st_mtime_ns != kept_mtime
    assert read_volume_raw(kept).shape == (4, 8, 8)
    assert {tuple(v["shape"]) for v in manifest["volumes"].values()} == {(4, 8, 8)}
    with pytest.raises(DataError, match=r"nowhere: not found"):
        prepare(tmp_path / "nowhere", out)


def test_resume_redoes_a_volume_whose_raw_series_changed(tmp_path: Path) -> None:
    raw = write_raw_m3d(tmp_path / "raw", cases=2)
    out = tmp_path / "out"
    prepare(raw, out)
    changed = out / "M3D_Cap/ct_case/000000/Axial_non_contrast.npy"
    kept = out / "M3D_Cap/ct_case/000001/Axial_non_contrast.npy"
    before, kept_mtime = read_volume_raw(changed).copy(), kept.stat().st_mtime_ns
    write_series(raw / "M3D_Cap/ct_case/000000/Axial_non_contrast", 10, seed=99)  # e.g. regenerated data
    prepare(raw, out)
    assert not np.array_equal(read_volume_raw(changed), before)
    assert kept.stat().st_mtime_ns == kept_mtime


def test_parallel_workers_match_a_single_process(tmp_path: Path) -> None:
    raw = write_raw_m3d(tmp_path / "raw", cases=3)
    prepare(raw, tmp_path / "one", workers=1)
    prepare(raw, tmp_path / "two", workers=2)
    assert checksums(tmp_path / "one") == checksums(tmp_path / "two")


def test_prepare_resumes_after_sigkill_with_identical_outputs(tmp_path: Path) -> None:
    raw = write_raw_m3d(tmp_path / "raw", cases=12, slices=24)
    size = "spatial_size=[32,96,96]"
    uninterrupted = tmp_path / "uninterrupted"
    prepare(raw, uninterrupted, spatial_size=[32, 96, 96], format="nii.gz")
    out = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "med3dvlm.prepare",
        f"source={raw}",
        f"out={out}",
        size,
        "format=nii.gz",
        "workers=2",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.PIPE)
    journal = out / JOURNAL_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if journal.is_file() and journal.read_text().count("\n") >= 4:  # header + >= 3 volumes
            break
        time.sleep(0.005)
    assert process.poll() is None, f"prepare ended before being killed: {process.stderr.read().decode()}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = journal.read_text().count("\n") - 1
    assert 3 <= done < 24 and not (out / "manifest.json").exists()
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resuming:" in result.stdout + result.stderr
    assert checksums(out) == checksums(uninterrupted)
    assert not list(out.rglob(".tmp-*"))


# ----------------------------------------------------------------------------- own data


def test_own_nifti_data_goes_through_the_csv_path(tmp_path: Path) -> None:
    csv_path = write_own_csv(
        tmp_path / "own.csv",
        [
            (str(NIBABEL_DATA / "anatomical.nii"), "A brain MRI without findings."),
            (str(NIBABEL_DATA / "standard.nii.gz"), "study_findings: small test volume. discussion: none"),
        ],
    )
    manifest = prepare(csv_path, tmp_path / "out", format="nii.gz", split={"train": 1.0})
    assert sorted(manifest["volumes"]) == ["own/anatomical.nii.gz", "own/standard.nii.gz"]
    split = json.loads((tmp_path / "out" / "M3D_Cap.json").read_text())
    assert [i["image"] for i in split["train"]] == ["own/anatomical.nii.gz", "own/standard.nii.gz"]
    assert split["validation"] == [] and split["test"] == []
    assert (tmp_path / "out" / "own" / "standard.txt").read_text() == "small test volume."
    volume = read_volume(tmp_path / "out" / "own" / "anatomical.nii.gz", tuple(SMALL))
    expected = preprocess_volume(load_nifti_as_dhw(NIBABEL_DATA / "anatomical.nii"), SMALL)
    np.testing.assert_allclose(volume, expected, atol=1e-7)
    assert not (tmp_path / "out" / "M3D-VQA").exists()


def test_own_data_bad_inputs_name_the_file(tmp_path: Path) -> None:
    missing_column = write_own_csv(tmp_path / "cols.csv", [("a.nii", "r")], columns=("image", "text"))
    with pytest.raises(DataError, match=rf"^{missing_column}: missing column 'report'"):
        prepare(missing_column, tmp_path / "o1")
    with pytest.raises(DataError, match=r"absent\.csv: not found \(expected your scans"):
        prepare(tmp_path / "absent.csv", tmp_path / "o2")

    nan_path = tmp_path / "nan.nii.gz"
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    data[2, 3, 4] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), nan_path)
    cases = {
        "missing.nii.gz": "file not found",
        str(NIBABEL_DATA / "example4d.nii.gz"): "expected a 3D volume",
        str(nan_path): "NaN or Inf",
    }
    for image, problem in cases.items():
        csv_path = write_own_csv(tmp_path / "one.csv", [(image, "report")])
        with pytest.raises(DataError, match=problem) as info:
            prepare(csv_path, tmp_path / "o3")
        assert Path(image).name in str(info.value)
    empty = write_own_csv(tmp_path / "empty.csv", [(str(NIBABEL_DATA / "standard.nii.gz"), "  ")])
    with pytest.raises(DataError, match=rf"^{empty} line 2: empty report"):
        prepare(empty, tmp_path / "o4")

    mixed = write_own_csv(
        tmp_path / "mixed.csv",
        [(image, "report") for image in cases] + [(str(NIBABEL_DATA / "standard.nii.gz"), "ok")],
    )
    manifest = prepare(mixed, tmp_path / "o5", on_error="skip")
    assert list(manifest["volumes"]) == ["own/standard.npy"]
    assert manifest["counts"]["skipped"] == 3
    assert len((tmp_path / "o5" / "skipped.txt").read_text().splitlines()) == 3


def test_own_data_colliding_stems_get_distinct_outputs(tmp_path: Path) -> None:
    for folder in ("p1", "p2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ct.nii.gz").write_bytes((NIBABEL_DATA / "standard.nii.gz").read_bytes())
    csv_path = write_own_csv(tmp_path / "own.csv", [("p1/ct.nii.gz", "one"), ("p2/ct.nii.gz", "two")])
    manifest = prepare(csv_path, tmp_path / "out")
    outputs = sorted(manifest["volumes"])
    assert len(outputs) == 2 and all(o.startswith("own/ct_") for o in outputs)
    assert {manifest["volumes"][o]["source"] for o in outputs} == {"p1/ct.nii.gz", "p2/ct.nii.gz"}
    assert read_volume_raw(tmp_path / "out" / outputs[0]).shape == tuple(SMALL)


# ----------------------------------------------------------------------------- synthetic -> prepare


def test_synthetic_dataset_prepares_in_both_formats(tmp_path: Path) -> None:
    from med3dvlm.data.releases.m3d.synthetic import generate

    summary = generate(tmp_path / "raw", cases=8, seed=3, slices=12, size=32, workers=1)
    for fmt in ("npy", "nii.gz"):
        out = tmp_path / fmt
        manifest = prepare(tmp_path / "raw", out, format=fmt)
        # Case 0 holds a second series (the real layout: several series per case).
        assert manifest["counts"]["volumes_ok"] == 9 and manifest["split_source"] == "M3D_Cap.json"
        split = json.loads((out / "M3D_Cap.json").read_text())
        assert {name: sorted({i["image"].split("/")[2] for i in split[name]}) for name in summary.splits} == {
            name: sorted(ids) for name, ids in summary.splits.items()
        }
        for item in split["train"]:
            volume = read_volume(out / item["image"], tuple(SMALL))
            assert 0.0 <= volume.min() and volume.max() <= 1.0 and volume.std() > 0.05
            raw_report = (tmp_path / "raw" / item["text"]).read_text()
            findings = raw_report.split("study_findings:", 1)[1].split("discussion:", 1)[0].strip()
            assert (out / item["text"]).read_text() == findings
        for name in ("M3D_VQA_train.csv", "M3D_VQA_test5k.csv", "M3D_VQA_yn_train.csv"):
            with open(out / "M3D-VQA" / name, newline="") as fh:
                rows = list(csv.DictReader(fh))
            assert rows and all((out / r["Image Path"]).is_file() for r in rows)
            assert all(r["Image Path"].endswith(f".{fmt}") for r in rows)
            assert manifest["vqa"][name]["dropped"] == 0


def test_synthetic_defects_are_skipped_and_reported(tmp_path: Path) -> None:
    from med3dvlm.data.releases.m3d.synthetic import generate

    summary = generate(tmp_path / "raw", cases=9, seed=1, slices=12, size=32, workers=1, defect_rate=1.0)
    with pytest.raises(DataError):
        prepare(tmp_path / "raw", tmp_path / "fail")
    manifest = prepare(tmp_path / "raw", tmp_path / "out", on_error="skip")
    assert set(summary.defects.values()) == {"stray_slice", "truncated_jpeg", "empty_report"}
    broken = {case for case, defect in summary.defects.items() if defect != "stray_slice"}
    assert {s["source"].split("/")[2] for s in manifest["skipped"]} == broken
    stray = [case for case, defect in summary.defects.items() if defect == "stray_slice"]
    assert manifest["counts"]["slices_dropped"] == len(stray)
    assert manifest["counts"]["volumes_ok"] == 9 - len(broken)
    dropped = {path.split("/")[2] for v in manifest["vqa"].values() for path in v["dropped_images"]}
    assert dropped == broken


# ----------------------------------------------------------------------------- bounded inputs


def write_nifti_claiming(path: Path, shape: tuple[int, int, int], data_bytes: int) -> Path:
    """A gzipped NIfTI whose header claims ``shape`` but which holds only ``data_bytes`` of zeros (a
    decompression bomb, or a damaged header)."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header.set_qform(np.eye(4), code=1)
    with gzip.open(path, "wb") as fh:
        fh.write(header.binaryblock + b"\0" * 4)  # the 4-byte extension flag: data starts at 352
        fh.write(b"\0" * data_bytes)
    return path


BOMB_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # 3 GiB: the claimed volume needs 8
from med3dvlm.data.errors import DataError
from med3dvlm.data.scans import load_nifti_as_dhw
try:
    load_nifti_as_dhw(sys.argv[1])
except DataError as error:
    print(error)
"""


def test_a_nifti_header_claiming_too_many_voxels_is_refused_before_decompressing(tmp_path: Path) -> None:
    bomb = write_nifti_claiming(tmp_path / "bomb.nii.gz", (1600, 1600, 1600), 4 << 20)
    assert bomb.stat().st_size < 100_000
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{bomb}: the header claims 1600x1600x1600 = 4,096,000,000 voxels" in done.stdout
    assert "max_voxels" in done.stdout
    assert time.perf_counter() - started < 30
    huge = write_nifti_claiming(
        tmp_path / "huge.nii.gz", (32000, 32000, 32000), 1024
    )  # NIfTI-1 dims are int16
    with pytest.raises(DataError, match=r"huge\.nii\.gz: the header claims .* voxels"):
        load_nifti_as_dhw(huge)
    small = write_nifti_claiming(tmp_path / "small.nii.gz", (8, 8, 8), 8 * 8 * 8 * 2)
    with pytest.raises(DataError, match=r"small\.nii\.gz: the header claims 8x8x8 = 512 voxels"):
        load_nifti_as_dhw(small, max_voxels=100)
    assert load_nifti_as_dhw(small).shape == (8, 8, 8)


def test_prepare_refuses_an_oversized_scan_or_skips_and_lists_it(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    write_nifti_claiming(scans / "bomb.nii.gz", (1600, 1600, 1600), 1 << 20)
    good = np.random.default_rng(0).normal(100, 20, size=(12, 10, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(good, np.eye(4)), str(scans / "good.nii.gz"))
    csv_path = write_own_csv(
        tmp_path / "own.csv", [("scans/bomb.nii.gz", "A report."), ("scans/good.nii.gz", "B.")]
    )
    with pytest.raises(DataError, match=r"bomb\.nii\.gz: the header claims"):
        prepare(csv_path, tmp_path / "out")
    manifest = prepare(csv_path, tmp_path / "out2", on_error="skip", max_voxels=10**6)
    assert manifest["counts"]["volumes_ok"] == 1
    assert [s["source"] for s in manifest["skipped"]] == ["scans/bomb.nii.gz"]


def test_a_series_whose_slices_add_up_to_too_many_voxels_is_refused_before_decoding(tmp_path: Path) -> None:
    write_series(tmp_path / "s", slices=6, shape=(40, 50))
    assert stack_series(tmp_path / "s").volume.shape == (6, 40, 50)
    with pytest.raises(
        DataError, match=r"s: the series. 6 slices hold 12,000 voxels, more than max_voxels=10,000"
    ):
        stack_series(tmp_path / "s", max_voxels=10_000)


# ----------------------------------------------------------------------------- two runs, killed runs, duplicates


def _prepare_command(raw: Path, out: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "med3dvlm.prepare",
        f"source={raw}",
        f"out={out}",
        "spatial_size=[32,96,96]",
        "format=nii.gz",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        *extra,
    ]


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # an orphan's zombie may wait for a reaper that never comes in a container


def test_a_second_prepare_into_the_same_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    raw = write_raw_m3d(tmp_path / "raw", cases=4, slices=24)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.Popen(
        _prepare_command(raw, out, tmp_path, "workers=1"), env=env, stderr=subprocess.PIPE
    )
    _wait_for(
        lambda: (out / LOCK_FILE).is_file() and str(first.pid) in (out / LOCK_FILE).read_text(), "the lock"
    )
    os.kill(first.pid, signal.SIGSTOP)  # the first run holds the lock, mid-way
    try:
        listing = sorted(p.name for p in out.rglob("*"))
        with pytest.raises(DataError, match=rf"{out}: another prepare is writing here \(pid {first.pid} on "):
            prepare(raw, out)
        assert sorted(p.name for p in out.rglob("*")) == listing  # nothing of the first run was touched
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=180) == 0, first.stderr.read().decode()[-2000:]
    manifest = prepare(
        raw, out, spatial_size=[32, 96, 96], format="nii.gz"
    )  # the lock went with the first run
    assert manifest["counts"]["volumes_ok"] == 8


def test_killing_prepare_ends_its_workers(tmp_path: Path) -> None:
    raw = write_raw_m3d(tmp_path / "raw", cases=12, slices=24)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    parent = subprocess.Popen(
        _prepare_command(raw, out, tmp_path, "workers=2"), env=env, stderr=subprocess.PIPE
    )
    children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
    workers: list[int] = []

    def working() -> bool:  # two workers and the resource tracker, one volume done
        workers[:] = [int(pid) for pid in children.read_text().split()] if children.exists() else []
        journal = out / JOURNAL_FILE
        return len(workers) >= 3 and journal.is_file() and journal.read_text().count("\n") >= 2

    _wait_for(working, "the workers")
    parent.kill()
    parent.wait()
    killed = time.monotonic()
    _wait_for(lambda: not any(_alive(pid) for pid in workers), "the workers to end", timeout=10)
    assert time.monotonic() - killed < 5


def test_one_scan_listed_twice_is_refused_and_identical_copies_share_a_split(tmp_path: Path) -> None:
    (tmp_path / "own").mkdir()
    (tmp_path / "csv").mkdir()
    scan = np.random.default_rng(0).normal(100, 20, size=(12, 10, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(scan, np.eye(4)), str(tmp_path / "own" / "g.nii.gz"))
    spellings = write_own_csv(
        tmp_path / "csv" / "two.csv",
        [("../own/g.nii.gz", "Report A."), ("../csv/../own/g.nii.gz", "Report B.")],
    )
    with pytest.raises(
        DataError, match=r"two\.csv: line 3: '\.\./csv/\.\./own/g\.nii\.gz' is the same file as line 2"
    ):
        prepare(spellings, tmp_path / "o1")
    manifest = prepare(spellings, tmp_path / "o2", on_error="skip")
    assert (
        manifest["counts"]["volumes_ok"] == 1 and manifest["skipped"][0]["source"] == "../csv/../own/g.nii.gz"
    )

    for i in range(12):
        (tmp_path / "own" / f"copy{i}.nii.gz").write_bytes((tmp_path / "own" / "g.nii.gz").read_bytes())
    copies = write_own_csv(
        tmp_path / "csv" / "copies.csv", [(f"../own/copy{i}.nii.gz", f"Report {i}.") for i in range(12)]
    )
    manifest = prepare(copies, tmp_path / "o3", split={"train": 0.5, "validation": 0.0, "test": 0.5})
    split = json.loads((tmp_path / "o3" / "M3D_Cap.json").read_text())
    assert sorted(len(entries) for entries in split.values()) == [0, 0, 12]  # all in one split
    assert manifest["duplicates"] == [[f"../own/copy{i}.nii.gz" for i in range(12)]]
    assert manifest["counts"]["duplicate_groups"] == 1


def test_a_failed_rerun_keeps_the_manifest_of_a_complete_folder(tmp_path: Path) -> None:
    raw = write_raw_m3d(tmp_path / "raw", cases=3)
    out = tmp_path / "out"
    prepare(raw, out)
    before = (out / "manifest.json").read_text()
    new_series = raw / "M3D_Cap/ct_case/000001/Sagittal_new"
    write_series(new_series, 5)
    (new_series / "2.jpeg").write_bytes((new_series / "2.jpeg").read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match=r"2\.jpeg: unreadable or truncated image"):
        prepare(raw, out)
    assert (out / "manifest.json").read_text() == before


# ----------------------------------------------------------------------------- the real release's layout

# Series folder names as they occur in the release (the original's demo cases), plus one with a diacritic.
RELEASE_SERIES = {
    ("ct_case", "001480"): ["Axial_bone_window", "_non_contrast"],
    ("ct_case", "004794"): [
        "Axial_C__arterial_phase",
        "Axial_Delayed_portal",
        "Coronal_C__portal_venous_phase",
    ],
    ("ct_quizze", "015533"): ["AXIAL_THICK_BRAIN_None", "Coronal_bone_window", "Pöschl_bone_window"],
    ("ct_quizze", "024421"): ["Axial_non_contrast", "Sagittal_C__portal_venous_phase"],
}


def write_png_series(folder: Path, slices: int, palette: bool) -> None:
    folder.mkdir(parents=True)
    for k in range(slices):
        image = np.zeros((24, 20), np.uint8)
        image[3:-3, 2:-2] = 60 + 12 * k
        picture = Image.fromarray(image)
        (picture.convert("P") if palette else picture).save(folder / f"{k}.png")


def write_release(root: Path) -> Path:
    """A raw tree laid out as the unpacked M3D release (see med3dvlm.data.layout and the original's
    m3d_cap_data_prepare*.py): two collections, several series per case sharing text.txt, a
    diacritic series name, PNG and palette slices, M3D_Cap/M3D_Cap.json with prefixed entries and a
    test subset, M3D_VQA_{train,val,test,test5k}.csv and M3D_VQA_yn_train.csv."""
    lists: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    rows: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    for number, ((collection, case), series) in enumerate(RELEASE_SERIES.items()):
        split = ("train", "train", "validation", "test")[number]
        case_dir = root / "M3D_Cap" / collection / case
        for s, name in enumerate(series):
            if collection == "ct_quizze" and s == 1:
                write_png_series(case_dir / name, 8, palette=s % 2 == 1)
            else:
                write_series(case_dir / name, 8, seed=number * 10 + s)
            image = f"M3D_Cap_npy/{collection}/{case}/{name.replace('ö', 'o')}.npy"
            lists[split].append({"image": image, "text": f"M3D_Cap_npy/{collection}/{case}/text.txt"})
            rows[split].append(
                {
                    "Image Path": image,
                    "Text": "report",
                    "Question Type": "1",
                    "Question": "Which plane?",
                    "Choice A": "axial",
                    "Choice B": "coronal",
                    "Choice C": "sagittal",
                    "Choice D": "oblique",
                    "Answer": "axial",
                    "Answer Choice": "A",
                }
            )
        (case_dir / "text.txt").write_text(f"study_findings: Case {case} findings.\ndiscussion: none.")
    lists["test100"] = lists["test"][:1]
    (root / "M3D_Cap" / "M3D_Cap.json").write_text(json.dumps(lists, indent=1))
    vqa = root / "M3D-VQA"
    for split, short in (("train", "train"), ("validation", "val"), ("test", "test")):
        write_csv_rows(vqa / f"M3D_VQA_{short}.csv", rows[split])
    write_csv_rows(vqa / "M3D_VQA_test5k.csv", rows["test"][:1])
    write_csv_rows(
        vqa / "M3D_VQA_yn_train.csv", [{**r, "Answer": "Yes", "Answer Choice": ""} for r in rows["train"]]
    )
    return root


def write_csv_rows(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=VQA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def test_the_release_layout_prepares_keeping_every_entry_and_row(tmp_path: Path) -> None:
    raw = write_release(tmp_path / "raw")
    manifest = prepare(raw, tmp_path / "out")
    out = tmp_path / "out"
    assert manifest["skipped"] == [] and manifest["counts"]["volumes_ok"] == 10
    assert manifest["counts"]["collections"] == {
        "ct_case": {"cases": 2, "series": 5, "volumes_ok": 5},
        "ct_quizze": {"cases": 2, "series": 5, "volumes_ok": 5},
    }
    source = json.loads((raw / "M3D_Cap" / "M3D_Cap.json").read_text())
    prepared = json.loads((out / "M3D_Cap.json").read_text())
    assert {k: len(v) for k, v in prepared.items()} == {k: len(v) for k, v in source.items()}
    for name, entries in source.items():
        for original, entry in zip(entries, prepared[name], strict=True):
            assert entry["image"] == original["image"].replace("M3D_Cap_npy/", "M3D_Cap/")  # same order
            assert (out / entry["image"]).is_file() and (out / entry["text"]).read_text().startswith("Case ")
    assert (out / "M3D_Cap/ct_quizze/015533/Poschl_bone_window.npy").is_file()  # folded as the original
    assert (
        manifest["volumes"]["M3D_Cap/ct_quizze/015533/Poschl_bone_window.npy"]["source"]
        == "M3D_Cap/ct_quizze/015533/Pöschl_bone_window"
    )
    for name in (
        "M3D_VQA_train.csv",
        "M3D_VQA_val.csv",
        "M3D_VQA_test.csv",
        "M3D_VQA_test5k.csv",
        "M3D_VQA_yn_train.csv",
    ):
        with open(raw / "M3D-VQA" / name, newline="") as fh:
            before = list(csv.DictReader(fh))
        with open(out / "M3D-VQA" / name, newline="") as fh:
            after = list(csv.DictReader(fh))
        assert len(after) == len(before) and manifest["vqa"][name]["kept"] == len(before)
        assert all((out / r["Image Path"]).is_file() for r in after)
    palette = read_volume_raw(out / "M3D_Cap/ct_quizze/015533/Coronal_bone_window.npy")
    assert palette.shape == tuple(SMALL) and palette.max() > palette.min()


def test_a_palette_slice_is_converted_through_rgba_as_the_original(tmp_path: Path) -> None:
    from med3dvlm.data.preprocess import read_slice

    image = np.zeros((6, 5, 4), np.uint8)
    image[..., 0], image[..., 1], image[..., 2], image[..., 3] = 200, 100, 50, 0  # fully transparent
    Image.fromarray(image, "RGBA").convert("P").save(tmp_path / "0.png")
    opened = Image.open(tmp_path / "0.png")
    assert opened.mode == "P"
    expected = np.asarray(opened.convert("RGBA").convert("L"))
    np.testing.assert_array_equal(read_slice(tmp_path / "0.png"), expected)


def test_release_layout_problems_name_the_folder(tmp_path: Path) -> None:
    raw = write_release(tmp_path / "raw")
    twin = raw / "M3D_Cap/ct_quizze/015533/Poschl_bone_window"
    write_series(twin, 8)
    with pytest.raises(
        DataError, match=r"015533: series 'Poschl_bone_window' and 'Pöschl_bone_window' both fold"
    ):
        prepare(raw, tmp_path / "o1")
    manifest = prepare(raw, tmp_path / "o2", on_error="skip")
    assert [s["source"] for s in manifest["skipped"]] == ["M3D_Cap/ct_quizze/015533"]
    zipped = tmp_path / "zipped"
    (zipped / "M3D_Cap" / "ct_case").mkdir(parents=True)
    (zipped / "M3D_Cap" / "ct_case" / "ct_case_00.zip").write_bytes(b"PK")
    with pytest.raises(
        DataError, match=r"ct_case: holds 1 .zip archive\(s\) \(ct_case_00.zip, ...\) and no case"
    ):
        prepare(zipped, tmp_path / "o3")
    nested = tmp_path / "nested"
    write_series(nested / "M3D_Cap/ct_case/ct_case/000001/Axial", 4)
    (nested / "M3D_Cap/ct_case/ct_case/000001/text.txt").write_text("study_findings: x")
    with pytest.raises(DataError, match=r"M3D_Cap/ct_case: its case folders sit one level too deep"):
        prepare(nested, tmp_path / "o4")


def test_a_vqa_row_about_no_series_of_the_tree_is_bad_input(tmp_path: Path) -> None:
    raw = write_release(tmp_path / "raw")
    test5k = raw / "M3D-VQA" / "M3D_VQA_test5k.csv"
    test5k.write_text(
        test5k.read_text().replace(
            "M3D_Cap_npy/ct_quizze/024421/Axial_non_contrast.npy", "M3D_Cap_npy/ct_quizze/999999/Axial.npy"
        )
    )
    with pytest.raises(
        DataError, match=r"test5k.csv: 1 row\(s\) name no series of the raw tree \(first: line 2"
    ):
        prepare(raw, tmp_path / "o1")
    manifest = prepare(raw, tmp_path / "o2", on_error="skip")
    assert manifest["vqa"]["M3D_VQA_test5k.csv"]["kept"] == 0
    assert manifest["skipped"][0]["source"].endswith("M3D_VQA_test5k.csv")
