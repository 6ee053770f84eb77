"""Leakage report and strict split on a constructed overlap."""

from __future__ import annotations

import pytest

from med3dvlm.metrics.leakage import Item, case_id, format_leakage, split_leakage, strict_split


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
    assert report.counts() == {"train_items": 2, "test_items": 4, "leaking_test_items": 3, "by_case": 2,
                               "by_text": 2, "shared_cases": 2, "shared_texts": 2}
    assert report.shared_texts == {"Normal study.": 1, "Liver cyst.": 1}
    table = format_leakage(report, "captions")
    assert "| leaking_test_items | 3 |" in table and "000003/axial.npy | text |" in table


def test_no_overlap_reports_nothing():
    report = split_leakage([Item("a/1/x", "a/1", "t")], [Item("a/2/x", "a/2", "u"), Item("a/3/x", "a/3", None)])
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
