"""Closed-VQA rules on tricky outputs and per-type aggregation."""

from __future__ import annotations

import pytest

from med3dvlm.metrics.vqa import (
    closed_vqa_metrics,
    first_answer_letter,
    open_vqa_metrics,
    per_type_means,
    strict_correct,
    substring_correct,
)


@pytest.mark.parametrize(
    ("output", "letter", "substring", "strict"),
    [
        ("B. Liver", "B", True, True),
        ("A. B.", "A", True, True),
        ("A. B.", "B", True, False),  # the benchmark's rule accepts any "<letter>." in the output
        ("The answer is C.", "C", True, True),
        ("c. kidney", "C", False, False),  # both rules are case-sensitive
        ("A", "A", False, True),  # no period: the benchmark's rule misses it
        ("Answer: D", "D", False, True),
        ("(C) spleen", "C", False, True),
        ("A liver lesion. C. Spleen", "C", True, True),  # the article "A" is not an answer
        ("Liver", "B", False, False),
        ("", "A", False, False),
    ],
)
def test_closed_rules(output, letter, substring, strict):
    assert substring_correct(output, letter) is substring
    assert strict_correct(output, letter) is strict


def test_first_answer_letter():
    assert first_answer_letter("  B. Liver ") == "B"
    assert first_answer_letter("D) pancreas") == "D"
    assert first_answer_letter("Axial plane") is None
    assert first_answer_letter("E. none") is None


def test_per_type_means_named_in_type_order_and_pooled_overall():
    means = per_type_means([1, 0, 1, 1, 0], ["3", "3", "1", 5, "3"])
    assert list(means) == ["Plane", "Organ", "Location", "Overall"]
    assert means["Organ"] == pytest.approx(1 / 3)
    assert means["Plane"] == 1.0 and means["Location"] == 1.0
    # Overall pools every question (3/5), not the mean of type means (7/9).
    assert means["Overall"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="2 values but 1 question types"):
        per_type_means([1, 0], ["1"])


def test_closed_vqa_metrics():
    metrics = closed_vqa_metrics(["A. x", "A. B.", "C"], ["A", "B", "C"], ["1", "2", "2"])
    assert metrics["accuracy"] == {"Plane": 1.0, "Phase": 0.5, "Overall": pytest.approx(2 / 3)}
    assert metrics["accuracy_strict"] == {"Plane": 1.0, "Phase": 0.5, "Overall": pytest.approx(2 / 3)}
    assert metrics["count"] == {"Plane": 1, "Phase": 2, "Overall": 3}
    with pytest.raises(ValueError, match="answer choices"):
        closed_vqa_metrics(["A."], ["E"], ["1"])


def test_open_vqa_metrics_per_type():
    metrics = open_vqa_metrics({"bleu": [1.0, 0.0, 0.5]}, ["4", "4", "2"])
    assert metrics["bleu"] == {"Phase": 0.5, "Abnormality": 0.5, "Overall": 0.5}
    assert metrics["count"]["Abnormality"] == 2
