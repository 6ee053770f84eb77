"""RadGenome-ChestCT VQA scoring: hit score, presence accuracy, size parsing and error, by hand."""

from __future__ import annotations

import math

import pytest

from med3dvlm.metrics.radgenome import (
    hit_score,
    parse_size_mm,
    presence_accuracy,
    radgenome_vqa_metrics,
    size_error_mm,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6x4 mm", [6.0, 4.0]),
        ("2.3 cm", [23.0]),
        ("12 x 8 x 5 mm", [12.0, 8.0, 5.0]),
        ("1.2x0.8cm", [12.0, 8.0]),
        ("6 mm x 4 mm", [6.0, 4.0]),
        ("6mmx4mm", [6.0, 4.0]),
        ("1.5 cm x 8 mm", [15.0, 8.0]),  # each dimension keeps its own unit
        ("10 by 7 millimeters", [10.0, 7.0]),
        ("3.5 CM", [35.0]),
        ("12×9 mm", [12.0, 9.0]),
        ("approximately 5mm.", [5.0]),
        ("T12 level, 6 mm nodule", [6.0]),  # "12" has no unit: not a size
        ("nodules of 4 mm and 6 mm", [4.0]),  # the first measurement
        ("6x4", None),  # no unit is never guessed
        ("6x4 mmHg", None),  # a unit must end the word
        ("small nodule", None),
        ("", None),
    ],
)
def test_parse_size_mm(text: str, expected: list[float] | None):
    parsed = parse_size_mm(text)
    assert parsed == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    ("prediction", "reference", "score"),
    [
        ("Lung/Left lung", " lung/left lung ", 1.0),  # exact after strip + lower case
        ("lung/left lung", "lung/right lung", 1 / 2),  # {lung} shared of 2 parts each
        ("lung/left lung/left lower lobe", "lung/left lung", 2 / 3),  # 2 shared, larger count 3
        ("left lung/lung", "lung/left lung", 1.0),  # not an exact string, but both parts shared
        ("lung / left lung", "lung/left lung", 1.0),  # parts are stripped
        ("heart", "lung/left lung", 0.0),
        ("", "lung", 0.0),
        ("/", "//", 0.0),  # no parts on either side: no division by zero
        ("nodule", "Nodule", 1.0),
    ],
)
def test_hit_score(prediction: str, reference: str, score: float):
    assert hit_score(prediction, reference) == pytest.approx(score)


def test_presence_accuracy():
    # "Yes"=yes right, "no."=no right, "yes"!=no wrong, " No "=no right -> 3/4
    assert presence_accuracy(["Yes", "no.", "yes", " No "], ["yes", "no", "no", "No"]) == 0.75
    # exact match only: a sentence is not a yes
    assert presence_accuracy(["Yes, there is a nodule."], ["yes"]) == 0.0
    with pytest.raises(ValueError):
        presence_accuracy(["yes"], ["yes", "no"])


@pytest.mark.parametrize(
    ("prediction", "reference", "error"),
    [
        ("6x4 mm", "6x4 mm", 0.0),
        ("1.2x0.8cm", "12 x 8 mm", 0.0),  # cm -> mm
        ("4x6 mm", "6x4 mm", 0.0),  # dimensions compared largest first
        ("8x4 mm", "6x4 mm", 1.0),  # |8-6| + |4-4| = 2, over 2 dimensions
        ("6 mm", "6x4 mm", 2.0),  # [6, 0] vs [6, 4]: (0 + 4) / 2
        ("12 x 8 x 5 mm", "10x8 mm", 7 / 3),  # [12, 8, 5] vs [10, 8, 0]: (2 + 0 + 5) / 3
        ("2 cm", "15 mm", 5.0),
    ],
)
def test_size_error_mm(prediction: str, reference: str, error: float):
    assert size_error_mm(prediction, reference) == pytest.approx(error)


def test_size_error_is_none_when_unparseable():
    assert size_error_mm("a small nodule", "6x4 mm") is None
    assert size_error_mm("6x4 mm", "small") is None


def test_radgenome_vqa_metrics_groups_by_kind():
    rows = [
        {"kind": "size", "prediction": "6 mm", "reference": "6x4 mm"},  # error 2
        {"kind": "abnormality", "prediction": "nodule", "reference": "Nodule"},  # hit 1
        {"kind": "presence", "prediction": "Yes.", "reference": "yes"},  # right
        {"kind": "location", "prediction": "lung/left lung", "reference": "lung/right lung"},  # hit 1/2
        {"kind": "size", "prediction": "1 cm", "reference": "8 mm"},  # error 2
        {"kind": "abnormality", "prediction": "effusion", "reference": "nodule"},  # hit 0
        {"kind": "presence", "prediction": "no", "reference": "yes"},  # wrong
        {"kind": "size", "prediction": "it is small", "reference": "5 mm"},  # unparseable prediction
        {"kind": "size", "prediction": "5 mm", "reference": "tiny"},  # unparseable reference
    ]
    result = radgenome_vqa_metrics(rows)
    assert list(result) == ["abnormality", "location", "presence", "size"]
    assert result["abnormality"] == {"hit_score": 0.5, "count": 2}
    assert result["location"] == {"hit_score": 0.5, "count": 1}
    assert result["presence"] == {"accuracy": 0.5, "count": 2}
    assert result["size"] == {
        "mean_l1_mm": pytest.approx(2.0),
        "scored": 2,
        "unparseable_prediction": 1,
        "unparseable_reference": 1,
        "count": 4,
    }


def test_radgenome_vqa_metrics_edge_cases():
    only_bad = radgenome_vqa_metrics([{"kind": "size", "prediction": "big", "reference": "6 mm"}])
    assert math.isnan(only_bad["size"]["mean_l1_mm"]) and only_bad["size"]["unparseable_prediction"] == 1
    with pytest.raises(ValueError, match="unknown question kind"):
        radgenome_vqa_metrics([{"kind": "plane", "prediction": "axial", "reference": "axial"}])
