"""Raw M3D-Cap / M3D-VQA downloads or the user's NIfTI + CSV -> the prepared dataset.

The layouts are fixed by the data contract (raw: ``RAW/M3D_Cap/ct_case/<id>/<series>/<k>.jpeg``,
``text.txt``, optional ``M3D_Cap.json``, ``RAW/M3D-VQA/*.csv``; own data: a CSV with columns
``image,report``). The prepared folder holds one volume and one report text per series, an
``M3D_Cap.json`` split file, rewritten VQA CSVs, ``manifest.json`` and ``skipped.txt``.

Resuming: every finished volume is appended to ``.prepare-journal.jsonl`` (one JSON line with its
manifest entry and the file's size and mtime; a torn last line is ignored). A rerun with the same
settings reuses a volume listed there whose raw input is unchanged (names, sizes and mtimes of its
files) and whose file still has that size and mtime (no re-read, so resuming a large run is quick), or
one listed in an earlier ``manifest.json`` whose SHA-256 still matches; everything else is recomputed.
Volumes, texts, JSON and CSV files are written atomically, and the pipeline is deterministic, so a killed and restarted run ends with the same files as an
uninterrupted one.

``strict_split``: test items whose case (the volume's folder; for own data, the volume itself) or
exact report text also occurs in train move to train (``med3dvlm.data.leakage.strict_split``),
and so do the VQA test rows about a case that train now holds; the manifest records what moved.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from med3dvlm.data.errors import DataError
from med3dvlm.data.layout import (
    CAP_DIR,
    IMAGE_COLUMN,
    MANIFEST_FILE,
    REPORT_FILE,
    SPLIT_FILE,
    SPLITS,
    VQA_COLUMNS,
    VQA_DIR,
    find_collections,
    fold_series_name,
    is_test_csv,
    read_split_file,
    series_key,
    split_file_path,
    subfolders,
    vqa_csvs,
)
from med3dvlm.data.leakage import case_id
from med3dvlm.data.leakage import strict_split as move_leaking_test_items
from med3dvlm.data.preprocess import (
    WindowSpec,
    prepare_scan,
    preprocess_volume,
    spatial_size_tuple,
    stack_series,
    window_range,
)
from med3dvlm.data.scans import DEFAULT_MAX_VOXELS, SUPPORTED, missing_reader, scan_format
from med3dvlm.data.volume_io import FORMATS, read_volume_raw, to_float, volume_suffix, write_volume
from med3dvlm.utils.atomic import atomic_write_text
from med3dvlm.utils.fingerprint import file_sha256

log = logging.getLogger(__name__)

OnError = Literal["fail", "skip"]
OWN_DIR = "own"
SKIPPED_FILE = "skipped.txt"
JOURNAL_FILE = ".prepare-journal.jsonl"
LOCK_FILE = ".prepare.lock"
OWN_COLUMNS: tuple[str, ...] = ("image", "report")
# Largest |stored - written| per storage dtype (see volume_io): the re-read check's tolerance.
_STORAGE_TOLERANCE = {"uint8": 1.0 / 510 + 1e-6, "float16": 2.0**-12 + 1e-7, "float32": 0.0}
_FINDINGS = re.compile(r"study_findings\s*:", re.IGNORECASE)
_DISCUSSION = re.compile(r"discussion\s*:", re.IGNORECASE)


# ----------------------------------------------------------------------------- reports and splits


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


def split_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Validate train/validation/test fractions (non-negative, summing to 1)."""
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; use {list(SPLITS)}")
    values = {name: float(fractions.get(name, 0.0)) for name in SPLITS}
    if min(values.values()) < 0 or abs(sum(values.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {values}")
    return values


def hash_split(key: str, fractions: Mapping[str, float]) -> str:
    """Deterministic split of ``key``: its SHA-256 mapped to [0, 1) against the cumulative fractions."""
    position = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    cumulative = 0.0
    for name in SPLITS:
        cumulative += fractions[name]
        if position < cumulative:
            return name
    return next(name for name in reversed(SPLITS) if fractions[name] > 0)


# ----------------------------------------------------------------------------- per-volume work


@dataclass(frozen=True)
class Settings:
    """What a prepared volume depends on; a resumed run reuses outputs only if these match."""

    format: str
    npy_dtype: str
    spatial_size: tuple[int, int, int]
    foreground_threshold: float
    window: tuple[float, float] | None = None  # HU window (own CT); None: min-max

    def fingerprint(self) -> dict[str, Any]:
        # "window" only when set, so folders prepared before windowing existed keep their fingerprint.
        base = {**asdict(self), "spatial_size": list(self.spatial_size)}
        window = base.pop("window")
        return {**base, **({"window": list(window)} if window else {})}

    @property
    def stored_dtype(self) -> str:
        return self.npy_dtype if self.format == "npy" else "float32"


@dataclass(frozen=True)
class VolumeJob:
    """One volume to prepare: an M3D-Cap slice folder or one of the user's scans (``data.scans``)."""

    source: str  # absolute path read by the worker
    label: str  # how the manifest names the source
    kind: Literal["series", "scan"]
    output: str  # prepared path relative to OUT


@dataclass(frozen=True)
class JobOutcome:
    output: str
    entry: dict[str, Any] | None = None
    error_path: str | None = None
    error_problem: str | None = None
    hu_unwindowed: bool = False  # a raw-HU scan min-maxed for want of a window


def source_fingerprint(source: str | Path) -> str:
    """Names, sizes and mtimes of a raw input (every file of a series folder, or the one NIfTI file).

    Stored with each prepared volume, so a resumed run re-prepares a volume whose raw input changed
    (for example regenerated synthetic data) instead of keeping the stale output.
    """
    source = Path(source)
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _verify_written(path: Path, written: np.ndarray, settings: Settings) -> np.ndarray:
    """Re-read a written volume and check shape, dtype, finiteness and content."""
    stored = read_volume_raw(path, mmap=False, shape=settings.spatial_size)
    if stored.dtype != np.dtype(settings.stored_dtype):
        raise DataError(path, f"re-read dtype {stored.dtype} != {settings.stored_dtype}")
    values = to_float(stored)
    if not np.isfinite(values).all():
        raise DataError(path, "re-read volume contains NaN or Inf values")
    error = float(np.abs(values - written).max())
    if error > _STORAGE_TOLERANCE[settings.stored_dtype]:
        raise DataError(path, f"re-read volume differs from what was written (max abs error {error:g})")
    return stored


def prepare_volume(job: VolumeJob, out_dir: str, settings: Settings,
                   max_voxels: int = DEFAULT_MAX_VOXELS) -> JobOutcome:
    """Load, preprocess, write and verify one volume; bad input comes back as an error outcome.

    Errors are returned rather than raised so they cross the process boundary intact. A scan larger
    than ``max_voxels`` (by its header) is refused before it is read.
    """
    try:
        fingerprint = source_fingerprint(job.source)
        dropped: tuple[str, ...] = ()
        hu_unwindowed = False
        if job.kind == "series":
            stacked = stack_series(job.source, max_voxels)
            raw, dropped = stacked.volume, stacked.dropped
            volume = preprocess_volume(raw, settings.spatial_size, settings.foreground_threshold, job.source)
        else:
            scan = prepare_scan(job.source, settings.spatial_size, settings.window, settings.foreground_threshold,
                                max_voxels)
            raw, volume, hu_unwindowed = scan.raw, scan.volume, scan.hu_unwindowed
        path = Path(out_dir) / job.output
        write_volume(path, volume, npy_dtype=settings.npy_dtype)
        stored = _verify_written(path, volume, settings)
    except DataError as err:
        return JobOutcome(job.output, error_path=err.path, error_problem=err.problem)
    entry: dict[str, Any] = {
        "shape": list(stored.shape),
        "dtype": str(stored.dtype),
        "sha256": file_sha256(path),
        "status": "ok",
        "source": job.label,
        "source_fingerprint": fingerprint,
        "raw_shape": list(raw.shape),
    }
    if dropped:
        entry["dropped_slices"] = list(dropped)
    return JobOutcome(job.output, entry=entry, hu_unwindowed=hu_unwindowed)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already uses every core
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    # A killed parent leaves its pool's workers running their current volume (tens of seconds at
    # full size); an orphan is re-parented, so a changed parent id means: stop now.
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


# ----------------------------------------------------------------------------- planning


@dataclass
class Plan:
    """Everything to do, decided before any volume is touched."""

    jobs: list[VolumeJob]
    split_of: dict[str, str]  # output -> split
    text_of: dict[str, str]  # output -> report path relative to OUT
    texts: dict[str, str]  # report path relative to OUT -> report text
    skipped: list[dict[str, str]]
    series_keys: dict[str, str]  # "<collection>/<id>/<folded series>" -> output (M3D, for the VQA CSVs)
    split_source: str
    duplicates: list[list[str]] = field(default_factory=list)  # sources with identical bytes
    listed: dict[str, list[str]] = field(default_factory=dict)  # split-file list -> outputs, in its order
    found: set[str] = field(default_factory=set)  # every series key of the raw tree (M3D)
    collection_of: dict[str, str] = field(default_factory=dict)  # output -> collection (M3D)
    hu_unwindowed: int = 0  # raw-HU scans min-maxed for want of a window (own data)


class _ErrorPolicy:
    """Raise bad-input errors (``fail``) or record them as skipped (``skip``)."""

    def __init__(self, on_error: OnError) -> None:
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[dict[str, str]] = []

    def handle(self, source: str, error: DataError) -> None:
        if self.on_error == "fail":
            raise error
        log.warning("skipped %s: %s", source, error)
        self.skipped.append({"source": source, "reason": str(error)})


def case_series(case_dir: Path) -> dict[str, Path]:
    """Folded name -> series folder of a case (see ``layout.fold_series_name``); two folders that
    fold to one name, or a name that folds to no file name, are an error naming them."""
    series: dict[str, Path] = {}
    for folder in subfolders(case_dir):
        folded = fold_series_name(folder.name)
        if not folded.strip() or "/" in folded or folded in (".", ".."):
            raise DataError(folder, f"the series name folds to {folded!r}, which is no file name")
        if folded in series:
            raise DataError(case_dir, f"series {series[folded].name!r} and {folder.name!r} both fold to {folded!r}")
        series[folded] = folder
    return series


def plan_m3d(raw_root: Path, fmt: str, fractions: Mapping[str, float], policy: _ErrorPolicy) -> Plan:
    """Jobs for every series of every collection under ``RAW/M3D_Cap`` (see ``layout``); the split
    file (``M3D_Cap/M3D_Cap.json``) decides each series' split, its case's, else a hash of the case."""
    cap_dir = raw_root / CAP_DIR
    if not cap_dir.is_dir():
        raise DataError(raw_root, f"not a raw M3D folder: {CAP_DIR}/ not found (or pass a .csv)")
    split_file = read_split_file(split_file_path(raw_root))
    listed = split_file.split_of()
    case_split = {key.rsplit("/", 1)[0]: split for key, split in listed.items()}
    plan = Plan([], {}, {}, {}, policy.skipped, {}, split_file.path.name if split_file.path else "hash")
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
                output = f"{CAP_DIR}/{key}{volume_suffix(fmt)}"
                plan.jobs.append(VolumeJob(str(series_dir.resolve()), f"{CAP_DIR}/{case}/{series_dir.name}", "series",
                                           output))
                plan.split_of[output] = listed.get(key) or case_split.get(case) or hash_split(case, fractions)
                plan.text_of[output] = text_rel
                plan.series_keys[key] = output
                plan.collection_of[output] = collection.name
    named = {key for keys in split_file.lists.values() for key in keys}
    for key in sorted(named - plan.found):
        missing = DataError(raw_root / CAP_DIR / key, f"in {SPLIT_FILE} but the series folder is missing")
        policy.handle(f"{CAP_DIR}/{key}", missing)
    plan.listed = {name: [plan.series_keys[k] for k in keys if k in plan.series_keys]
                   for name, keys in split_file.lists.items()}
    return plan


def _read_report(path: Path) -> str:
    if not path.is_file():
        raise DataError(path, "report file not found")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"unreadable report ({type(exc).__name__}: {exc})") from exc


def _own_stems(images: Sequence[str]) -> list[str]:
    """Output stems for own volumes: the file (or DICOM folder) name without its scan suffix, made
    unique with a path hash where stems collide."""
    stems = [re.sub(r"\.(nii(\.gz)?|nrrd|nhdr|mha|mhd)$", "", Path(image.rstrip("/")).name, flags=re.IGNORECASE)
             for image in images]
    counts = Counter(stems)
    return [
        stem if counts[stem] == 1 else f"{stem}_{hashlib.sha256(image.encode()).hexdigest()[:8]}"
        for stem, image in zip(stems, images)
    ]


def plan_own(csv_path: Path, fmt: str, fractions: Mapping[str, float], policy: _ErrorPolicy) -> Plan:
    """Jobs for the user's ``image,report`` CSV; relative image paths are relative to the CSV's folder."""
    if not csv_path.is_file():
        raise DataError(csv_path, "file not found")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(csv_path, f"unreadable CSV ({type(exc).__name__}: {exc})") from exc
    for column in OWN_COLUMNS:
        if column not in columns:
            raise DataError(csv_path, f"missing column {column!r} (found {columns}); expected image,report")
    if not rows:
        raise DataError(csv_path, "no rows")
    plan = Plan([], {}, {}, {}, policy.skipped, {}, "hash")
    first_row: dict[Path, int] = {}
    images = [(row.get("image") or "").strip() for row in rows]
    for number, (row, image, stem) in enumerate(zip(rows, images, _own_stems(images)), start=2):
        where = f"{csv_path} line {number}"
        try:
            if not image:
                raise DataError(csv_path, f"line {number}: empty 'image'")
            # Relative to the CSV's folder; absolute paths and paths outside that folder are fine.
            path = (Path(image) if Path(image).is_absolute() else csv_path.parent / image).resolve()
            if path in first_row:
                raise DataError(csv_path, f"line {number}: {image!r} is the same file as line {first_row[path]}")
            first_row[path] = number
            if not path.exists():
                raise DataError(path, f"file not found (listed on {where})")
            kind = scan_format(path)
            if kind is None:
                raise DataError(path, f"not a supported scan (expected {SUPPORTED}; listed on {where})")
            needed = missing_reader(kind)
            if needed:  # before any work starts, not in the middle of it
                raise DataError(path, f"{needed} (listed on {where})")
            report = extract_report(row.get("report") or "", where)
        except DataError as error:
            policy.handle(image or where, error)
            continue
        output = f"{OWN_DIR}/{stem}{volume_suffix(fmt)}"
        text_rel = f"{OWN_DIR}/{stem}.txt"
        plan.jobs.append(VolumeJob(str(path), image, "scan", output))
        plan.text_of[output] = text_rel
        plan.texts[text_rel] = report
    plan.duplicates = identical_files(plan.jobs)
    group_of = {label: group[0] for group in plan.duplicates for label in group}
    for job in plan.jobs:
        # Copies of one scan share the split of the first copy listed: never train and test.
        plan.split_of[job.output] = hash_split(group_of.get(job.label, job.label), fractions)
    for group in plan.duplicates:
        log.warning("identical files (kept in one split): %s", ", ".join(group))
    return plan


def _files_of(source: Path) -> list[Path]:
    return sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]


def identical_files(jobs: Sequence[VolumeJob]) -> list[list[str]]:
    """Groups (in listing order) of the jobs' sources with identical bytes (a DICOM folder: the
    same files' bytes); only sources of equal size are hashed."""
    by_size: dict[int, list[VolumeJob]] = {}
    for job in jobs:
        by_size.setdefault(sum(p.stat().st_size for p in _files_of(Path(job.source))), []).append(job)
    by_digest: dict[str, list[str]] = {}
    for same_size in by_size.values():
        if len(same_size) > 1:
            for job in same_size:
                digest = "".join(file_sha256(p) for p in _files_of(Path(job.source)))
                by_digest.setdefault(digest, []).append(job.label)
    order = {job.label: i for i, job in enumerate(jobs)}
    groups = [sorted(labels, key=order.__getitem__) for labels in by_digest.values() if len(labels) > 1]
    return sorted(groups, key=lambda group: order[group[0]])


# ----------------------------------------------------------------------------- resume state


def _file_stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _journal_line(output: str, entry: Mapping[str, Any], out: Path) -> str:
    return json.dumps({"output": output, "entry": entry, "stat": _file_stat(out / output)}) + "\n"


def _load_previous(out: Path, settings: Settings,
                   ) -> tuple[dict[str, tuple[dict[str, Any], list[int] | None]], set[str]]:
    """``output -> (entry, file stat)`` of earlier runs with the same settings (manifest, then
    journal), and the outputs the existing manifest lists whatever its settings."""
    previous: dict[str, tuple[dict[str, Any], list[int] | None]] = {}
    listed: set[str] = set()
    manifest_path = out / MANIFEST_FILE
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            listed = set(manifest.get("volumes", {}))
            if manifest.get("settings") == settings.fingerprint():
                previous.update((k, (v, None)) for k, v in manifest.get("volumes", {}).items())
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable %s", manifest_path)
    journal = out / JOURNAL_FILE
    if journal.is_file():
        lines = journal.read_text(encoding="utf-8").splitlines()
        header = _parse_json_line(lines[0]) if lines else None
        if header and header.get("settings") == settings.fingerprint():
            for line in lines[1:]:
                record = _parse_json_line(line)
                if record and {"output", "entry", "stat"} <= set(record):
                    previous[record["output"]] = (record["entry"], record["stat"])
    return previous, listed


def _parse_json_line(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None  # the torn last line of a killed run
    return value if isinstance(value, dict) else None


def _still_valid(out: Path, job: VolumeJob, record: tuple[Mapping[str, Any], list[int] | None] | None) -> bool:
    """A recorded output is reusable if its raw input is unchanged and so is its file (same size and
    mtime, or same SHA-256)."""
    path = out / job.output
    if record is None or not path.is_file():
        return False
    entry, stat = record
    if entry.get("status") != "ok" or entry.get("source") != job.label:
        return False
    try:
        if entry.get("source_fingerprint") != source_fingerprint(job.source):
            return False
    except OSError:
        return False  # the raw input is gone or unreadable: preparing it reports the real error
    return stat == _file_stat(path) or file_sha256(path) == entry.get("sha256")


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock for this run: a second prepare into the folder fails at once, naming the
    first (the lock ends with its process, however it ends)."""
    with open(out / LOCK_FILE, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _parse_json_line(handle.read()) or {}
            raise DataError(out, f"another prepare is writing here (pid {holder.get('pid', '?')} on "
                                 f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it "
                                 "to finish or stop it") from None
        handle.truncate(0)
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        handle.flush()
        yield


def _remove_temporaries(out: Path) -> None:
    """Leftover ``.tmp-*`` files of a killed run (atomic writes never completed)."""
    for path in out.rglob(".tmp-*"):
        if path.is_file():
            path.unlink()


# ----------------------------------------------------------------------------- outputs


def _write_text_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    atomic_write_text(path, text)


def _write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


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


def _point_at_prepared(source: Path, table: Table, prepared: Mapping[str, str], found: set[str],
                       policy: _ErrorPolicy) -> tuple[Table, dict[str, Any]]:
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
        policy.handle(str(source), DataError(source, f"{len(unknown)} row(s) name no series of the raw tree "
                                                     f"(first: line {line}, {image!r})"))
        dropped.update(image for _, image in unknown)
    report = {"rows": len(rows), "kept": len(kept), "dropped": len(rows) - len(kept),
              "dropped_images": sorted(dropped)}
    if dropped:
        log.warning("%s: dropped %d rows whose volume was not prepared", source.name, len(rows) - len(kept))
    return (columns, kept), report


def _hold_out_train_cases(tables: dict[str, Table], report: dict[str, dict[str, Any]], train_cases: set[str],
                          vqa_dir: Path) -> None:
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
            raise DataError(vqa_dir / train_name,
                            f"file not found; strict_split must move {len(moved)} rows of {name} into it")
        if moved:
            tables[train_name] = (tables[train_name][0], train_rows + moved)
        report[name]["moved_to_train"] = len(moved)


def rewrite_vqa_csvs(raw_root: Path, out: Path, plan: Plan, prepared: Mapping[str, str], policy: _ErrorPolicy,
                     train_cases: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every CSV of ``RAW/M3D-VQA`` copied with ``Image Path`` pointing at the prepared volumes.

    ``prepared`` maps series keys (``<collection>/<id>/<folded series>``) to prepared paths relative
    to OUT. ``train_cases`` (strict split): see :func:`_hold_out_train_cases`.
    """
    report: dict[str, dict[str, Any]] = {}
    tables: dict[str, Table] = {}
    for source in vqa_csvs(raw_root / VQA_DIR):
        tables[source.name], report[source.name] = _point_at_prepared(
            source, _read_csv(source), prepared, plan.found, policy)
    if train_cases is not None:
        _hold_out_train_cases(tables, report, train_cases, raw_root / VQA_DIR)
    for name, (columns, rows) in tables.items():
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out / VQA_DIR / name, buffer.getvalue())
    return report


# ----------------------------------------------------------------------------- the command


def _default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _run_jobs(
    jobs: Sequence[VolumeJob], out: Path, settings: Settings, workers: int, progress: bool, max_voxels: int
) -> Iterable[JobOutcome]:
    bar = tqdm(total=len(jobs), desc="prepare", unit="vol", disable=not progress or not jobs)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield prepare_volume(job, str(out), settings, max_voxels)
                bar.update()
            return
        # spawn, not fork: forking a process whose OpenMP/torch threads already ran can deadlock.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            futures: list[Future[JobOutcome]] = [
                pool.submit(prepare_volume, job, str(out), settings, max_voxels) for job in jobs
            ]
            try:
                for future in as_completed(futures):
                    yield future.result()
                    bar.update()
            finally:
                for future in futures:
                    future.cancel()
    finally:
        bar.close()


def _prepare_volumes(plan: Plan, out: Path, settings: Settings, policy: _ErrorPolicy, workers: int,
                     progress: bool, max_voxels: int) -> dict[str, dict[str, Any]]:
    """Reuse the volumes an earlier run prepared and still valid, prepare the rest (journalled);
    returns ``output -> manifest entry`` of every prepared volume, sorted."""
    previous, listed = _load_previous(out, settings)
    volumes: dict[str, dict[str, Any]] = {}
    todo = []
    for job in plan.jobs:
        if _still_valid(out, job, previous.get(job.output)):
            volumes[job.output] = previous[job.output][0]
        else:
            todo.append(job)
    if volumes:
        log.info("resuming: %d of %d volumes already prepared", len(volumes), len(plan.jobs))
    if any(job.output in listed for job in todo):
        # This run replaces a volume the existing manifest describes: until it finishes, the folder
        # must not look like a complete prepared dataset. (Only adding volumes keeps it valid.)
        (out / MANIFEST_FILE).unlink(missing_ok=True)
    journal_path = out / JOURNAL_FILE
    header = json.dumps({"settings": settings.fingerprint()}) + "\n"
    atomic_write_text(journal_path, header + "".join(_journal_line(o, e, out) for o, e in volumes.items()))
    label_of = {job.output: job.label for job in plan.jobs}
    outcomes = _run_jobs(todo, out, settings, workers, progress, max_voxels)
    with open(journal_path, "a", encoding="utf-8") as journal, contextlib.closing(outcomes):
        for outcome in outcomes:
            plan.hu_unwindowed += outcome.hu_unwindowed
            if outcome.entry is None:
                policy.handle(label_of[outcome.output], DataError(outcome.error_path, outcome.error_problem))
                continue
            volumes[outcome.output] = outcome.entry
            journal.write(_journal_line(outcome.output, outcome.entry, out))
            journal.flush()
    return dict(sorted(volumes.items()))


def _split_lists(plan: Plan, volumes: Mapping[str, Any], strict_split: bool, case_of: Callable[[str], str],
                 ) -> tuple[dict[str, list[dict[str, str]]], dict[str, Any] | None]:
    """The prepared ``M3D_Cap.json``: every list of the split file in its order (subsets such as
    ``test1k`` included) with the prepared paths, then the volumes it does not list, by split. With
    ``strict_split``, what moved (and the subset entries of moved volumes leave their subsets)."""
    def entry(output: str) -> dict[str, str]:
        return {"image": output, "text": plan.text_of[output]}

    lists: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    lists.update({name: [entry(o) for o in outputs if o in volumes] for name, outputs in plan.listed.items()})
    in_splits = {o for name in SPLITS for o in plan.listed.get(name, [])}
    for output in volumes:
        if output not in in_splits:
            lists[plan.split_of[output]].append(entry(output))
    if not strict_split:
        return lists, None
    splits, report = move_leaking_test_items(
        {name: lists[name] for name in SPLITS}, image_of=lambda e: e["image"],
        text_of=lambda e: plan.texts[e["text"]], case_of=case_of,
    )
    moved = set(report.leaking)  # keyed by image
    subsets = {name: [e for e in entries if e["image"] not in moved] for name, entries in lists.items()
               if name not in SPLITS}
    return {**splits, **subsets}, {"captions": report.to_dict()}


def _counts(plan: Plan, volumes: Mapping[str, Mapping[str, Any]], skipped: Sequence[Any],
            lists: Mapping[str, Sequence[Any]], vqa: Mapping[str, Mapping[str, Any]],
            moved: Mapping[str, Any] | None) -> dict[str, Any]:
    collections: dict[str, dict[str, int]] = {}
    cases: dict[str, set[str]] = {}
    for job in plan.jobs:
        name = plan.collection_of.get(job.output)
        if name is not None:
            counts = collections.setdefault(name, {"cases": 0, "series": 0, "volumes_ok": 0})
            cases.setdefault(name, set()).add(case_id(job.output))
            counts["cases"] = len(cases[name])
            counts["series"] += 1
            counts["volumes_ok"] += job.output in volumes
    return {
        "volumes_ok": len(volumes),
        "skipped": len(skipped),
        "duplicate_groups": len(plan.duplicates),
        "slices_dropped": sum(len(v.get("dropped_slices", ())) for v in volumes.values()),
        **{f"split_{name}": len(entries) for name, entries in lists.items()},
        **({"collections": collections} if collections else {}),
        "split_file_entries": {name: {"listed": len(plan.listed[name]), "kept": len(lists[name])}
                               for name in plan.listed},
        "vqa_rows_kept": sum(v["kept"] for v in vqa.values()),
        "vqa_rows_dropped": sum(v["dropped"] for v in vqa.values()),
        **({"strict_split_moved": len(moved["captions"]["leaking"]),
            "strict_split_vqa_rows_moved": sum(v.get("moved_to_train", 0) for v in vqa.values())}
           if moved else {}),
    }


def prepare_dataset(
    source: str | os.PathLike,
    out: str | os.PathLike,
    spatial_size: Sequence[int] = (128, 256, 256),
    format: str = "nii.gz",
    npy_dtype: str = "uint8",
    workers: int | None = None,
    on_error: OnError = "fail",
    split: Mapping[str, float] | None = None,
    foreground_threshold: float = 0.0,
    progress: bool = True,
    strict_split: bool = False,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    window: WindowSpec = None,
) -> dict[str, Any]:
    """Prepare raw M3D (``source`` = the folder holding ``M3D_Cap/``) or own data (``source`` = CSV).

    ``split`` gives train/validation/test fractions where no split file decides (hash of the case
    id for M3D, of the image path for own data). ``workers=None`` uses every available core, 0 or 1
    runs in this process. ``strict_split`` moves leaking test items to train (module docstring).
    ``max_voxels`` bounds each raw scan by its header, before it is read (each worker holds one).
    ``window`` (own data): the CT window in HU (``preprocess.window_range``); unset, a scan that
    looks like raw HU is min-maxed and a warning says which setting to use.
    Returns the manifest that was written to ``out/manifest.json``.
    """
    source_path, out = Path(source), Path(out)
    is_csv = source_path.suffix.lower() == ".csv"
    settings = _settings(format, npy_dtype, spatial_size, foreground_threshold, window, is_csv)
    policy = _ErrorPolicy(on_error)
    if not is_csv and not source_path.is_dir():
        raise DataError(source_path, "not found (expected a raw M3D folder or an image,report .csv)")
    fractions = split_fractions(split or {"train": 0.9, "validation": 0.05, "test": 0.05})
    plan = (plan_own if is_csv else plan_m3d)(source_path, format, fractions, policy)

    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        _remove_temporaries(out)
        for text_rel, text in plan.texts.items():
            _write_text_if_changed(out / text_rel, text)
        volumes = _prepare_volumes(plan, out, settings, policy, _default_workers() if workers is None else workers,
                                   progress, max_voxels)
        if plan.hu_unwindowed and window is None:
            _warn_raw_hu(plan.hu_unwindowed)
        split_lists, moved = _split_lists(plan, volumes, strict_split, case_of=str if is_csv else case_id)
        _write_json(out / SPLIT_FILE, split_lists)
        vqa = {}
        if not is_csv:
            prepared = {key: output for key, output in plan.series_keys.items() if output in volumes}
            train_cases = {case_id(entry["image"]) for entry in split_lists["train"]} if strict_split else None
            vqa = rewrite_vqa_csvs(source_path, out, plan, prepared, policy, train_cases)
        skipped = sorted(policy.skipped, key=lambda s: (s["source"], s["reason"]))
        atomic_write_text(out / SKIPPED_FILE, "".join(f"{s['source']}\t{s['reason']}\n" for s in skipped))
        manifest = _manifest(source_path, settings, window, plan, volumes, skipped, split_lists, vqa, moved)
        _write_json(out / MANIFEST_FILE, manifest)
    log.info("prepared %d volumes into %s (%d skipped)", len(volumes), out, len(skipped))
    return manifest


def _manifest(source: Path, settings: Settings, window: WindowSpec, plan: Plan, volumes: Mapping[str, Any],
              skipped: list[dict[str, str]], split_lists: Mapping[str, list], vqa: Mapping[str, Any],
              moved: Mapping[str, Any] | None) -> dict[str, Any]:
    """What ``manifest.json`` records: the settings, every volume, what was skipped and why, the counts."""
    return {
        "format": settings.format,
        "npy_dtype": settings.npy_dtype,
        "spatial_size": list(settings.spatial_size),
        "source": str(source.resolve()),
        "settings": settings.fingerprint(),
        "split_source": plan.split_source,
        "volumes": volumes,
        "skipped": skipped,
        "duplicates": plan.duplicates,
        "intensity": {"window": window if isinstance(window, str | None) else list(window),
                      "range": list(settings.window) if settings.window else None,
                      "hu_like_min_maxed": plan.hu_unwindowed},
        "vqa": vqa,
        "strict_split": moved,
        "counts": _counts(plan, volumes, skipped, split_lists, vqa, moved),
    }


def _settings(format: str, npy_dtype: str, spatial_size: Sequence[int], foreground_threshold: float,
              window: WindowSpec, is_csv: bool) -> Settings:
    """The checked settings every volume is prepared with."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if npy_dtype not in ("uint8", "float16"):
        raise ValueError(f"npy_dtype must be 'uint8' or 'float16', got {npy_dtype!r}")
    if window is not None and not is_csv:
        raise ValueError("intensity.window applies to your own scans in Hounsfield units (a CSV source); M3D-Cap's "
                         "slices are display-windowed 8-bit images and are min-maxed as the original does")
    return Settings(format, npy_dtype, spatial_size_tuple(spatial_size), float(foreground_threshold),
                    window_range(window))


def _warn_raw_hu(count: int) -> None:
    log.warning("%d scan(s) look like raw CT in Hounsfield units (air below -500, tissue above 200) and no "
                "intensity.window is set: they were min-max normalised as M3D's display-windowed JPEGs are, "
                "which squeezes soft tissue into a sliver of [0, 1]. Set intensity.window=soft_tissue (W400/L40; "
                "or lung, bone, brain, [low,high]), or intensity.window=none to keep min-max", count)
