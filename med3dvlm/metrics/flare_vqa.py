"""FLARE 2025 Task 5 VQA scoring, exactly as the challenge scorer (Med3DVLM's ``eval_vqa.py``).

Predictions are a CSV with columns ``case_id, scope, question_id, question, prediction``: one
``global`` row per global question (empty ``question_id``) and one ``local`` row per question
chain (``question_id`` = the chain root's id, ``prediction`` = ``a1|a2|...`` in chain order).
Ground truth is the parsed ``val.json``: a list of case records with ``case_id``, ``global_vqa``
and ``local_vqa``. Cases are matched on :func:`canonical_case_id`; labels on :func:`normalise`.

The reference scorer (:func:`global_accuracy`, :func:`local_accuracy`), with its quirks:

- Rows, not cases, are the unit. Every global row is compared with ``global_vqa[0]``, so a case
  with several global rows counts several times; a case without rows is not penalised.
- Global: the prediction is split on ``,`` (empty items dropped, duplicates kept); accuracy =
  hits / max(#predicted, #true), hits counting each predicted item found among the true labels
  (so ``a,a`` against ``[a]`` scores 2/2), and 1.0 when both lists are empty. A string ``answer``
  is iterated character by character, as the original does.
- A prediction cell that pandas reads as missing (empty, ``None``, ``NA``, ... see
  :data:`PANDAS_NA_VALUES`) becomes the text ``"nan"`` (the original calls ``str()`` on the NaN),
  i.e. one wrong label, or a wrong chain root. ``vqa.py`` writes ``None`` for an empty
  generation, which therefore scores as ``"nan"`` too.
- Local: a chain is its root followed by every question whose ``follow_up`` links lead to that
  root, in ascending id order (not the direct-children, JSON-order chain that inference asks).
  A row whose root is wrong scores 0; otherwise (#positions equal to the truth) / chain length,
  the root included and missing positions compared as ``""``. A row whose ``question_id`` is
  not a chain root is skipped; chains without a row are not penalised; duplicate rows count
  twice. A local row without ``question_id`` raises ValueError.
- A CSV case absent from the ground truth raises :class:`UnknownCaseError` (a KeyError).
- Both accuracies are rounded to 6 decimals; 0.0 when nothing is counted.

:func:`strict_scores` is reported beside it and differs only where the reference is lenient:
the unit is the ground-truth case (global) and chain (local); only a case's first global row and
the first row per chain count; a missing global row or chain row scores 0; a missing prediction
is an empty label set (an empty chain); labels are de-duplicated (sets); a string answer is one
label. Chains, normalisation and the per-item formulas are the reference's.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

CSV_COLUMNS: tuple[str, ...] = ("case_id", "scope", "question_id", "question", "prediction")
# pandas' default ``na_values`` (pandas 2.x and 3.x ``STR_NA_VALUES``): a cell exactly equal to
# one of these (no stripping, quoted or not) is read as NaN.
PANDAS_NA_VALUES: frozenset[str] = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)

CaseRecord = Mapping[str, Any]
_NUMBERING = re.compile(r"^\s*\d+\.\s*")


class UnknownCaseError(KeyError):
    """A prediction names a case that the ground truth does not have."""


@dataclass(frozen=True)
class PredictionRow:
    """One predictions.csv row. ``scope`` is ``"global"`` or ``"local"`` (other values are
    ignored by the scorers); ``question_id`` is the chain root's id on local rows, else None;
    ``prediction`` is None for a cell pandas reads as missing."""

    case_id: str
    scope: str
    question_id: int | None
    question: str
    prediction: str | None


def canonical_case_id(case_id: str) -> str:
    """Base name without ``.nii.gz`` or else its last suffix: ``x/amos_0001.nii.gz``,
    ``amos_0001.npy`` -> ``amos_0001`` (POSIX separators, as the original on Linux)."""
    name = PurePosixPath(case_id).name
    if name.endswith(".nii.gz"):
        return name[: -len(".nii.gz")]
    return PurePosixPath(name).stem


def normalise(value: object) -> str:
    """``""`` for None or NaN, else ``str(value).strip().lower()``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip().lower()


def format_chain_prediction(text: str) -> str:
    """The original's ``format_pred``: when every non-empty line starts with ``<digits>.``, the
    items without their numbers joined with ``|``; otherwise ``text`` unchanged."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    items = [_NUMBERING.sub("", line).strip() for line in lines if _NUMBERING.match(line)]
    return "|".join(items) if items and len(items) == len(lines) else text


def _missing(cell: str | None) -> bool:
    return cell is None or cell in PANDAS_NA_VALUES


def _pandas_text(cell: str | None) -> str:
    """What ``str(cell)`` gives after pandas read it: ``"nan"`` for a missing cell."""
    return "nan" if _missing(cell) else str(cell)


def _question_id(cell: str | None) -> int | None:
    # pandas reads the column as float (global rows are empty) and the scorer calls int() on it.
    return None if _missing(cell) else int(float(cell))


def read_predictions(path: str | os.PathLike) -> list[PredictionRow]:
    """Rows of a predictions CSV, read as pandas reads them where the scorer depends on it:
    columns by header name, blank lines skipped, :data:`PANDAS_NA_VALUES` cells missing and
    ``question_id`` through float (``"3.0"`` -> 3; a non-number raises ValueError). Other cells
    stay text (pandas would turn an all-numeric prediction column into numbers)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        absent = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if absent:
            raise ValueError(f"{path}: predictions CSV lacks columns {absent}")
        return [
            PredictionRow(
                case_id=row["case_id"] or "",
                scope=row["scope"] or "",
                question_id=_question_id(row["question_id"]),
                question=row["question"] or "",
                prediction=None if _missing(row["prediction"]) else row["prediction"],
            )
            for row in reader
        ]


def write_predictions(path: str | os.PathLike, rows: Iterable[PredictionRow]) -> None:
    """Write the challenge CSV (columns in :data:`CSV_COLUMNS` order, None as an empty cell)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            question_id = "" if row.question_id is None else row.question_id
            prediction = "" if row.prediction is None else row.prediction
            writer.writerow([row.case_id, row.scope, question_id, row.question, prediction])


def _index(gt: Iterable[CaseRecord]) -> dict[str, CaseRecord]:
    return {canonical_case_id(record["case_id"]): record for record in gt}


def _record(index: Mapping[str, CaseRecord], case_id: str) -> CaseRecord:
    key = canonical_case_id(case_id)
    if key not in index:
        raise UnknownCaseError(f"prediction case {case_id!r} ({key}) is not in the ground truth")
    return index[key]


def _first_global_answer(record: CaseRecord) -> Any:
    if not record["global_vqa"]:
        raise IndexError(f"case {record['case_id']!r} has no global question")
    return record["global_vqa"][0]["answer"]


def _global_row_score(prediction: str | None, answer: Any) -> float:
    predicted = [normalise(p) for p in _pandas_text(prediction).split(",") if normalise(p)]
    truth = [normalise(a) for a in answer]
    if not predicted and not truth:
        return 1.0
    return sum(p in truth for p in predicted) / max(len(predicted), len(truth))


def question_chains(local_vqa: Sequence[Mapping[str, Any]]) -> dict[int, list[int]]:
    """Root id -> [root, other members by ascending id]; members are all questions whose
    ``follow_up`` links lead to the root. Raises ValueError on a dangling link or a cycle."""
    parent = {q["id"]: q["follow_up"] for q in local_vqa}
    members: dict[int, set[int]] = {}
    for qid in parent:
        root, seen = qid, {qid}
        while parent[root] != -1:
            root = parent[root]
            if root not in parent or root in seen:
                raise ValueError(f"question {qid}: follow_up chain is broken or cyclic at {root}")
            seen.add(root)
        members.setdefault(root, set()).add(qid)
    return {root: [root, *sorted(ids - {root})] for root, ids in members.items()}


def _chain_score(predicted: list[str], chain: list[int], answers: Mapping[int, str]) -> float:
    """0 unless the root is right; else the share of chain positions answered right."""
    if not predicted or predicted[0] != answers[chain[0]]:
        return 0.0
    hits = sum((predicted[k] if k < len(predicted) else "") == answers[qid] for k, qid in enumerate(chain))
    return hits / len(chain)


def _root_id(row: PredictionRow) -> int:
    if row.question_id is None:
        raise ValueError(f"local row of case {row.case_id!r} has no question_id")
    return row.question_id


def _mean6(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 6) if values else 0.0


def global_row_scores(rows: Iterable[PredictionRow], gt: Iterable[CaseRecord]) -> list[float]:
    """Per global row, the reference's accuracy against its case's ``global_vqa[0]``."""
    index = _index(gt)
    return [
        _global_row_score(row.prediction, _first_global_answer(_record(index, row.case_id)))
        for row in rows
        if row.scope == "global"
    ]


def local_row_scores(rows: Iterable[PredictionRow], gt: Iterable[CaseRecord]) -> tuple[list[float], int]:
    """Per counted local row, its chain score; and the number of rows skipped (unknown root).

    Rows are taken case by case in sorted ``case_id`` order (pandas ``groupby``), so the sum
    adds up in the original's order."""
    index = _index(gt)
    by_case: dict[str, list[PredictionRow]] = {}
    for row in rows:
        if row.scope == "local":
            by_case.setdefault(row.case_id, []).append(row)
    scores: list[float] = []
    skipped = 0
    for case_id in sorted(by_case):
        local_vqa = _record(index, case_id)["local_vqa"]
        case_chains = question_chains(local_vqa)
        answers = {q["id"]: normalise(q["answer"]) for q in local_vqa}
        for row in by_case[case_id]:
            root = _root_id(row)
            if root not in case_chains:
                skipped += 1
                continue
            predicted = [normalise(p) for p in _pandas_text(row.prediction).split("|")]
            scores.append(_chain_score(predicted, case_chains[root], answers))
    return scores, skipped


def global_accuracy(rows: Iterable[PredictionRow], gt: Iterable[CaseRecord]) -> float:
    """The reference global accuracy: mean over global rows, rounded to 6 decimals."""
    return _mean6(global_row_scores(rows, gt))


def local_accuracy(rows: Iterable[PredictionRow], gt: Iterable[CaseRecord]) -> float:
    """The reference local accuracy: mean over counted local rows, rounded to 6 decimals."""
    return _mean6(local_row_scores(rows, gt)[0])


def _strict_labels(value: Any) -> set[str]:
    items = [value] if isinstance(value, str) else value
    return {normalise(item) for item in items} - {""}


def _strict_global(prediction: str | None, answer: Any) -> float:
    predicted = set() if _missing(prediction) else _strict_labels(str(prediction).split(","))
    truth = _strict_labels(answer)
    if not predicted and not truth:
        return 1.0
    return len(predicted & truth) / max(len(predicted), len(truth))


def strict_scores(rows: Iterable[PredictionRow], gt: Iterable[CaseRecord]) -> dict[str, float | int]:
    """Per-case global and per-chain local accuracy over the whole ground truth (see the module
    docstring), rounded to 6 decimals, with the numbers of scored cases (those with a global
    question) and chains."""
    index = _index(gt)
    first_global: dict[str, PredictionRow] = {}
    first_chain: dict[tuple[str, int], PredictionRow] = {}
    for row in rows:
        _record(index, row.case_id)
        case = canonical_case_id(row.case_id)
        if row.scope == "global":
            first_global.setdefault(case, row)
        elif row.scope == "local":
            first_chain.setdefault((case, _root_id(row)), row)
    global_scores: list[float] = []
    local_scores: list[float] = []
    for case, record in index.items():
        if record["global_vqa"]:  # a case without a global question has none to score
            row = first_global.get(case)
            answer = record["global_vqa"][0]["answer"]
            global_scores.append(0.0 if row is None else _strict_global(row.prediction, answer))
        answers = {q["id"]: normalise(q["answer"]) for q in record["local_vqa"]}
        for root, chain in question_chains(record["local_vqa"]).items():
            row = first_chain.get((case, root))
            cell = None if row is None else row.prediction
            predicted = [] if _missing(cell) else [normalise(p) for p in str(cell).split("|")]
            local_scores.append(_chain_score(predicted, chain, answers))
    return {
        "global_accuracy": _mean6(global_scores),
        "local_accuracy": _mean6(local_scores),
        "cases": len(global_scores),
        "chains": len(local_scores),
    }


def score_predictions(csv_path: str | os.PathLike, gt_json_path: str | os.PathLike) -> dict[str, Any]:
    """Reference ``global_accuracy``/``local_accuracy`` (what ``vqa_results.json`` holds), the
    ``strict`` scores, and the counts behind them."""
    rows = read_predictions(csv_path)
    gt = json.loads(Path(gt_json_path).read_text(encoding="utf-8"))
    global_scores = global_row_scores(rows, gt)
    local_scores, skipped = local_row_scores(rows, gt)
    return {
        "global_accuracy": _mean6(global_scores),
        "local_accuracy": _mean6(local_scores),
        "strict": strict_scores(rows, gt),
        "global_rows": len(global_scores),
        "local_rows": len(local_scores),
        "local_rows_skipped": skipped,
    }
