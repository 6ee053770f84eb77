"""Leakage report and strict split on a constructed overlap."""

from __future__ import annotations

import pytest

from med3dvlm.data.leakage import Item, case_id, format_leakage, split_leakage, strict_split


def entry(case: str, series: str, text: str) -> dict:
    return {"image": f"M3D_Cap/ct_case/{case}/{series}.npy", "report": text}


SPLITS = {
    "train": [entry("000001", "axial", "Liver cyst."), entry("000002", "axial", "Normal  study.")],
    "validation": [entry("000009", "axial", "Liver cyst.")],
    "test": [
        entry("000001", "coronal", "Another view of the cyst."),  # same case as train
        entry("000003", "axial", "Normal study."),  # same text as train (whitespace differs)
        entry("000004", "axial", "Spleen lesion."),  # clean
        entry("000002", "sagittal", "Liver cyst."),  # both
    ],
}


def test_case_id_is_the_volume_folder():
    assert case_id("M3D_Cap/ct_case/000006/Axial_C__portal_venous_phase.npy") == "M3D_Cap/ct_case/000006"
    assert case_id("M3D_Cap\\ct_case\\000006\\a.npy") == "M3D_Cap/ct_case/000006"


def test_split_leakage_lists_cases_and_texts_with_counts():
    def items(split):
        return [Item(e["image"], case_id(e["image"]), e["report"]) for e in SPLITS[split]]

    report = split_leakage(items("train"), items("test"))
    assert report.leaking == {
        "M3D_Cap/ct_case/000001/coronal.npy": ["case"],
        "M3D_Cap/ct_case/000003/axial.npy": ["text"],
        "M3D_Cap/ct_case/000002/sagittal.npy": ["case", "text"],
    }
    assert report.counts() == {
        "train_items": 2,
        "test_items": 4,
        "leaking_test_items": 3,
        "by_case": 2,
        "by_text": 2,
        "shared_cases": 2,
        "shared_texts": 2,
    }
    assert report.shared_texts == {"Normal study.": 1, "Liver cyst.": 1}
    table = format_leakage(report, "captions")
    assert "| leaking_test_items | 3 |" in table and "000003/axial.npy | text |" in table


def test_no_overlap_reports_nothing():
    report = split_leakage(
        [Item("a/1/x", "a/1", "t")], [Item("a/2/x", "a/2", "u"), Item("a/3/x", "a/3", None)]
    )
    assert report.leaking == {} and report.counts()["leaking_test_items"] == 0


def test_strict_split_moves_leaking_test_items_to_train():
    out, report = strict_split(SPLITS, image_of=lambda e: e["image"], text_of=lambda e: e["report"])
    assert [e["image"] for e in out["test"]] == ["M3D_Cap/ct_case/000004/axial.npy"]
    assert len(out["train"]) == 5 and out["validation"] == SPLITS["validation"]
    assert len(report.leaking) == 3
    # Nothing leaks any more, and the input is untouched.
    again, second = strict_split(out, image_of=lambda e: e["image"], text_of=lambda e: e["report"])
    assert second.leaking == {} and again == out
    assert len(SPLITS["test"]) == 4
    with pytest.raises(KeyError, match="no 'train' split"):
        strict_split({"test": []}, image_of=str, text_of=str)


def test_prepare_strict_split_moves_leaking_test_items_and_their_vqa_rows(tmp_path):
    """Raw M3D whose split file puts one study's series on both sides and one report text in both."""
    import csv
    import json

    from test_prepare import VQA_COLUMNS, prepare, write_raw_m3d

    raw = write_raw_m3d(tmp_path / "raw", cases=4, slices=6)
    series = {0: "Axial_non_contrast", 1: "Coronal_arterial_phase"}
    placement = {  # (case, series) -> split
        (0, 0): "train",
        (0, 1): "test",  # same case on both sides
        (1, 0): "train",
        (1, 1): "train",
        (2, 0): "test",
        (2, 1): "test",  # same report text as case 1
        (3, 0): "test",
        (3, 1): "test",  # clean
    }
    entries = {"train": [], "validation": [], "test": []}
    for (case, s), split in placement.items():
        entries[split].append(
            {"image": f"ct_case/{case:06d}/{series[s]}.npy", "text": f"ct_case/{case:06d}/text.txt"}
        )
    (raw / "M3D_Cap" / "M3D_Cap.json").write_text(json.dumps(entries))
    shared = "study_findings: A 12 mm cyst in the liver."
    for case in (1, 2):
        (raw / "M3D_Cap" / "ct_case" / f"{case:06d}" / "text.txt").write_text(shared)
    with open(raw / "M3D-VQA" / "M3D_VQA_train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for name, cases in (("train", ("000001", "000002")), ("test", ("000000", "000003"))):
        with open(raw / "M3D-VQA" / f"M3D_VQA_{name}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=VQA_COLUMNS)
            writer.writeheader()
            writer.writerows(r for r in rows if r["Image Path"].split("/")[1] in cases)

    plain = prepare(raw, tmp_path / "plain")
    assert plain["strict_split"] is None and plain["counts"]["split_test"] == 5
    manifest = prepare(raw, tmp_path / "strict", strict_split=True)
    out = tmp_path / "strict"
    split = json.loads((out / "M3D_Cap.json").read_text())
    assert sorted(e["image"] for e in split["test"]) == [
        "M3D_Cap/ct_case/000003/Axial_non_contrast.npy",
        "M3D_Cap/ct_case/000003/Coronal_arterial_phase.npy",
    ]
    assert len(split["train"]) == 6
    moved = manifest["strict_split"]["captions"]
    assert moved["leaking"] == {
        "M3D_Cap/ct_case/000000/Coronal_arterial_phase.npy": ["case", "text"],  # one report per study
        "M3D_Cap/ct_case/000002/Axial_non_contrast.npy": ["text"],
        "M3D_Cap/ct_case/000002/Coronal_arterial_phase.npy": ["text"],
    }
    assert moved["shared_texts"]["A 12 mm cyst in the liver."] == 2
    assert manifest["counts"]["strict_split_moved"] == 3 and manifest["counts"]["split_test"] == 2
    # VQA: the test rows about case 000000 (now train only) moved to the train CSV; 000003 stays.
    with open(out / "M3D-VQA" / "M3D_VQA_test.csv", newline="") as fh:
        test_rows = list(csv.DictReader(fh))
    assert {r["Image Path"].split("/")[2] for r in test_rows} == {"000003"}
    assert manifest["vqa"]["M3D_VQA_test.csv"]["moved_to_train"] == 2
    assert manifest["counts"]["strict_split_vqa_rows_moved"] == 2
    with open(out / "M3D-VQA" / "M3D_VQA_train.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4 + 2
