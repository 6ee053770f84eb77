"""RadGenome-ChestCT VQA scoring, following the authors' evaluation.

Question kinds and their scores:

- abnormality, location (and disorders): hit score (:func:`hit_score`); the authors also report
  BLEU-4, ROUGE and BERTScore, which come from :mod:`med3dvlm.metrics.text`;
- presence: exact-match accuracy (:func:`presence_accuracy`);
- size: mean L1 error in mm after unit parsing (:func:`size_error_mm`); a prediction with no
  parseable size is counted as unparseable, not given an invented error.

Answers are normalised by stripping surrounding whitespace and lower-casing (:func:`normalise`);
presence answers also lose trailing ``.``/``!`` (:func:`normalise_presence`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

HIT_KINDS: tuple[str, ...] = ("abnormality", "location", "disorders")
KINDS: tuple[str, ...] = (*HIT_KINDS, "presence", "size")

_NUMBER = r"\d+(?:\.\d+)?"
# A unit may be followed by "x" (the next dimension, "6mmx4mm") but not by another letter.
_UNIT = r"(?:mm|cm|millimet(?:er|re)s?|centimet(?:er|re)s?)(?![a-wyz])"
_SEPARATOR = r"(?:[x×*]|by)"
# One measurement: dimensions joined by a separator, each with an optional unit, the last with a
# required one ("6x4 mm", "6 mm x 4 mm", "1.2x0.8cm", "2.3 cm"). No digit or "." just before it.
_MEASUREMENT = re.compile(
    rf"(?<![\d.])(?:{_NUMBER}\s*(?:{_UNIT})?\s*{_SEPARATOR}\s*)*{_NUMBER}\s*{_UNIT}", re.IGNORECASE
)
_DIMENSION = re.compile(rf"({_NUMBER})\s*({_UNIT})?", re.IGNORECASE)


def normalise(text: str) -> str:
    """Surrounding whitespace stripped, lower case."""
    return text.strip().lower()


def normalise_presence(text: str) -> str:
    """:func:`normalise`, then trailing ``.``/``!`` and whitespace dropped: ``"Yes."`` -> ``"yes"``."""
    return normalise(text).rstrip(".! ")


def _parts(text: str) -> set[str]:
    """The non-empty ``/``-separated parts of a normalised answer (``lung/left lung``)."""
    return {part.strip() for part in normalise(text).split("/") if part.strip()}


def hit_score(prediction: str, reference: str) -> float:
    """1 for an exact match after :func:`normalise`, else shared ``/``-parts over the larger part count.

    ``"lung/left lung"`` vs ``"lung/right lung"`` shares one of two parts: 0.5. Parts are
    compared as sets after stripping each; an answer with no parts (``""``, ``"/"``) scores 0
    against any other answer.
    """
    if normalise(prediction) == normalise(reference):
        return 1.0
    predicted, expected = _parts(prediction), _parts(reference)
    return len(predicted & expected) / max(len(predicted), len(expected), 1)


def presence_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of exact matches after :func:`normalise_presence` (``"Yes."`` matches ``"yes"``)."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need equal, non-zero counts, got {len(predictions)} and {len(references)}")
    hits = sum(normalise_presence(p) == normalise_presence(r) for p, r in zip(predictions, references))
    return hits / len(references)


def _millimetres(value: str, unit: str) -> float:
    return float(value) * (10.0 if unit.lower().startswith("c") else 1.0)


def parse_size_mm(text: str) -> list[float] | None:
    """The dimensions in mm of the first measurement in ``text``, or None when there is none.

    A measurement is numbers joined by ``x``, ``×``, ``*`` or ``by`` ending in a unit (mm, cm or
    spelt out; any case): ``"12 x 8 x 5 mm"`` -> ``[12, 8, 5]``, ``"1.2x0.8cm"`` -> ``[12, 8]``.
    A dimension without its own unit takes the measurement's last unit. A bare number with no
    unit (``"6x4"``) is not a size: the unit is never guessed.
    """
    match = _MEASUREMENT.search(text)
    if match is None:
        return None
    dimensions = _DIMENSION.findall(match.group(0))
    last_unit = dimensions[-1][1]
    return [_millimetres(value, unit or last_unit) for value, unit in dimensions]


def size_error_mm(prediction: str, reference: str) -> float | None:
    """Mean absolute difference in mm between predicted and reference dimensions, or None.

    Both dimension lists are sorted largest first and the shorter is padded with zeros, so a
    missing or extra dimension costs its full length: ``"6 mm"`` vs ``"6x4 mm"`` -> (0 + 4) / 2.
    None when either side has no parseable size (:func:`parse_size_mm`).
    """
    predicted, expected = parse_size_mm(prediction), parse_size_mm(reference)
    if predicted is None or expected is None:
        return None
    width = max(len(predicted), len(expected))
    predicted = sorted(predicted, reverse=True) + [0.0] * (width - len(predicted))
    expected = sorted(expected, reverse=True) + [0.0] * (width - len(expected))
    return sum(abs(p - e) for p, e in zip(predicted, expected)) / width


def _size_summary(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean L1 over rows where both sides parse; unparseable rows counted, not scored."""
    errors: list[float] = []
    bad_reference = bad_prediction = 0
    for prediction, reference in zip(predictions, references):
        if parse_size_mm(reference) is None:
            bad_reference += 1
        elif (error := size_error_mm(prediction, reference)) is None:
            bad_prediction += 1
        else:
            errors.append(error)
    return {
        "mean_l1_mm": sum(errors) / len(errors) if errors else float("nan"),
        "scored": len(errors),
        "unparseable_prediction": bad_prediction,
        "unparseable_reference": bad_reference,
        "count": len(references),
    }


def radgenome_vqa_metrics(rows: Sequence[Mapping[str, str]]) -> dict[str, dict[str, float]]:
    """Scores per question kind present in ``rows``, in ``KINDS`` order.

    Each row has ``kind`` (one of ``KINDS``), ``prediction`` and ``reference``. Hit kinds give
    ``{"hit_score", "count"}``, presence ``{"accuracy", "count"}``, size the keys of
    ``mean_l1_mm`` (NaN when no row could be scored), ``scored``, ``unparseable_prediction``,
    ``unparseable_reference`` and ``count``.
    """
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for row in rows:
        kind = row["kind"]
        if kind not in KINDS:
            raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")
        predictions, references = groups.setdefault(kind, ([], []))
        predictions.append(row["prediction"])
        references.append(row["reference"])
    result: dict[str, dict[str, float]] = {}
    for kind in (k for k in KINDS if k in groups):
        predictions, references = groups[kind]
        if kind == "presence":
            result[kind] = {"accuracy": presence_accuracy(predictions, references), "count": len(references)}
        elif kind == "size":
            result[kind] = _size_summary(predictions, references)
        else:
            hits = [hit_score(p, r) for p, r in zip(predictions, references)]
            result[kind] = {"hit_score": sum(hits) / len(hits), "count": len(hits)}
    return result
