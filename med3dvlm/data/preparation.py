"""``python -m med3dvlm.prepare``: a dataset release, as its owners lay it out -> the prepared folder.

One engine for every dataset: the release (``dataset=<name>``, :mod:`med3dvlm.data.releases`)
plans the volumes, their splits and report texts and names their preprocessing; this module writes
them. The prepared folder holds one volume per planned job (``npy`` or ``nii.gz``), the report
texts, the split file of caption lists, whatever the release adds (M3D's VQA CSVs, ...),
``manifest.json`` (settings, preprocessing per source, every volume with its SHA-256, what was
skipped and why, counts) and ``skipped.txt``.

Resuming: every finished volume is appended to ``.prepare-journal.jsonl`` (one JSON line with its
manifest entry and the file's size and mtime; a torn last line is ignored). A rerun with the same
settings reuses a volume listed there whose raw input is unchanged (names, sizes and mtimes of its
files) and whose file still has that size and mtime (no re-read, so resuming a large run is quick), or
one listed in an earlier ``manifest.json`` whose SHA-256 still matches; everything else is recomputed.
Volumes, texts, JSON and CSV files are written atomically, and the pipeline is deterministic, so a
killed and restarted run ends with the same files as an uninterrupted one. One run at a time holds a
folder's lock; workers end with the run that started them, however it ends.

``strict_split``: test items whose case or exact report text also occurs in train move to train
(``med3dvlm.data.leakage.strict_split``); the release moves what refers to them (M3D's VQA rows).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from med3dvlm.data.errors import DataError
from med3dvlm.data.leakage import strict_split as move_leaking_test_items
from med3dvlm.data.prepared import MANIFEST_FILE, SPLITS
from med3dvlm.data.preprocess import (
    Preprocessing,
    WindowSpec,
    air_level,
    looks_like_ct,
    preprocess_volume,
    spatial_size_tuple,
    stack_series,
)
from med3dvlm.data.releases import release as find_release
from med3dvlm.data.releases.base import (
    ErrorPolicy,
    OnError,
    Plan,
    PrepareOptions,
    Release,
    VolumeJob,
    split_fractions,
)
from med3dvlm.data.scans import DEFAULT_MAX_VOXELS, load_scan
from med3dvlm.data.volume_io import FORMATS, read_volume_raw, to_float, write_volume
from med3dvlm.utils.atomic import atomic_write_text
from med3dvlm.utils.fingerprint import file_sha256

log = logging.getLogger(__name__)

SKIPPED_FILE = "skipped.txt"
JOURNAL_FILE = ".prepare-journal.jsonl"
LOCK_FILE = ".prepare.lock"
# Largest |stored - written| per storage dtype (see volume_io): the re-read check's tolerance.
_STORAGE_TOLERANCE = {"uint8": 1.0 / 510 + 1e-6, "float16": 2.0**-12 + 1e-7, "float32": 0.0}
_PR_SET_PDEATHSIG = 1


# ----------------------------------------------------------------------------- per-volume work


@dataclass(frozen=True)
class Settings:
    """What a prepared volume depends on; a resumed run reuses outputs only if these match."""

    format: str
    npy_dtype: str
    spatial_size: tuple[int, int, int]
    preprocessing: Preprocessing

    def fingerprint(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "npy_dtype": self.npy_dtype,
            "spatial_size": list(self.spatial_size),
            "dataset": self.preprocessing.dataset,
            "preprocessing": {k: v.to_dict() for k, v in self.preprocessing.sources.items()},
        }

    @property
    def stored_dtype(self) -> str:
        return self.npy_dtype if self.format == "npy" else "float32"


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


def _read(
    job: VolumeJob, settings: Settings, max_voxels: int
) -> tuple[np.ndarray, tuple[str, ...], dict[str, Any]]:
    """The raw volume of a job, the slices dropped from a series, and what the manifest notes about
    the scan (its stored axis codes)."""
    spec = settings.preprocessing.sources[job.source_name]
    if job.kind == "series":
        stacked = stack_series(job.source, max_voxels)
        return stacked.volume, stacked.dropped, {}
    scan = load_scan(job.source, max_voxels, None if job.stored_order else spec.orientation, spec.first_frame)
    array = scan.array
    if job.rescale is not None:
        slope, intercept = job.rescale
        array = array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return array, (), {"stored_axes": scan.stored_axes, "spacing": list(job.spacing or scan.spacing)}


def prepare_volume(
    job: VolumeJob, out_dir: str, settings: Settings, max_voxels: int = DEFAULT_MAX_VOXELS
) -> JobOutcome:
    """Load, preprocess, write and verify one volume; bad input comes back as an error outcome.

    Errors are returned rather than raised so they cross the process boundary intact. A scan larger
    than ``max_voxels`` (by its header) is refused before it is read.
    """
    spec = settings.preprocessing.sources[job.source_name]
    try:
        fingerprint = source_fingerprint(job.source)
        raw, dropped, notes = _read(job, settings, max_voxels)
        volume = preprocess_volume(raw, settings.spatial_size, spec, job.source, notes.get("spacing"))
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
        **({"stored_axes": notes["stored_axes"]} if notes.get("stored_axes") else {}),
        **(
            {"air_level": air_level(raw), "looks_like_ct": looks_like_ct(raw)}
            if spec.window is not None and job.kind == "scan"
            else {}
        ),
    }
    if dropped:
        entry["dropped_slices"] = list(dropped)
    hu_unwindowed = spec.window is None and job.kind == "scan" and looks_like_ct(raw)
    return JobOutcome(job.output, entry=entry, hu_unwindowed=hu_unwindowed)


def _init_worker(parent: int) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already uses every core
    # A killed parent leaves its pool's workers running their current volume (tens of seconds at
    # full size). On Linux the kernel sends the parent-death signal itself; elsewhere a thread
    # watches for the re-parenting an orphan goes through.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    else:
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


# ----------------------------------------------------------------------------- resume state


def _file_stat(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _journal_line(output: str, entry: Mapping[str, Any], out: Path) -> str:
    return json.dumps({"output": output, "entry": entry, "stat": _file_stat(out / output)}) + "\n"


def _load_previous(
    out: Path,
    settings: Settings,
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


def _still_valid(
    out: Path, job: VolumeJob, record: tuple[Mapping[str, Any], list[int] | None] | None
) -> bool:
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
            raise DataError(
                out,
                f"another prepare is writing here (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}); wait for it "
                "to finish or stop it",
            ) from None
        handle.truncate(0)
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            )
            + "\n"
        )
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
        with ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(os.getpid(),)
        ) as pool:
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


def _prepare_volumes(
    plan: Plan,
    out: Path,
    settings: Settings,
    policy: ErrorPolicy,
    workers: int,
    progress: bool,
    max_voxels: int,
) -> dict[str, dict[str, Any]]:
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


def _split_lists(
    plan: Plan,
    volumes: Mapping[str, Any],
    strict_split: bool,
) -> tuple[dict[str, list[dict[str, str]]], dict[str, Any] | None]:
    """The prepared caption split file (``M3D_Cap.json`` for M3D): every list the release names, in
    its order (subsets such as ``test1k`` included), then the volumes it does not list, by split; a
    volume without a report text is in none. With ``strict_split``, what moved (and the subset entries
    of moved volumes leave their subsets)."""

    def entry(output: str) -> dict[str, str]:
        return {"image": output, "text": plan.text_of[output]}

    def captioned(outputs: list[str]) -> list[dict[str, str]]:
        return [entry(o) for o in outputs if o in volumes and o in plan.text_of]

    lists: dict[str, list[dict[str, str]]] = {name: [] for name in SPLITS}
    lists.update({name: captioned(outputs) for name, outputs in plan.listed.items()})
    in_splits = {o for name in SPLITS for o in plan.listed.get(name, [])}
    for output in volumes:
        if output not in in_splits and output in plan.text_of:
            lists[plan.split_of[output]].append(entry(output))
    if not strict_split:
        return lists, None
    splits, report = move_leaking_test_items(
        {name: lists[name] for name in SPLITS},
        image_of=lambda e: e["image"],
        text_of=lambda e: plan.texts[e["text"]],
        case_of=plan.case_of,
    )
    moved = set(report.leaking)  # keyed by image
    subsets = {
        name: [e for e in entries if e["image"] not in moved]
        for name, entries in lists.items()
        if name not in SPLITS
    }
    return {**splits, **subsets}, {"captions": report.to_dict()}


def _counts(
    plan: Plan,
    volumes: Mapping[str, Mapping[str, Any]],
    skipped: Sequence[Any],
    lists: Mapping[str, Sequence[Any]],
    moved: Mapping[str, Any] | None,
) -> dict[str, Any]:
    groups: dict[str, dict[str, int]] = {}
    cases: dict[str, set[str]] = {}
    for job in plan.jobs:
        name = plan.group_of.get(job.output)
        if name is not None:
            counts = groups.setdefault(name, {"cases": 0, "series": 0, "volumes_ok": 0})
            cases.setdefault(name, set()).add(plan.case_of(job.output))
            counts["cases"] = len(cases[name])
            counts["series"] += 1
            counts["volumes_ok"] += job.output in volumes
    return {
        "volumes_ok": len(volumes),
        "skipped": len(skipped),
        "duplicate_groups": len(plan.duplicates),
        "slices_dropped": sum(len(v.get("dropped_slices", ())) for v in volumes.values()),
        **{f"split_{name}": len(entries) for name, entries in lists.items()},
        **({"collections": groups} if groups else {}),
        "split_file_entries": {
            name: {"listed": len(plan.listed[name]), "kept": len(lists[name])} for name in plan.listed
        },
        **({"strict_split_moved": len(moved["captions"]["leaking"])} if moved else {}),
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
    dataset: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Prepare the release ``dataset`` (:mod:`med3dvlm.data.releases`; ``None``: M3D, or your own data
    for a ``.csv`` source) found at ``source`` into ``out``.

    ``split`` gives train/validation/test fractions where the release's own split does not decide.
    ``workers=None`` uses every available core, 0 or 1 runs in this process. ``strict_split`` moves
    leaking test items to train (module docstring). ``max_voxels`` bounds each raw scan by its
    header, before it is read (each worker holds one). ``window``: the CT window in HU
    (``preprocess.window_range``) where the release takes one (own data, CT-RATE); for own data
    unset, a scan that looks like raw HU is min-maxed and a warning says which setting to use.
    ``options``: the release's own settings (``dataset.*``). Returns the manifest written to
    ``out/manifest.json``.
    """
    source_path, out = Path(source), Path(out)
    chosen = find_release(dataset, source_path)
    unknown = set(options or {}) - set(chosen.options)
    if unknown:
        raise ValueError(
            f"dataset={chosen.name} has no setting(s) {sorted(unknown)} (it takes {list(chosen.options)})"
        )
    request = PrepareOptions(
        format,
        npy_dtype,
        spatial_size_tuple(spatial_size),
        split_fractions(split or {"train": 0.9, "validation": 0.05, "test": 0.05}),
        window,
        float(foreground_threshold),
        strict_split,
        dict(options or {}),
    )
    settings = _settings(request, chosen)
    if not source_path.exists():
        raise DataError(source_path, f"not found (expected {chosen.summary})")
    policy = ErrorPolicy(on_error)
    plan = chosen.plan(source_path, request, policy)

    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        _remove_temporaries(out)
        for text_rel, text in plan.texts.items():
            _write_text_if_changed(out / text_rel, text)
        volumes = _prepare_volumes(
            plan,
            out,
            settings,
            policy,
            _default_workers() if workers is None else workers,
            progress,
            max_voxels,
        )
        if plan.hu_unwindowed and window is None:
            _warn_raw_hu(plan.hu_unwindowed)
        unlike_ct = sorted(output for output, entry in volumes.items() if entry.get("looks_like_ct") is False)
        if unlike_ct:
            _warn_unlike_ct(unlike_ct, len(volumes))
        split_lists, moved = _split_lists(plan, volumes, strict_split)
        _write_json(out / chosen.caption_file, split_lists)
        added = (
            chosen.finish(source_path, out, plan, volumes, split_lists, policy, request)
            if chosen.finish
            else {}
        )
        skipped = sorted(policy.skipped, key=lambda s: (s["source"], s["reason"]))
        atomic_write_text(out / SKIPPED_FILE, "".join(f"{s['source']}\t{s['reason']}\n" for s in skipped))
        manifest = _manifest(
            source_path, settings, chosen, request, plan, volumes, skipped, split_lists, moved, added
        )
        _write_json(out / MANIFEST_FILE, manifest)
    log.info("prepared %d volumes into %s (%d skipped)", len(volumes), out, len(skipped))
    return manifest


def _manifest(
    source: Path,
    settings: Settings,
    chosen: Release,
    request: PrepareOptions,
    plan: Plan,
    volumes: Mapping[str, Any],
    skipped: list[dict[str, str]],
    split_lists: Mapping[str, list],
    moved: Mapping[str, Any] | None,
    added: Mapping[str, Any],
) -> dict[str, Any]:
    """What ``manifest.json`` records: the settings, the preprocessing, every volume, what was skipped
    and why, the counts, and what the release adds."""
    window = request.window
    extra = {key: value for key, value in added.items() if key != "counts"}
    return {
        "dataset": chosen.name,
        "format": settings.format,
        "npy_dtype": settings.npy_dtype,
        "spatial_size": list(settings.spatial_size),
        "source": str(source.resolve()),
        "settings": settings.fingerprint(),
        "preprocessing": settings.preprocessing.with_orientations(plan.orientations).to_dict(),
        "caption_file": chosen.caption_file,
        "split_source": plan.split_source,
        "volumes": volumes,
        "skipped": skipped,
        "duplicates": plan.duplicates,
        "intensity": {
            "window": window if isinstance(window, str | None) else list(window),
            "hu_like_min_maxed": plan.hu_unwindowed,
        },
        **extra,
        "strict_split": moved,
        "counts": {**_counts(plan, volumes, skipped, split_lists, moved), **added.get("counts", {})},
    }


def _settings(request: PrepareOptions, chosen: Release) -> Settings:
    """The checked settings every volume is prepared with: the release's recipe and the prepare settings."""
    if request.format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {request.format!r}")
    if request.npy_dtype not in ("uint8", "float16"):
        raise ValueError(f"npy_dtype must be 'uint8' or 'float16', got {request.npy_dtype!r}")
    recipe = chosen.preprocessing(request)
    settings = {
        "format": request.format,
        "npy_dtype": request.npy_dtype,
        "spatial_size": list(request.spatial_size),
        **(
            {"window": request.window if isinstance(request.window, str) else list(request.window)}
            if request.window is not None
            else {}
        ),
        **dict(request.extra),
    }
    recipe = Preprocessing(recipe.dataset, recipe.sources, settings)
    return Settings(request.format, request.npy_dtype, request.spatial_size, recipe)


def _warn_unlike_ct(outputs: Sequence[str], total: int) -> None:
    log.warning(
        "%d of %d scans do not look like CT in Hounsfield units under the CT window (no air near -1000 HU, "
        "preprocess.looks_like_ct; e.g. %s): an MRI or another non-CT scan wants intensity.window=none, a CT "
        "stored without its rescale (or rescaled twice) its rescale fixed; manifest.json lists each volume's "
        "air_level",
        len(outputs),
        total,
        outputs[0],
    )


def _warn_raw_hu(count: int) -> None:
    log.warning(
        "%d scan(s) look like raw CT in Hounsfield units (air below -500, tissue above 200) and no "
        "intensity.window is set: they were min-max normalised as M3D's display-windowed JPEGs are, "
        "which squeezes soft tissue into a sliver of [0, 1]. Set intensity.window=soft_tissue (W400/L40; "
        "or lung, bone, brain, [low,high]), or intensity.window=none to keep min-max",
        count,
    )
