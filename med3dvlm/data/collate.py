"""Batch collation with dynamic padding: each batch is padded only to its own longest sequence."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from med3dvlm.data.prompts import IGNORE_INDEX

SEQUENCE_FIELDS: dict[str, str] = {"input_ids": "pad", "labels": "ignore"}


@dataclass(frozen=True)
class PadCollate:
    """Stacks images to ``(B, 1, D, H, W)`` float32, pads ``input_ids`` with ``pad_token_id`` and
    ``labels`` with -100 to the longest sample, adds ``attention_mask`` (1 = token) and keeps every
    other field as a list. ``padding_side``: "right" for training, "left" for generation."""

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(s["input_ids"]) for s in samples]
        longest = max(lengths)
        batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples]).float()}
        for field, fill in SEQUENCE_FIELDS.items():
            if field in samples[0]:
                value = self.pad_token_id if fill == "pad" else IGNORE_INDEX
                batch[field] = self._pad([s[field] for s in samples], longest, value)
        mask = torch.zeros(len(samples), longest, dtype=torch.long)
        for row, length in enumerate(lengths):
            mask[row, self._span(length, longest)] = 1
        batch["attention_mask"] = mask
        for key in samples[0]:
            if key not in batch:
                batch[key] = [s[key] for s in samples]
        return batch

    def _span(self, length: int, longest: int) -> slice:
        return slice(0, length) if self.padding_side == "right" else slice(longest - length, longest)

    def _pad(self, rows: list[torch.Tensor], longest: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), longest), value, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, self._span(len(row), longest)] = row
        return out
