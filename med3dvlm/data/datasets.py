"""Datasets over a folder ``python -m med3dvlm.prepare`` wrote: the machinery every dataset's samples
share, the captions (report generation) and the image-report pairs (retrieval) every release has.
Each release adds its own samples (M3D's VQA CSVs: ``releases.m3d.samples``; FLARE's question chains).

VLM datasets return the image, ``input_ids`` and ``labels`` from the prompt builder plus the raw
strings evaluation needs; the retrieval dataset returns the image and the tokenised report. Bad data raises :class:`DataError` naming the file; with
``on_error="skip"`` a failing sample is counted, logged, listed in a file and replaced by the next
valid sample (index order, wrapping), never by a random one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from med3dvlm.data.errors import DataError
from med3dvlm.data.prepared import SPLITS, caption_file
from med3dvlm.data.prompts import (
    CAPTION_SEPARATOR,
    PromptBuilder,
    caption_question,
)
from med3dvlm.data.transforms import Augmentation, to_image_tensor
from med3dvlm.data.volume_io import read_volume_raw, to_float, validate_volume

log = logging.getLogger(__name__)

OnError = Literal["fail", "skip"]


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class StringColumn:
    """Strings packed in one numpy byte buffer: DataLoader workers forked from the parent read it
    without touching per-object refcounts, so a 500k-row CSV is not copied into every worker."""

    def __init__(self, values: Sequence[str]) -> None:
        encoded = [v.encode("utf-8") for v in values]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:end].tobytes().decode("utf-8")


def read_csv_columns(path: Path, columns: Sequence[str], limit: int | None = None) -> dict[str, StringColumn]:
    """The named columns of a CSV; a missing file or column raises :class:`DataError`."""
    if not path.is_file():
        raise DataError(path, "file not found")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(path, f"missing CSV column(s) {missing}; found {header}")
        values: dict[str, list[str]] = {c: [] for c in columns}
        for i, row in enumerate(reader):
            if limit is not None and i >= limit:
                break
            for c in columns:
                values[c].append(row[c] or "")
    return {c: StringColumn(v) for c, v in values.items()}


def read_caption_split(
    data_dir: str | os.PathLike, split: str, limit: int | None = None
) -> list[tuple[str, str]]:
    """``(image, text)`` relative paths of a split of ``M3D_Cap.json``."""
    check_split(split)
    path = caption_file(data_dir)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON ({exc})") from exc
    if split not in splits:
        raise DataError(path, f"no {split!r} split (has {sorted(splits)})")
    pairs = []
    for i, entry in enumerate(splits[split][:limit]):
        if "image" not in entry or "text" not in entry:
            raise DataError(path, f"{split}[{i}] lacks an 'image' or 'text' key")
        pairs.append((entry["image"], entry["text"]))
    return pairs


def read_report(path: Path) -> str:
    """The report text of a prepared case; missing or empty raises :class:`DataError`."""
    if not path.is_file():
        raise DataError(path, "file not found")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise DataError(path, "empty report")
    return text


@dataclass(frozen=True)
class VolumeReader:
    """Reads a prepared volume, checks it, applies train-time augmentation, returns ``(1, D, H, W)``."""

    spatial_size: tuple[int, int, int] | None = None
    augmentation: Augmentation | None = None

    def __call__(self, path: Path, rng: np.random.Generator) -> torch.Tensor:
        shape = tuple(self.spatial_size) if self.spatial_size else None
        stored = read_volume_raw(path, shape=shape)
        validate_volume(path, stored, shape)
        volume = self.augmentation(stored, rng) if self.augmentation else to_float(stored)
        return to_image_tensor(volume)


class SkipLog:
    """Counts, logs and lists (one line per failure, appended) the samples skipped in this process."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else None
        self.count = 0

    def record(self, sample_id: str, error: DataError) -> None:
        self.count += 1
        log.warning("skipping sample %s: %s", sample_id, error)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(f"{sample_id}\t{error}\n")


class M3DDataset(Dataset):
    """Common machinery: volume reading, per-worker RNG, the ``on_error`` policy."""

    task: str = ""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        volumes: VolumeReader,
        on_error: OnError = "fail",
        skip_log: SkipLog | None = None,
    ) -> None:
        check_split(split)
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.volumes = volumes
        self.on_error = on_error
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        self._rng_seed: int | None = None
        self._rng: np.random.Generator | None = None
        self._sample_rng: np.random.Generator | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> dict[str, Any]:
        """Sample ``index``; raises :class:`DataError` on bad data."""
        raise NotImplementedError

    def sample_id(self, index: int) -> str:
        return f"{self.task}/{self.split}/{index}"

    def rng(self) -> np.random.Generator:
        """The generator of the sample being loaded (see :meth:`sample`), else this worker's:
        seeded from the DataLoader worker seed (or torch's seed with ``num_workers=0``) and the
        task, so each worker and each dataset draws its own stream."""
        if self._sample_rng is not None:
            return self._sample_rng
        info = get_worker_info()
        seed = info.seed if info is not None else torch.initial_seed()
        if self._rng is None or seed != self._rng_seed:
            self._rng_seed = seed
            self._rng = np.random.default_rng([seed, zlib.crc32(self.task.encode())])
        return self._rng

    def resolve(self, relative: str) -> Path:
        return self.data_dir / relative

    def sample(self, index: int, rng: np.random.Generator) -> dict[str, Any]:
        """Sample ``index`` with every random draw (augmentation, question template) from ``rng``: a
        sample that depends on its own seed only, not on which worker loads it or what came before
        (the resumable training loader seeds it by epoch and position)."""
        self._sample_rng = rng
        try:
            return self[index]
        finally:
            self._sample_rng = None

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.on_error == "fail":
            return self.load(index)
        for offset in range(len(self)):
            current = (index + offset) % len(self)
            try:
                return self.load(current)
            except DataError as error:
                self.skip_log.record(self.sample_id(current), error)
        raise DataError(self.data_dir, f"every {self.task} sample of split {self.split!r} failed")


class VLMDataset(M3DDataset):
    """Image + prompt + answer samples for the VLM stages; ``prompt_only`` leaves the answer out of
    ``input_ids`` (generation) and drops ``labels``. A subclass with ``varies_question`` takes
    ``random_question`` (its question is drawn per sample in training)."""

    varies_question = False

    @classmethod
    def absence(cls, data_dir: str | os.PathLike, split: str) -> str | None:
        """Why a prepared folder has no samples of this task in ``split`` by design (a mixture then
        leaves the task out), or ``None``."""
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
    ) -> None:
        super().__init__(data_dir, split, volumes, on_error, skip_log)
        self.prompts = prompts
        self.prompt_only = prompt_only

    def text(self, index: int) -> tuple[str, str, str, str, str]:
        """``(question, separator, answer, answer_choice, question_type)`` of sample ``index``."""
        raise NotImplementedError

    def image_path(self, index: int) -> str:
        raise NotImplementedError

    def source(self, index: int) -> str:
        """Where the text of sample ``index`` comes from (named in errors)."""
        raise NotImplementedError

    def prompt(self, question: str, separator: str) -> str:
        """The whole prompt of a sample whose :meth:`text` is ``question`` (M3D's layout)."""
        return self.prompts.prompt(question, separator)

    def load(self, index: int) -> dict[str, Any]:
        question, separator, answer, choice, qtype = self.text(index)
        prompt = self.prompt(question, separator)
        try:
            tokens = self.prompts.tokenize(prompt, None if self.prompt_only else answer)
        except ValueError as exc:
            raise DataError(self.source(index), str(exc)) from exc
        sample = {
            "image": self.volumes(self.resolve(self.image_path(index)), self.rng()),
            "input_ids": torch.tensor(tokens.input_ids, dtype=torch.long),
            "question": question,
            "answer": answer,
            "answer_choice": choice,
            "question_type": qtype,
            "task": self.task,
            "image_path": self.image_path(index),
            "sample_id": self.sample_id(index),
        }
        if tokens.labels is not None:
            sample["labels"] = torch.tensor(tokens.labels, dtype=torch.long)
        return sample


class CaptionDataset(VLMDataset):
    """M3D-Cap report generation: a caption question (random from the templates when
    ``random_question``, else the first) and the report as the answer."""

    task = "caption"
    varies_question = True

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        prompts: PromptBuilder,
        volumes: VolumeReader,
        on_error: OnError = "fail",
        skip_log: SkipLog | None = None,
        prompt_only: bool = False,
        random_question: bool = False,
        limit: int | None = None,
    ) -> None:
        super().__init__(data_dir, split, prompts, volumes, on_error, skip_log, prompt_only)
        self.random_question = random_question
        pairs = read_caption_split(data_dir, split, limit)
        self.images = StringColumn([image for image, _ in pairs])
        self.texts = StringColumn([text for _, text in pairs])

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> str:
        return self.images[index]

    def source(self, index: int) -> str:
        return str(self.resolve(self.texts[index]))

    def text(self, index: int) -> tuple[str, str, str, str, str]:
        report = read_report(self.resolve(self.texts[index]))
        question = caption_question(self.rng() if self.random_question else None)
        return question, CAPTION_SEPARATOR, report, "", ""


class RetrievalDataset(M3DDataset):
    """Image + report pairs for SigLIP: the whole report tokenised with the text tokenizer and
    truncated to ``max_length`` (the original shuffled sentences; this keeps the report as written)."""

    task = "retrieval"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        volumes: VolumeReader,
        max_length: int = 512,
        on_error: OnError = "fail",
        skip_log: SkipLog | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(data_dir, split, volumes, on_error, skip_log)
        self.tokenizer = tokenizer
        self.max_length = max_length
        pairs = read_caption_split(data_dir, split, limit)
        self.images = StringColumn([image for image, _ in pairs])
        self.texts = StringColumn([text for _, text in pairs])

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> dict[str, Any]:
        report = read_report(self.resolve(self.texts[index]))
        ids = self.tokenizer(report, truncation=True, max_length=self.max_length)["input_ids"]
        return {
            "image": self.volumes(self.resolve(self.images[index]), self.rng()),
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "text": report,
            "task": self.task,
            "image_path": self.images[index],
            "sample_id": self.sample_id(index),
        }
