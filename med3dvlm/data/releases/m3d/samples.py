"""M3D-VQA's samples: the closed (multiple choice), open and yes/no questions of the prepared CSVs."""

from __future__ import annotations

import os
from pathlib import Path

from med3dvlm.data.datasets import (
    OnError,
    SkipLog,
    VLMDataset,
    VolumeReader,
    check_split,
    read_csv_columns,
)
from med3dvlm.data.errors import DataError
from med3dvlm.data.prompts import VQA_SEPARATOR, PromptBuilder, closed_answer, closed_question
from med3dvlm.data.releases.m3d.layout import IMAGE_COLUMN, VQA_DIR, vqa_csv_name


def vqa_csv(data_dir: str | os.PathLike, split: str, yes_no: bool = False, name: str | None = None) -> Path:
    """Path of a prepared VQA CSV: the split's (``M3D-VQA/M3D_VQA[_yn]_{train,val,test}.csv``) or,
    with ``name``, any CSV of the release (``M3D_VQA_test5k.csv``)."""
    check_split(split)
    return Path(data_dir) / VQA_DIR / (name or vqa_csv_name(split, yes_no))


class _VQADataset(VLMDataset):
    """A VQA CSV of the prepared folder: the split's, or ``csv`` (a file name in ``M3D-VQA/``)."""

    columns: tuple[str, ...] = (IMAGE_COLUMN, "Question", "Answer", "Question Type")
    yes_no = False

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
        csv: str | None = None,
    ) -> None:
        super().__init__(data_dir, split, prompts, volumes, on_error, skip_log, prompt_only)
        self.csv = vqa_csv(data_dir, split, self.yes_no, csv)
        self.rows = read_csv_columns(self.csv, self.columns, limit)

    def __len__(self) -> int:
        return len(self.rows[IMAGE_COLUMN])

    def image_path(self, index: int) -> str:
        return self.rows[IMAGE_COLUMN][index]

    def source(self, index: int) -> str:
        return f"{self.csv} (data row {index + 1})"

    def text(self, index: int) -> tuple[str, str, str, str, str]:
        row = {c: self.rows[c][index] for c in self.columns}
        return row["Question"], VQA_SEPARATOR, row["Answer"], "", row["Question Type"]


class OpenVQADataset(_VQADataset):
    """M3D-VQA open-ended: the question, the answer text."""

    task = "open_vqa"


class YesNoVQADataset(_VQADataset):
    """M3D-VQA yes/no CSVs: the question, ``Yes``/``No``."""

    task = "yes_no_vqa"
    yes_no = True

    @classmethod
    def absence(cls, data_dir: str | os.PathLike, split: str) -> str | None:
        path = vqa_csv(data_dir, split, yes_no=True)
        if split != "train" and not path.is_file():
            return f"no {path.name}: M3D-VQA releases yes/no questions for training only"
        return None

    def text(self, index: int) -> tuple[str, str, str, str, str]:
        question, separator, answer, choice, qtype = super().text(index)
        if answer not in ("Yes", "No"):
            raise DataError(self.source(index), f"yes/no answer must be 'Yes' or 'No', got {answer!r}")
        return question, separator, answer, choice, qtype


class ClosedVQADataset(_VQADataset):
    """M3D-VQA multiple choice: ``question Choices: A. .. D. ..``, answer ``"<letter>. <text>"``."""

    task = "closed_vqa"
    columns = _VQADataset.columns + ("Choice A", "Choice B", "Choice C", "Choice D", "Answer Choice")

    def text(self, index: int) -> tuple[str, str, str, str, str]:
        row = {c: self.rows[c][index] for c in self.columns}
        letter = row["Answer Choice"].strip()
        if letter not in ("A", "B", "C", "D"):
            raise DataError(self.source(index), f"Answer Choice must be A-D, got {letter!r}")
        choices = [row[f"Choice {c}"] for c in "ABCD"]
        question = closed_question(row["Question"], choices)
        return question, VQA_SEPARATOR, closed_answer(letter, row["Answer"]), letter, row["Question Type"]
