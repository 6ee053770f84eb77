"""Train/test leakage: test items whose case or exact report text also appears in train.

M3D-Cap holds several series (scans) of one study as separate items, and some studies share a
caption word for word, so a random item split puts the same patient, or the same text, on both
sides. An item's case is the folder that holds its volume (``M3D_Cap/ct_case/<id>`` for M3D);
report texts are compared after collapsing whitespace.

:func:`split_leakage` finds the overlap; :func:`strict_split` moves every leaking test item to
train (all items of a leaking case, every item with a leaking text), for ``prepare``'s
``strict_split`` option. Both are pure functions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TypeVar

T = TypeVar("T")

from med3dvlm.utils.markdown import markdown_table


def case_id(image_path: str) -> str:
    """The case of a volume: its parent folder (``M3D_Cap/ct_case/000006/Axial.npy`` ->
    ``M3D_Cap/ct_case/000006``)."""
    parent = PurePosixPath(image_path.replace("\\", "/")).parent
    return str(parent)


def normalise_text(text: str) -> str:
    """Whitespace collapsed, ends stripped (case and punctuation kept: exact text)."""
    return " ".join(text.split())


@dataclass(frozen=True)
class Item:
    """One dataset item: its id (the image path), its case and its report text (None: no text)."""

    item_id: str
    case: str
    text: str | None = None


@dataclass
class LeakageReport:
    """Test items that share a case or a report text with train."""

    num_train: int
    num_test: int
    # Test item id -> reasons ("case", "text").
    leaking: dict[str, list[str]] = field(default_factory=dict)
    shared_cases: dict[str, int] = field(default_factory=dict)  # case -> number of test items
    shared_texts: dict[str, int] = field(default_factory=dict)  # text -> number of test items

    def counts(self) -> dict[str, int]:
        by_case = sum("case" in r for r in self.leaking.values())
        by_text = sum("text" in r for r in self.leaking.values())
        return {
            "train_items": self.num_train,
            "test_items": self.num_test,
            "leaking_test_items": len(self.leaking),
            "by_case": by_case,
            "by_text": by_text,
            "shared_cases": len(self.shared_cases),
            "shared_texts": len(self.shared_texts),
        }

    def to_dict(self) -> dict:
        return {
            "counts": self.counts(),
            "leaking": self.leaking,
            "shared_cases": self.shared_cases,
            "shared_texts": self.shared_texts,
        }


def split_leakage(train: Sequence[Item], test: Sequence[Item]) -> LeakageReport:
    """Every test item whose case or (normalised) report text occurs in ``train``."""
    train_cases = {item.case for item in train}
    train_texts = {normalise_text(item.text) for item in train if item.text}
    report = LeakageReport(num_train=len(train), num_test=len(test))
    for item in test:
        reasons = []
        if item.case in train_cases:
            reasons.append("case")
            report.shared_cases[item.case] = report.shared_cases.get(item.case, 0) + 1
        text = normalise_text(item.text) if item.text else None
        if text and text in train_texts:
            reasons.append("text")
            report.shared_texts[text] = report.shared_texts.get(text, 0) + 1
        if reasons:
            report.leaking[item.item_id] = reasons
    return report


def strict_split(
    splits: Mapping[str, Sequence[T]],
    image_of: Callable[[T], str],
    text_of: Callable[[T], str | None],
    case_of: Callable[[str], str] = case_id,
    test: str = "test",
    train: str = "train",
) -> tuple[dict[str, list[T]], LeakageReport]:
    """``splits`` with every leaking ``test`` entry moved to the end of ``train``, and the report.

    Entries are any objects (e.g. ``M3D_Cap.json`` dicts); ``image_of`` gives an entry's image
    path (its id) and ``text_of`` its report text. Other splits are left as they are.
    """
    for name in (train, test):
        if name not in splits:
            raise KeyError(f"strict_split: no {name!r} split (have {sorted(splits)})")

    def items(entries: Sequence[T]) -> list[Item]:
        return [Item(image_of(e), case_of(image_of(e)), text_of(e)) for e in entries]

    report = split_leakage(items(splits[train]), items(splits[test]))
    out = {name: list(entries) for name, entries in splits.items()}
    out[test] = [e for e in splits[test] if image_of(e) not in report.leaking]
    out[train] = list(splits[train]) + [e for e in splits[test] if image_of(e) in report.leaking]
    return out, report


def format_leakage(report: LeakageReport, title: str, limit: int = 20) -> str:
    """A Markdown summary: counts, then the leaking test items (first ``limit``)."""
    lines = [f"### {title}", "", markdown_table(["count", "value"], report.counts().items(), right=[1])]
    if report.leaking:
        rows = [[item, ", ".join(reasons)] for item, reasons in list(report.leaking.items())[:limit]]
        if len(report.leaking) > limit:
            rows.append([f"... {len(report.leaking) - limit} more", ""])
        lines += ["", markdown_table(["test item", "shared with train"], rows)]
    return "\n".join(lines)
