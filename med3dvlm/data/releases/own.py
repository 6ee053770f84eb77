"""Your own scans (``dataset=own``, chosen for a ``.csv`` source): a CSV with columns ``image,report``.

``image`` is a scan (``data.scans``: NIfTI, NRRD, MetaImage, a DICOM series folder), relative to
the CSV's folder or absolute; ``report`` its report text. Scans are reoriented to ``orientation``
(``dataset.orientation``, default RAS), windowed with ``intensity.window`` (min-max without one,
with a warning for raw CT) and split by a hash of their path; the same file listed twice is an
error naming both lines, and files with identical bytes are kept in one split. Output:
``own/<stem>.<format>`` and ``own/<stem>.txt``, captions in ``M3D_Cap.json``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from med3dvlm.data.datasets import CaptionDataset
from med3dvlm.data.errors import DataError
from med3dvlm.data.prepared import OWN_ORIENTATION
from med3dvlm.data.preprocess import Preprocessing, SourcePreprocessing, window_range
from med3dvlm.data.releases.base import (
    DatasetLicence,
    ErrorPolicy,
    Plan,
    PrepareOptions,
    Release,
    VolumeJob,
    hash_split,
)
from med3dvlm.data.releases.m3d.plan import extract_report
from med3dvlm.data.scans import SUPPORTED, missing_reader, scan_format
from med3dvlm.data.volume_io import volume_suffix
from med3dvlm.utils.fingerprint import file_sha256

log = logging.getLogger(__name__)

OWN_DIR = "own"
OWN_COLUMNS: tuple[str, ...] = ("image", "report")


def preprocessing(options: PrepareOptions) -> Preprocessing:
    """Your window (or min-max), reoriented to ``dataset.orientation``, cropped and resized as M3D."""
    window = window_range(options.window)
    spec = SourcePreprocessing(
        window=window,
        scale="window" if window else "minmax",
        orientation=options.extra.get("orientation", OWN_ORIENTATION),
        foreground_threshold=options.foreground_threshold,
    )
    return Preprocessing("own", {"own": spec})


def _own_stems(images: Sequence[str]) -> list[str]:
    """Output stems for own volumes: the file (or DICOM folder) name without its scan suffix, made
    unique with a path hash where stems collide."""
    stems = [
        re.sub(r"\.(nii(\.gz)?|nrrd|nhdr|mha|mhd)$", "", Path(image.rstrip("/")).name, flags=re.IGNORECASE)
        for image in images
    ]
    counts = Counter(stems)
    return [
        stem if counts[stem] == 1 else f"{stem}_{hashlib.sha256(image.encode()).hexdigest()[:8]}"
        for stem, image in zip(stems, images)
    ]


def plan_own(csv_path: Path, options: PrepareOptions, policy: ErrorPolicy) -> Plan:
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
    plan = Plan([])
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
                raise DataError(
                    csv_path, f"line {number}: {image!r} is the same file as line {first_row[path]}"
                )
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
        output = f"{OWN_DIR}/{stem}{volume_suffix(options.format)}"
        text_rel = f"{OWN_DIR}/{stem}.txt"
        plan.jobs.append(VolumeJob(str(path), image, "scan", output, "own"))
        plan.text_of[output] = text_rel
        plan.texts[text_rel] = report
    plan.duplicates = identical_files(plan.jobs)
    group_of = {label: group[0] for group in plan.duplicates for label in group}
    for job in plan.jobs:
        # Copies of one scan share the split of the first copy listed: never train and test.
        plan.split_of[job.output] = hash_split(group_of.get(job.label, job.label), options.fractions)
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


RELEASE = Release(
    name="own",
    summary="your scans (NIfTI, NRRD, MetaImage, DICOM series) and reports, listed in an image,report CSV",
    preprocessing=preprocessing,
    plan=plan_own,
    options=("orientation",),
    tasks={"caption": CaptionDataset},
    mixtures={"retrieval": ("retrieval",), "pretrain": ("caption",), "finetune": ("caption",)},
    licence=DatasetLicence(note="the user's own scans and reports: their licence is the owner's to state"),
)
