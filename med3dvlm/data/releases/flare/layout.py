"""FLARE 2025 Task 5's release as its owners lay it out (``FLARE-Task5-MLLM-3D``, datasets.md §1.1):

    train/CT-AMOS-1290/amos_NNNN.nii.gz       + train/CT-AMOS-Tr.json      (abdomen)
    train/CT-RATE-2000/<CT-RATE name>.nii.gz  + train/CT-RATE-Tr.json      (chest; also spelled
                                                "CT-RATE-Tr .json" in some copies)
    validation/images/*.nii.gz                + validation/val.json        (both sources)

Each JSON is a list of case records (§1.2): ``case_id`` (the volume's file name), ``findings``
(region -> text, in report order), ``global_vqa`` (the case-level multi-label question(s): question,
choices, answer list) and ``local_vqa`` (question chains: ``id``, ``follow_up`` (-1 for a root, else
its root's id), question, answer, optional choices). Every record is kept; one that does not fit is an
error naming the file, the record and the key.

A case's source comes from the JSON it is listed in; ``val.json`` lists both, so there the case id
tells it: AMOS names its volumes ``amos_*``, CT-RATE ``<split>_<patient>_<scan>_<recon>``. (The
original tests whether "amos" occurs anywhere in the volume's path, which a folder name can fool.)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from med3dvlm.data.errors import DataError
from med3dvlm.data.releases.flare.recipe import ABDOMEN, CHEST

CTRATE_NAME = re.compile(r"(train|valid)_\d+_[a-z]+_\d+\.nii(\.gz)?")


@dataclass(frozen=True)
class Listing:
    """One JSON of the release and the folder holding its volumes."""

    json: str  # relative to the release root; the first spelling found
    spellings: tuple[str, ...]
    images: str
    split: str  # train | validation
    source: str | None  # abdomen | chest; None: by case id (val.json)


LISTINGS: tuple[Listing, ...] = (
    Listing("train/CT-AMOS-Tr.json", ("train/CT-AMOS-Tr.json",), "train/CT-AMOS-1290", "train", ABDOMEN),
    Listing(
        "train/CT-RATE-Tr.json",
        ("train/CT-RATE-Tr.json", "train/CT-RATE-Tr .json"),
        "train/CT-RATE-2000",
        "train",
        CHEST,
    ),
    Listing("validation/val.json", ("validation/val.json",), "validation/images", "validation", None),
)


def listing_file(root: Path, listing: Listing) -> Path | None:
    """The JSON of ``listing`` under ``root``, under any of its spellings, or ``None``."""
    return next((root / name for name in listing.spellings if (root / name).is_file()), None)


def source_of(case_id: str, listing: Listing, where: str) -> str:
    """The source of a case: its JSON's, or for ``val.json`` the one its id names."""
    if listing.source is not None:
        return listing.source
    name = Path(case_id).name
    if name.startswith("amos_"):
        return ABDOMEN
    if CTRATE_NAME.fullmatch(name):
        return CHEST
    raise DataError(
        where,
        f"case_id {case_id!r}: neither an AMOS name (amos_*) nor a CT-RATE name "
        "(<split>_<patient>_<scan>_<recon>.nii.gz), so its source (abdomen or chest) is unknown",
    )


def _expect(value: Any, kind: type | tuple[type, ...], where: str, key: str) -> Any:
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(where, f"key {key!r} is {type(value).__name__}, expected {names}")
    return value


def _check_question(entry: Any, where: str, key: str, local: bool) -> None:
    _expect(entry, dict, where, key)
    _expect(entry.get("question"), str, where, f"{key}.question")
    _expect(entry.get("choices", []), list, where, f"{key}.choices")
    if local:
        _expect(entry.get("id"), int, where, f"{key}.id")
        _expect(entry.get("follow_up"), int, where, f"{key}.follow_up")
        _expect(entry.get("answer"), str, where, f"{key}.answer")
    else:
        _expect(entry.get("answer"), (list, str), where, f"{key}.answer")


def check_record(record: Any, path: Path, index: int) -> dict[str, Any]:
    """A case record of the schema above (datasets.md §1.2), else an error naming the file, the
    record and the key. ``findings`` may be missing or empty (the case then has no report)."""
    where = f"{path} (record {index})"
    _expect(record, dict, where, "record")
    case_id = _expect(record.get("case_id"), str, where, "case_id")
    where = f"{path} (record {index}, {case_id})"
    findings = _expect(record.get("findings", {}), dict, where, "findings")
    for region, text in findings.items():
        _expect(text, str, where, f"findings.{region}")
    for i, entry in enumerate(_expect(record.get("global_vqa", []), list, where, "global_vqa")):
        _check_question(entry, where, f"global_vqa[{i}]", local=False)
    local = _expect(record.get("local_vqa", []), list, where, "local_vqa")
    for i, entry in enumerate(local):
        _check_question(entry, where, f"local_vqa[{i}]", local=True)
    ids = [entry["id"] for entry in local]
    if len(set(ids)) != len(ids):
        raise DataError(where, f"local_vqa ids repeat: {ids}")
    for entry in local:
        if entry["follow_up"] != -1 and entry["follow_up"] not in ids:
            raise DataError(
                where, f"local_vqa id {entry['id']}: follow_up {entry['follow_up']} names no question"
            )
    return record


def read_listing(path: Path) -> list[dict[str, Any]]:
    """Every case record of a release JSON, checked."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"unreadable JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(records, list):
        raise DataError(path, "expected a JSON list of case records")
    checked = [check_record(record, path, i) for i, record in enumerate(records)]
    seen: dict[str, int] = {}
    for i, record in enumerate(checked):
        if record["case_id"] in seen:
            raise DataError(
                path,
                f"case_id {record['case_id']!r} is listed twice (records {seen[record['case_id']]} and {i})",
            )
        seen[record["case_id"]] = i
    return checked


def serialise_findings(findings: dict[str, str]) -> str:
    """The report a case is trained to write: ``"{region}: {text}"`` per region, in the JSON's order,
    one per line (the original's target text)."""
    return "\n".join(f"{region}: {text}" for region, text in findings.items())
