"""RadGenome-ChestCT's VQA and region reports as training and evaluation samples over a prepared
CT-RATE folder (``prepare dataset=ctrate radgenome=<radgenome_files folder>``).

RadGenome's question templates (``qa_templates/*.json``) are not part of the CSVs the authors' code
reads, so the questions here are written from each row's columns, one fixed form per kind:

* abnormality: "What abnormality is seen in the {anatomy}?" -> ``Abnormality`` ("No Findings" when empty);
* location: "Where is the {abnormality} located?" -> ``Anatomy``;
* presence: "Is there {finding} in the {anatomy}?" -> ``Presence``;
* size: "What is the size of the {abnormality} in the {anatomy}?" -> ``Size``;
* region report: "Describe the findings of the {anatomy}." -> the region's sentences joined by a space.

An empty ``Anatomy`` is a sentence not tied to a region: "whole" (as the authors' loader reads NaN).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from med3dvlm.data.datasets import OnError, SkipLog, StringColumn, VLMDataset, VolumeReader
from med3dvlm.data.errors import DataError
from med3dvlm.data.prompts import PromptBuilder
from med3dvlm.data.releases.ctrate.layout import CTRATE_LABELS, RADGENOME_COLUMNS
from med3dvlm.data.releases.ctrate.plan import LABELS_FILE, PREFIX, RADGENOME

VQA_KINDS: tuple[str, ...] = ("abnormality", "location", "presence", "size")
IMAGE_PATH = "Image Path"
WHOLE = "whole"
NO_FINDINGS = "No Findings"


def radgenome_csv(data_dir: str | os.PathLike, split: str, kind: str) -> Path:
    """A prepared RadGenome CSV: ``RadGenome/<split>_<kind>.csv`` (``kind``: ``vqa_size``, ``region_report``, ...)."""
    return Path(data_dir) / RADGENOME / f"{split}_{kind}.csv"


def read_radgenome(data_dir: str | os.PathLike, split: str, kind: str) -> list[dict[str, str]]:
    """The rows of a prepared RadGenome CSV (none when the split has none)."""
    path = radgenome_csv(data_dir, split, kind)
    if not path.is_file():
        if not (Path(data_dir) / RADGENOME).is_dir():
            raise DataError(
                Path(data_dir) / RADGENOME,
                "not found: prepare CT-RATE with radgenome=<RadGenome-ChestCT radgenome_files folder>",
            )
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in (*RADGENOME_COLUMNS[kind], IMAGE_PATH) if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(path, f"missing column(s) {missing}")
        return list(reader)


def vqa_text(kind: str, row: dict[str, str]) -> tuple[str, str]:
    """The question and answer of one RadGenome VQA row (module docstring)."""
    anatomy = (row.get("Anatomy") or "").strip() or WHOLE
    if kind == "abnormality":
        return f"What abnormality is seen in the {anatomy}?", (
            row["Abnormality"] or ""
        ).strip() or NO_FINDINGS
    if kind == "location":
        return f"Where is the {row['Abnormality'].strip()} located?", anatomy
    if kind == "presence":
        return f"Is there {row['Finding'].strip()} in the {anatomy}?", row["Presence"].strip()
    if kind == "size":
        return f"What is the size of the {row['Abnormality'].strip()} in the {anatomy}?", row["Size"].strip()
    raise ValueError(f"unknown RadGenome VQA kind {kind!r}: one of {VQA_KINDS}")


class _RadGenomeDataset(VLMDataset):
    """``(image, question, answer, kind)`` items of a prepared folder's split, prompts as M3D's VQA."""

    @classmethod
    def absence(cls, data_dir: str | os.PathLike, split: str) -> str | None:
        if not (Path(data_dir) / RADGENOME).is_dir():
            return "prepared without RadGenome-ChestCT (prepare dataset=ctrate radgenome=<radgenome_files folder>)"
        return None

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        prompts: PromptBuilder,
        volumes: VolumeReader,
        on_error: OnError = "fail",
        skip_log: SkipLog | None = None,
        prompt_only: bool = False,
        limit: int | None = None,
    ) -> None:
        super().__init__(data_dir, split, prompts, volumes, on_error, skip_log, prompt_only)
        items = self.items(data_dir, split)[:limit]
        self.images = StringColumn([image for image, *_ in items])
        self.questions = StringColumn([question for _, question, _, _ in items])
        self.answers = StringColumn([answer for *_, answer, _ in items])
        self.kinds = StringColumn([kind for *_, kind in items])

    def items(self, data_dir: str | os.PathLike, split: str) -> list[tuple[str, str, str, str]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> str:
        return self.images[index]

    def source(self, index: int) -> str:
        return f"{radgenome_csv(self.data_dir, self.split, self.kinds[index])} ({self.images[index]})"

    def prompt(self, question: str, separator: str) -> str:
        return self.prompts.vqa(question)

    def text(self, index: int) -> tuple[str, str, str, str, str]:
        return self.questions[index], "", self.answers[index], "", self.kinds[index]


class RadGenomeVQADataset(_RadGenomeDataset):
    """Every abnormality, location, presence and size question of the split, in that order."""

    task = "radgenome_vqa"

    def __init__(self, *args, kinds: Sequence[str] = VQA_KINDS, **kwargs) -> None:
        unknown = set(kinds) - set(VQA_KINDS)
        if unknown:
            raise ValueError(f"unknown RadGenome VQA kind(s) {sorted(unknown)}: {VQA_KINDS}")
        self.wanted = tuple(kinds)
        super().__init__(*args, **kwargs)

    def items(self, data_dir: str | os.PathLike, split: str) -> list[tuple[str, str, str, str]]:
        return [
            (row[IMAGE_PATH], *vqa_text(kind, row), kind)
            for kind in self.wanted
            for row in read_radgenome(data_dir, split, f"vqa_{kind}")
        ]

    def source(self, index: int) -> str:
        return (
            f"{radgenome_csv(self.data_dir, self.split, 'vqa_' + self.kinds[index])} ({self.images[index]})"
        )


class RadGenomeRegionDataset(_RadGenomeDataset):
    """One item per volume and region: the region's sentences as its report."""

    task = "radgenome_region"

    def items(self, data_dir: str | os.PathLike, split: str) -> list[tuple[str, str, str, str]]:
        regions: dict[tuple[str, str], list[str]] = {}
        for row in read_radgenome(data_dir, split, "region_report"):
            anatomy = (row.get("Anatomy") or "").strip() or WHOLE
            regions.setdefault((row[IMAGE_PATH], anatomy), []).append(row["Sentence"].strip())
        return [
            (
                image,
                f"Describe the findings of the {anatomy}.",
                " ".join(s for s in sentences if s),
                "region_report",
            )
            for (image, anatomy), sentences in regions.items()
        ]


@dataclass(frozen=True)
class LabelledVolume:
    """A prepared CT-RATE volume with its 18 labels (``CT-RATE/labels.csv``)."""

    name: str  # CT-RATE's VolumeName
    image: str  # prepared path relative to the folder
    split: str
    labels: tuple[int, ...]


def read_labels(data_dir: str | os.PathLike, split: str | None = None) -> list[LabelledVolume]:
    """The prepared volumes (of ``split``) with their labels, in ``VolumeName`` order."""
    path = Path(data_dir) / PREFIX / LABELS_FILE
    if not path.is_file():
        raise DataError(
            path, "not found: a CT-RATE folder prepared with `python -m med3dvlm.prepare dataset=ctrate`"
        )
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [
            c
            for c in ("VolumeName", IMAGE_PATH, "split", *CTRATE_LABELS)
            if c not in (reader.fieldnames or [])
        ]
        if missing:
            raise DataError(path, f"missing column(s) {missing}")
        rows = list(reader)
    volumes = []
    for row in rows:
        if split is not None and row["split"] != split:
            continue
        values = tuple(row[label].strip() for label in CTRATE_LABELS)
        if any(value not in ("0", "1", "0.0", "1.0") for value in values):
            raise DataError(path, f"{row['VolumeName']}: labels must be 0 or 1, got {values}")
        volumes.append(
            LabelledVolume(
                row["VolumeName"], row[IMAGE_PATH], row["split"], tuple(int(float(v)) for v in values)
            )
        )
    return volumes
