"""VQA scoring on the M3D benchmark protocol: closed-ended accuracy and per-type aggregation.

Closed questions are multiple choice (A-D). The benchmark's rule (M3D ``eval_close_vqa.py`` and
Med3DVLM's evaluation: ``correct = answer_choice + "." in output``) counts an output as correct
when the right letter followed by a period appears anywhere in it, so ``"A. B."`` is right for
both A and B and a bare ``"C"`` is wrong. The strict rule reported beside it parses the first
answer letter of the output (:func:`first_answer_letter`) and compares that one. Both rules are
case-sensitive, like the original.

Question types 1..5 are Plane, Phase, Organ, Abnormality and Location; every aggregate is given
per type and overall (all questions pooled, not a mean of the type means).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

QUESTION_TYPES: dict[str, str] = {
    "1": "Plane",
    "2": "Phase",
    "3": "Organ",
    "4": "Abnormality",
    "5": "Location",
}
OVERALL = "Overall"
CHOICE_LETTERS = ("A", "B", "C", "D")
# A capital A-D standing alone (no letter or digit before it) and followed by ".", ")" or ":",
# or ending the output: "B. Liver", "(C)", "Answer: D", a bare "A". "A liver" is an article.
_ANSWER_LETTER = re.compile(r"(?<![A-Za-z0-9])([A-D])(?:[.):]|\s*$)")


def substring_correct(output: str, letter: str) -> bool:
    """The benchmark's rule: ``"<letter>."`` occurs anywhere in the output."""
    return f"{letter}." in output


def first_answer_letter(output: str) -> str | None:
    """The first answer letter of an output (see ``_ANSWER_LETTER``), or None."""
    match = _ANSWER_LETTER.search(output.strip())
    return match.group(1) if match else None


def strict_correct(output: str, letter: str) -> bool:
    """The strict rule: the first answer letter parsed from the output is ``letter``."""
    return first_answer_letter(output) == letter


def type_name(question_type: str | int) -> str:
    """``"3"`` -> ``"Organ"``; an unknown type keeps its own label."""
    return QUESTION_TYPES.get(str(question_type).strip(), str(question_type).strip())


def per_type_means(values: Sequence[float], question_types: Sequence[str | int]) -> dict[str, float]:
    """Mean of per-sample ``values`` for each question type (named, in type order) and overall."""
    if len(values) != len(question_types):
        raise ValueError(f"{len(values)} values but {len(question_types)} question types")
    groups: dict[str, list[float]] = {}
    for value, qtype in zip(values, question_types):
        groups.setdefault(type_name(qtype), []).append(float(value))
    order = [name for name in QUESTION_TYPES.values() if name in groups]
    order += sorted(name for name in groups if name not in order)
    means = {name: sum(groups[name]) / len(groups[name]) for name in order}
    if values:
        means[OVERALL] = float(sum(values)) / len(values)
    return means


def per_type_counts(question_types: Sequence[str | int]) -> dict[str, int]:
    """Number of questions per type and overall."""
    counts: dict[str, int] = {}
    for qtype in question_types:
        counts[type_name(qtype)] = counts.get(type_name(qtype), 0) + 1
    counts[OVERALL] = len(question_types)
    return counts


def closed_vqa_metrics(
    outputs: Sequence[str], letters: Sequence[str], question_types: Sequence[str | int]
) -> dict[str, dict[str, float]]:
    """``{"accuracy": per type, "accuracy_strict": per type, "count": per type}``."""
    if not len(outputs) == len(letters) == len(question_types):
        raise ValueError("outputs, answer letters and question types differ in length")
    bad = [letter for letter in letters if letter not in CHOICE_LETTERS]
    if bad:
        raise ValueError(f"answer choices must be one of {CHOICE_LETTERS}, got {bad[0]!r}")
    substring = [float(substring_correct(o, c)) for o, c in zip(outputs, letters)]
    strict = [float(strict_correct(o, c)) for o, c in zip(outputs, letters)]
    return {
        "accuracy": per_type_means(substring, question_types),
        "accuracy_strict": per_type_means(strict, question_types),
        "count": per_type_counts(question_types),
    }


def open_vqa_metrics(
    scores: Mapping[str, Sequence[float]], question_types: Sequence[str | int]
) -> dict[str, dict[str, float]]:
    """Per-type means of each per-sample text metric (``{"bleu": [...], ...}``), plus counts."""
    result = {name: per_type_means(values, question_types) for name, values in scores.items()}
    result["count"] = per_type_counts(question_types)
    return result
