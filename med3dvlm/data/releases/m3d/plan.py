"""Planning the M3D release (``dataset=m3d``): every series of every collection, its report, its
split, and the VQA CSVs rewritten to the prepared volumes (see :mod:`.layout` for the layout).

``strict_split``: the VQA test rows about a case that the caption train split holds move to the
train CSV (or leave a test subset); the engine moves the leaking captions themselves.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from med3dvlm.data.errors import DataError
from med3dvlm.data.leakage import case_id
from med3dvlm.data.prepared import m3d_preprocessing, subfolders
from med3dvlm.data.preprocess import Preprocessing
from med3dvlm.data.releases.base import ErrorPolicy, Plan, PrepareOptions, VolumeJob, hash_split
from med3dvlm.data.releases.m3d.layout import (
    CAP_DIR,
    IMAGE_COLUMN,
    REPORT_FILE,
    SPLIT_FILE,
    VQA_COLUMNS,
    VQA_DIR,
    find_collections,
    fold_series_name,
    is_test_csv,
    read_split_file,
    series_key,
    split_file_path,
    vqa_csvs,
)
from med3dvlm.data.volume_io import volume_suffix
from med3dvlm.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

_FINDINGS = re.compile(r"study_findings\s*:", re.IGNORECASE)
_DISCUSSION = re.compile(r"discussion\s*:", re.IGNORECASE)


def preprocessing(options: PrepareOptions) -> Preprocessing:
    """M3D's slices are display-windowed 8-bit images: min-max, as the original; no CT window."""
    if options.window is not None:
        raise ValueError(
            "intensity.window applies to your own scans in Hounsfield units (a CSV source); M3D-Cap's "
            "slices are display-windowed 8-bit images and are min-maxed as the original does"
        )
    recipe = m3d_preprocessing()
    spec = recipe.sources["m3d"]
    if options.foreground_threshold != spec.foreground_threshold:
        spec = type(spec)(**{**spec.to_dict(), "foreground_threshold": options.foreground_threshold})
    return Preprocessing("m3d", {"m3d": spec})


@dataclass
class M3DPlan(Plan):
    """A plan with what the VQA CSVs are rewritten from."""

    series_keys: dict[str, str] = field(default_factory=dict)  # "<collection>/<id>/<folded series>" -> output
    found: set[str] = field(default_factory=set)  # every series key of the raw tree


def extract_report(text: str, source: str | os.PathLike) -> str:
    """The findings of a report: text after ``study_findings:`` up to ``discussion:``.

    Falls back to the text after ``discussion:``, then (no section markers at all) to the whole
    text. An empty result is a :class:`DataError` naming ``source``.
    """
    findings = _FINDINGS.search(text)
    discussion = _DISCUSSION.search(text, findings.end() if findings else 0)
    if findings:
        end = discussion.start() if discussion else len(text)
        section = text[findings.end() : end].strip()
        if section:
            return section
    if discussion:
        section = text[discussion.end() :].strip()
        if section:
            return section
    if not findings and not discussion and text.strip():
        return text.strip()
    raise DataError(source, "empty report (no text after 'study_findings:' or 'discussion:')")


def _read_report(path: Path) -> str:
    if not path.is_file():
        raise DataError(path, "report file not found")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"unreadable report ({type(exc).__name__}: {exc})") from exc


def case_series(case_dir: Path) -> dict[str, Path]:
    """Folded name -> series folder of a case (see ``layout.fold_series_name``); two folders that
    fold to one name, or a name that folds to no file name, are an error naming them."""
    series: dict[str, Path] = {}
    for folder in subfolders(case_dir):
        folded = fold_series_name(folder.name)
        if not folded.strip() or "/" in folded or folded in (".", ".."):
            raise DataError(folder, f"the series name folds to {folded!r}, which is no file name")
        if folded in series:
            raise DataError(
                case_dir, f"series {series[folded].name!r} and {folder.name!r} both fold to {folded!r}"
            )
        series[folded] = folder
    return series


def plan_m3d(raw_root: Path, options: PrepareOptions, policy: ErrorPolicy) -> M3DPlan:
    """Jobs for every series of every collection under ``RAW/M3D_Cap`` (see ``layout``); the split
    file (``M3D_Cap/M3D_Cap.json``) decides each series' split, its case's, else a hash of the case."""
    cap_dir = raw_root / CAP_DIR
    if not cap_dir.is_dir():
        raise DataError(raw_root, f"not a raw M3D folder: {CAP_DIR}/ not found (or pass a .csv)")
    split_file = read_split_file(split_file_path(raw_root))
    listed = split_file.split_of()
    case_split = {key.rsplit("/", 1)[0]: split for key, split in listed.items()}
    plan = M3DPlan([], split_source=split_file.path.name if split_file.path else "hash", case_of=case_id)
    for collection in find_collections(cap_dir):
        for case_dir in subfolders(collection):
            case = f"{collection.name}/{case_dir.name}"
            try:
                series = case_series(case_dir)
            except DataError as error:
                policy.handle(f"{CAP_DIR}/{case}", error)
                plan.found.update(f"{case}/{fold_series_name(s.name)}" for s in subfolders(case_dir))
                continue
            keys = {folded: f"{case}/{folded}" for folded in series}
            plan.found.update(keys.values())
            text_rel = f"{CAP_DIR}/{case}/{REPORT_FILE}"
            report_path = case_dir / REPORT_FILE
            try:
                plan.texts[text_rel] = extract_report(_read_report(report_path), report_path)
            except DataError as error:
                for series_dir in series.values():
                    policy.handle(f"{CAP_DIR}/{case}/{series_dir.name}", error)
                continue
            for folded, series_dir in series.items():
                key = keys[folded]
                output = f"{CAP_DIR}/{key}{volume_suffix(options.format)}"
                plan.jobs.append(
                    VolumeJob(
                        str(series_dir.resolve()),
                        f"{CAP_DIR}/{case}/{series_dir.name}",
                        "series",
                        output,
                        "m3d",
                    )
                )
                plan.split_of[output] = (
                    listed.get(key) or case_split.get(case) or hash_split(case, options.fractions)
                )
                plan.text_of[output] = text_rel
                plan.series_keys[key] = output
                plan.group_of[output] = collection.name
    named = {key for keys in split_file.lists.values() for key in keys}
    for key in sorted(named - plan.found):
        missing = DataError(raw_root / CAP_DIR / key, f"in {SPLIT_FILE} but the series folder is missing")
        policy.handle(f"{CAP_DIR}/{key}", missing)
    plan.listed = {
        name: [plan.series_keys[k] for k in keys if k in plan.series_keys]
        for name, keys in split_file.lists.items()
    }
    return plan


Table = tuple[list[str], list[dict[str, str]]]


def _read_csv(source: Path) -> Table:
    try:
        with open(source, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns, rows = list(reader.fieldnames or []), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(source, f"unreadable CSV ({type(exc).__name__}: {exc})") from exc
    for column in VQA_COLUMNS:
        if column not in columns:
            raise DataError(source, f"missing column {column!r} (found {columns})")
    return columns, rows


def _point_at_prepared(
    source: Path, table: Table, prepared: Mapping[str, str], found: set[str], policy: ErrorPolicy
) -> tuple[Table, dict[str, Any]]:
    """The table with ``Image Path`` rewritten to the prepared volumes; rows about a series whose
    preparation failed (skipped) are dropped; rows naming no series of the raw tree are bad input."""
    columns, rows = table
    kept, dropped, unknown = [], set(), []
    for number, row in enumerate(rows, start=2):
        key = series_key(row[IMAGE_COLUMN] or "")
        if key in prepared:
            kept.append({**row, IMAGE_COLUMN: prepared[key]})
        elif key in found:
            dropped.add(row[IMAGE_COLUMN])
        else:
            unknown.append((number, row[IMAGE_COLUMN]))
    if unknown:
        line, image = unknown[0]
        policy.handle(
            str(source),
            DataError(
                source,
                f"{len(unknown)} row(s) name no series of the raw tree (first: line {line}, {image!r})",
            ),
        )
        dropped.update(image for _, image in unknown)
    report = {
        "rows": len(rows),
        "kept": len(kept),
        "dropped": len(rows) - len(kept),
        "dropped_images": sorted(dropped),
    }
    if dropped:
        log.warning("%s: dropped %d rows whose volume was not prepared", source.name, len(rows) - len(kept))
    return (columns, kept), report


def _hold_out_train_cases(
    tables: dict[str, Table], report: dict[str, dict[str, Any]], train_cases: set[str], vqa_dir: Path
) -> None:
    """Strict split: a test CSV row about a case of the caption train split (or of its train CSV)
    moves to that train CSV (``M3D_VQA[_yn]_test.csv``) or leaves the subset (``..._test5k.csv``)."""
    for name in sorted(tables):
        train_name = is_test_csv(name)
        if train_name is None:
            continue
        train_rows = tables[train_name][1] if train_name in tables else []
        held = train_cases | {case_id(row[IMAGE_COLUMN]) for row in train_rows}
        moved, kept = [], []
        for row in tables[name][1]:
            (moved if case_id(row[IMAGE_COLUMN]) in held else kept).append(row)
        tables[name] = (tables[name][0], kept)
        report[name]["moved_images"] = sorted({row[IMAGE_COLUMN] for row in moved})
        if name != train_name.replace("train", "test"):
            report[name]["removed_as_train_cases"] = len(moved)
            continue
        if moved and train_name not in tables:
            raise DataError(
                vqa_dir / train_name,
                f"file not found; strict_split must move {len(moved)} rows of {name} into it",
            )
        if moved:
            tables[train_name] = (tables[train_name][0], train_rows + moved)
        report[name]["moved_to_train"] = len(moved)


def rewrite_vqa_csvs(
    raw_root: Path,
    out: Path,
    plan: M3DPlan,
    prepared: Mapping[str, str],
    policy: ErrorPolicy,
    train_cases: set[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every CSV of ``RAW/M3D-VQA`` copied with ``Image Path`` pointing at the prepared volumes.

    ``prepared`` maps series keys (``<collection>/<id>/<folded series>``) to prepared paths relative
    to OUT. ``train_cases`` (strict split): see :func:`_hold_out_train_cases`.
    """
    report: dict[str, dict[str, Any]] = {}
    tables: dict[str, Table] = {}
    for source in vqa_csvs(raw_root / VQA_DIR):
        tables[source.name], report[source.name] = _point_at_prepared(
            source, _read_csv(source), prepared, plan.found, policy
        )
    if train_cases is not None:
        _hold_out_train_cases(tables, report, train_cases, raw_root / VQA_DIR)
    for name, (columns, rows) in tables.items():
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out / VQA_DIR / name, buffer.getvalue())
    return report


def finish(
    raw_root: Path,
    out: Path,
    plan: M3DPlan,
    volumes: Mapping[str, Any],
    split_lists: dict[str, list[dict[str, str]]],
    policy: ErrorPolicy,
    options: PrepareOptions,
) -> dict[str, Any]:
    """Every VQA CSV rewritten to the prepared volumes; the manifest's ``vqa`` report and its counts."""
    prepared = {key: output for key, output in plan.series_keys.items() if output in volumes}
    train_cases = (
        {case_id(entry["image"]) for entry in split_lists["train"]} if options.strict_split else None
    )
    vqa = rewrite_vqa_csvs(raw_root, out, plan, prepared, policy, train_cases)
    counts = {
        "vqa_rows_kept": sum(v["kept"] for v in vqa.values()),
        "vqa_rows_dropped": sum(v["dropped"] for v in vqa.values()),
    }
    if options.strict_split:
        counts["strict_split_vqa_rows_moved"] = sum(v.get("moved_to_train", 0) for v in vqa.values())
    return {"vqa": vqa, "counts": counts}
