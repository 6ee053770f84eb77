"""Batched, resumable generation over a prompt-only dataset into a predictions CSV.

Each finished batch is appended to the CSV and flushed to disk, so a killed evaluation loses at
most the batch in flight: a rerun reads the complete rows already written (a torn last line is
cut off), checks that they belong to the same dataset in the same order, and generates only the
rest. Sampling, when asked for, is seeded per batch from the index of its first row, so a resumed
run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from med3dvlm.data.collate import PadCollate
from med3dvlm.models.generation import GenerateFn

PRED = "Pred"


def read_complete_rows(path: Path, columns: Sequence[str]) -> tuple[list[dict[str, str]], list[str]]:
    """Rows and header of a predictions CSV written by :func:`generate_predictions`, dropping a
    torn last line (the file is truncated to its complete rows). A header that lacks one of
    ``columns`` is an error: the file belongs to another task."""
    if not path.is_file() or path.stat().st_size == 0:
        return [], []
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as fh:
            fh.truncate(len(data))
    reader = csv.DictReader(data.decode("utf-8").splitlines(keepends=True))
    header = list(reader.fieldnames or [])
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(
            f"{path}: header {header} lacks {missing}; it was written by another task: "
            "delete it or choose another run folder"
        )
    return list(reader), header


def generate_predictions(
    dataset: Dataset,
    row_of: Callable[[Mapping[str, Any], int], dict[str, str]],
    generate: GenerateFn,
    csv_path: str | os.PathLike,
    columns: Sequence[str],
    pad_token_id: int,
    batch_size: int = 8,
    num_workers: int = 0,
    seed: int = 42,
    progress: bool = True,
    pred_column: str = PRED,
) -> list[dict[str, str]]:
    """Generate answers for ``dataset`` in order and return every row (old and new).

    ``row_of(batch, i)`` gives the CSV fields of sample ``i`` of a collated batch except the
    answer; ``columns`` lists them in CSV order and includes ``pred_column``, which receives the
    answer. Rows already in ``csv_path`` are kept when they match the dataset's rows.
    """
    if pred_column not in columns:
        raise ValueError(f"columns {list(columns)} lack the answer column {pred_column!r}")
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    done, header = read_complete_rows(csv_path, columns)
    if len(done) > len(dataset):
        raise ValueError(f"{csv_path}: holds {len(done)} rows but the dataset has {len(dataset)} samples")
    collate = PadCollate(pad_token_id, padding_side="left")
    if done:
        _check_resumed(csv_path, done, dataset, collate, row_of, [c for c in columns if c != pred_column])
    rest = Subset(dataset, range(len(done), len(dataset)))
    loader = DataLoader(
        rest, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate
    )
    rows = list(done)
    with open(csv_path, "a", newline="", encoding="utf-8") as fh:
        # Append in the order of the header already on disk.
        writer = csv.DictWriter(fh, fieldnames=header or list(columns), extrasaction="ignore")
        if not done:
            writer.writeheader()
        bar = tqdm(
            total=len(dataset), initial=len(done), desc=f"generating {csv_path.stem}", disable=not progress
        )
        for batch in loader:
            torch.manual_seed(seed + len(rows))
            answers = generate(batch)
            if len(answers) != len(batch["input_ids"]):
                raise RuntimeError(
                    f"generate returned {len(answers)} answers for a batch of {len(batch['input_ids'])}"
                )
            new = [{**row_of(batch, i), pred_column: answer} for i, answer in enumerate(answers)]
            writer.writerows(new)
            fh.flush()
            os.fsync(fh.fileno())
            rows += new
            bar.update(len(new))
        bar.close()
    return rows


def _check_resumed(
    path: Path,
    done: list[dict[str, str]],
    dataset: Dataset,
    collate: PadCollate,
    row_of: Callable[[Mapping[str, Any], int], dict[str, str]],
    columns: Sequence[str],
) -> None:
    """The first and last resumed rows must be the dataset's (cheap check of order and content)."""
    for index in sorted({0, len(done) - 1}):
        expected = row_of(collate([dataset[index]]), 0)
        found = {c: done[index].get(c, "") for c in columns}
        if found != {c: str(expected.get(c, "")) for c in columns}:
            raise ValueError(
                f"{path}: row {index + 1} does not match sample {index} of the dataset; "
                "it was written for other data: delete it or choose another run folder"
            )
