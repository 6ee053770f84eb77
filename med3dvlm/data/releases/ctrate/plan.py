"""Planning CT-RATE (``dataset=ctrate``): every volume of the chosen version with its report, labels,
rescale and spacing, its split by patient; then the labels and RadGenome-ChestCT's CSVs beside them.

HU: v1 stores HU - intercept, so v1 volumes get the metadata's ``RescaleSlope * x + RescaleIntercept``;
v2 volumes are HU already (the reference loader's double shift, CT-CLIP#50, is not repeated). The
version follows from the tree (``version=auto``: the ``*_fixed`` folders if present); each volume's
air level is recorded (``preprocess.looks_like_ct``), and volumes without air near -1000 HU (shifted by
1024) are named in a warning (the voxels disagree with the version).

Splits: CT-RATE's validation set is our ``test`` split; ``validation`` is carved from the training
patients by a hash of the patient (``validation_fraction``), so no patient is in two splits.
``reconstructions=first`` keeps one reconstruction per scan. Reports: the ``report_sections`` joined
by a space, "Not given." counting as empty; a volume whose report is then empty has no caption.

Prepared layout: ``CT-RATE/<patient>/<scan>/<name>.<format>`` (CT-RATE's names) and ``<name>.txt``,
``CT-RATE.json`` (caption lists), ``CT-RATE/labels.csv`` (``VolumeName``, ``Image Path``, ``split`` and the 18
labels of every prepared volume), and with ``radgenome=<folder>`` ``RadGenome/<split>_<kind>.csv`` (RadGenome's rows
about prepared volumes, with ``Image Path``).
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from med3dvlm.data.errors import DataError
from med3dvlm.data.preprocess import Preprocessing, SourcePreprocessing, window_range
from med3dvlm.data.releases.base import ErrorPolicy, Plan, PrepareOptions, VolumeJob, hash_split
from med3dvlm.data.releases.ctrate.layout import (
    CSV_SPLIT,
    CTRATE_LABELS,
    DATASET_DIR,
    LABEL_COLUMNS,
    NOT_GIVEN,
    RADGENOME_COLUMNS,
    SPLITS,
    VOLUME_DIRS,
)
from med3dvlm.data.scans import stored_orientation
from med3dvlm.data.volume_io import volume_suffix
from med3dvlm.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

PREFIX = "CT-RATE"
RADGENOME = "RadGenome"
LABELS_FILE = "labels.csv"
SOURCE = "chest"
DEFAULT_WINDOW = "lung"
"""[-1350, 150] HU: Med3DVLM-FLARE's chest window (``intensity.window=[-1000,1000]`` is CT-CLIP's)."""
NAME = re.compile(r"(train|valid)_(\d+)_([a-z]+)_(\d+)\.nii\.gz")
OUR_SPLIT = {"train": "train", "valid": "test"}


def preprocessing(options: PrepareOptions) -> Preprocessing:
    """The chest recipe: HU window (default chest [-1350, 150]) scaled by its bounds, optional
    resampling to ``spacing``, scikit-image's anti-aliased resize, no crop, the stored voxel order."""
    window = window_range(options.window if options.window is not None else DEFAULT_WINDOW)
    spec = SourcePreprocessing(
        window=window,
        scale="window",
        spacing=options.extra.get("spacing"),
        foreground_threshold=None,
        resize="antialiased",
    )
    return Preprocessing("ctrate", {SOURCE: spec})


@dataclass
class CtratePlan(Plan):
    """A plan with what ``finish`` writes: each output's CT-RATE name and labels, the version read."""

    version: str = "v2"
    name_of: dict[str, str] = field(default_factory=dict)  # output -> VolumeName
    labels: dict[str, list[str]] = field(default_factory=dict)  # VolumeName -> the 18 label values


def _read_csv(path: Path, required: Sequence[str]) -> dict[str, dict[str, str]]:
    """A CT-RATE CSV keyed by its first column (``VolumeName``); missing columns name the file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(path, f"unreadable CSV ({type(exc).__name__}: {exc})") from exc
    missing = [column for column in required if column not in header]
    if missing:
        raise DataError(path, f"missing column(s) {missing} (found {header})")
    return {row[header[0]]: row for row in rows}


def _numbers(text: str, where: str, key: str) -> list[float]:
    """The numbers of a metadata cell such as ``"[0.75, 0.75]"`` or ``1.5``."""
    try:
        return [float(part) for part in text.strip().strip("[]").split(",")]
    except ValueError as exc:
        raise DataError(where, f"{key} {text!r} is not a number or a list of numbers") from exc


def report_text(row: Mapping[str, str], sections: Sequence[str]) -> str:
    """The report of a volume: its ``sections`` joined by a space, "Not given." and blanks left out."""
    parts = [(row.get(section) or "").strip() for section in sections]
    return " ".join(part for part in parts if part and part != NOT_GIVEN)


def _version(root: Path, wanted: str) -> str:
    if wanted in ("v1", "v2"):
        return wanted
    if wanted != "auto":
        raise ValueError(f"version={wanted!r}: auto, v1 or v2")
    return "v2" if any((root / VOLUME_DIRS["v2"][split]).is_dir() for split in SPLITS) else "v1"


def _volumes(folder: Path, first_only: bool) -> list[Path]:
    """``<patient>/<scan>/<name>.nii.gz`` under ``folder``, the first reconstruction per scan with ``first_only``."""
    found = sorted(
        folder.glob("*/*/*.nii.gz"),
        key=lambda p: tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)),
    )
    if not first_only:
        return found
    kept: dict[Path, Path] = {}
    for path in found:
        kept.setdefault(path.parent, path)
    return list(kept.values())


def plan_ctrate(source: Path, options: PrepareOptions, policy: ErrorPolicy) -> CtratePlan:
    """Jobs for every volume of the chosen version of the CT-RATE ``dataset/`` folder (or its parent)."""
    root = source / DATASET_DIR if (source / DATASET_DIR).is_dir() else source
    version = _version(root, str(options.extra.get("version", "auto")))
    sections = list(options.extra.get("report_sections", ("Findings_EN", "Impressions_EN")))
    first_only = options.extra.get("reconstructions", "all") == "first"
    if options.extra.get("reconstructions", "all") not in ("all", "first"):
        raise ValueError(f"reconstructions={options.extra['reconstructions']!r}: all or first")
    held_out = {
        "train": 1.0 - float(options.extra.get("validation_fraction", 0.05)),
        "validation": 0.0,
        "test": 0.0,
    }
    held_out["validation"] = 1.0 - held_out["train"]
    plan = CtratePlan(
        [],
        split_source="release",
        case_of=lambda output: "_".join(Path(output).name.split("_")[:2]),
        version=version,
    )
    folders = {split: root / VOLUME_DIRS[version][split] for split in SPLITS}
    if not any(folder.is_dir() for folder in folders.values()):
        raise DataError(
            root,
            f"no CT-RATE volumes of {version} here ({', '.join(VOLUME_DIRS[version].values())} "
            "missing); source= is CT-RATE's dataset/ folder (or the folder holding it)",
        )
    paths: list[Path] = []
    for split, folder in folders.items():
        if not folder.is_dir():
            log.warning("%s: not found; CT-RATE's %s split is left out", folder, split)
            continue
        csv_split = CSV_SPLIT[split]
        reports = _read_csv(
            root / "radiology_text_reports" / f"{csv_split}_reports.csv", ["VolumeName", *sections]
        )
        metadata = _read_csv(
            root / "metadata" / f"{csv_split}_metadata.csv",
            ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"],
        )
        labels = _read_csv(root / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", LABEL_COLUMNS)
        for path in _volumes(folder, first_only):
            name = path.name
            try:
                match = NAME.fullmatch(name)
                if not match or match.group(1) != split or path.parent.name != name.rsplit("_", 1)[0]:
                    raise DataError(
                        path,
                        f"not a CT-RATE {split} volume name in its place "
                        f"({split}_<patient>/{split}_<patient>_<scan>/{split}_<patient>_<scan>_<recon>)",
                    )
                for table, what in ((reports, "report"), (metadata, "metadata"), (labels, "labels")):
                    if name not in table:
                        raise DataError(path, f"no {what} row for {name}")
                row = metadata[name]
                where = f"{root / 'metadata'} ({name})"
                slope = _numbers(row["RescaleSlope"], where, "RescaleSlope")[0]
                intercept = _numbers(row["RescaleIntercept"], where, "RescaleIntercept")[0]
                # DICOM PixelSpacing order: between rows (our H), then between columns (our W).
                xy = _numbers(row["XYSpacing"], where, "XYSpacing")
                z = _numbers(row["ZSpacing"], where, "ZSpacing")[0]
            except DataError as error:
                policy.handle(str(path.relative_to(root)), error)
                continue
            output = f"{PREFIX}/{path.parent.parent.name}/{path.parent.name}/{name[:-7]}{volume_suffix(options.format)}"
            rescale = (slope, intercept) if version == "v1" else None
            plan.jobs.append(
                VolumeJob(
                    str(path.resolve()),
                    str(path.relative_to(root)),
                    "scan",
                    output,
                    SOURCE,
                    rescale=rescale,
                    spacing=(z, xy[0], xy[-1]),
                    stored_order=True,
                )
            )
            text = report_text(reports[name], sections)
            if text:
                text_path = f"{output[: -len(volume_suffix(options.format))]}.txt"
                plan.texts[text_path] = text
                plan.text_of[output] = text_path
            patient = "_".join(name.split("_")[:2])
            plan.split_of[output] = OUR_SPLIT[split] if split == "valid" else hash_split(patient, held_out)
            plan.group_of[output] = split
            plan.name_of[output] = name
            plan.labels[name] = [labels[name][label] for label in CTRATE_LABELS]
            paths.append(path)
    orientation = stored_orientation(paths)
    plan.orientations = {SOURCE: orientation} if orientation else {}
    return plan


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _radgenome(
    folder: Path,
    out: Path,
    split_of: Mapping[str, str],
    image_of: Mapping[str, str],
) -> dict[str, dict[str, int]]:
    """RadGenome's CSVs cut to the prepared volumes, per our split, with ``Image Path``."""
    counts: dict[str, dict[str, int]] = {}
    for kind, columns in RADGENOME_COLUMNS.items():
        rows: dict[str, list[dict[str, str]]] = {}
        listed = 0
        for csv_split in ("train", "validation"):
            path = folder / f"{csv_split}_{kind}.csv"
            if not path.is_file():
                raise DataError(
                    path, "not found (radgenome= names RadGenome-ChestCT's radgenome_files folder)"
                )
            with open(path, newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                missing = [c for c in columns if c not in (reader.fieldnames or [])]
                if missing:
                    raise DataError(path, f"missing column(s) {missing} (found {reader.fieldnames})")
                for row in reader:
                    listed += 1
                    name = row["Volumename"]
                    if name in image_of:
                        rows.setdefault(split_of[name], []).append({**row, "Image Path": image_of[name]})
        for split, kept in rows.items():
            _write_csv(out / RADGENOME / f"{split}_{kind}.csv", [*columns, "Image Path"], kept)
        counts[kind] = {"rows": listed, "kept": sum(len(kept) for kept in rows.values())}
    return counts


def finish(
    root: Path,
    out: Path,
    plan: CtratePlan,
    volumes: Mapping[str, Any],
    split_lists: dict[str, list[dict[str, str]]],
    policy: ErrorPolicy,
    options: PrepareOptions,
) -> dict[str, Any]:
    """The labels of every prepared volume, RadGenome's CSVs when asked, and the version check."""
    prepared = {plan.name_of[output]: output for output in volumes}
    columns = ("VolumeName", "Image Path", "split", *CTRATE_LABELS)
    rows = [
        (name, prepared[name], plan.split_of[prepared[name]], *plan.labels[name]) for name in sorted(prepared)
    ]
    _write_csv(out / PREFIX / LABELS_FILE, columns, [dict(zip(columns, row, strict=True)) for row in rows])
    shifted = sorted(
        name for name, output in prepared.items() if volumes[output].get("looks_like_ct") is False
    )
    if shifted:
        log.warning(
            "those %d CT-RATE volumes were read as %s (%s): their voxels say the other version; check version=",
            len(shifted),
            plan.version,
            "HU - intercept, the metadata's rescale applied" if plan.version == "v1" else "HU, no rescale",
        )
    added: dict[str, Any] = {
        "ctrate": {
            "version": plan.version,
            "labels": f"{PREFIX}/{LABELS_FILE}",
            "not_like_the_version": shifted,
        }
    }
    radgenome = options.extra.get("radgenome")
    if radgenome:
        split_of = {plan.name_of[o]: plan.split_of[o] for o in volumes}
        added["radgenome"] = _radgenome(Path(radgenome), out, split_of, prepared)
    return added
