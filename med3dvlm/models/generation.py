"""Asking a VLM: explicit decoding settings, a whole answer about one volume (``infer``), the answer
as it is decoded (the web page), and batches of prompts with each distinct volume encoded once
(:func:`model_generate_fn`: evaluation and validation by generation)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from med3dvlm.models.vlm import VisionLanguageModel

GenerateFn = Callable[[Mapping[str, Any]], list[str]]


@dataclass(frozen=True)
class GenerationSettings:
    """Explicit decoding: greedy (the benchmark's rule) unless ``do_sample``; sampling is seeded with
    ``seed`` where a caller seeds it (evaluation, per batch)."""

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 42

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments for ``generate``."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs["temperature"] = self.temperature
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


def _inputs(
    model: VisionLanguageModel, volume: np.ndarray | torch.Tensor, prompt: str
) -> dict[str, torch.Tensor]:
    param = next(model.vision_tower.parameters())
    image = torch.as_tensor(np.ascontiguousarray(volume) if isinstance(volume, np.ndarray) else volume)
    image = image.reshape(1, 1, *image.shape[-3:]).to(param.device, param.dtype)
    encoded = model.tokenizer([prompt], return_tensors="pt")
    return {
        "images": image,
        "input_ids": encoded["input_ids"].to(param.device),
        "attention_mask": encoded["attention_mask"].to(param.device),
    }


@torch.no_grad()
def answer(
    model: VisionLanguageModel,
    volume: np.ndarray | torch.Tensor,
    prompt: str,
    settings: GenerationSettings | None = None,
) -> str:
    """The answer to ``prompt`` (image block + question, from :mod:`med3dvlm.data.prompts`) about one
    ``(D, H, W)`` volume of the model's input size."""
    inputs = _inputs(model, volume, prompt)
    out = model.generate(
        inputs["images"],
        inputs["input_ids"],
        inputs["attention_mask"],
        **(settings or GenerationSettings()).kwargs(),
    )
    return model.tokenizer.decode(out[0], skip_special_tokens=True).strip()


def stream_answer(
    model: VisionLanguageModel,
    volume: np.ndarray | torch.Tensor,
    prompt: str,
    settings: GenerationSettings | None = None,
) -> Iterator[str]:
    """:func:`answer` as it is decoded: the answer so far, each time a piece is added (greedy: the
    last one is :func:`answer`'s)."""
    from transformers import TextIteratorStreamer

    inputs = _inputs(model, volume, prompt)
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=False, skip_special_tokens=True)
    failure: list[Exception] = []

    def generate() -> None:
        try:
            with torch.no_grad():
                model.generate(
                    inputs["images"],
                    inputs["input_ids"],
                    inputs["attention_mask"],
                    streamer=streamer,
                    **(settings or GenerationSettings()).kwargs(),
                )
        except Exception as err:  # noqa: BLE001 (re-raised in the caller's thread)
            failure.append(err)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    text, shown = "", False
    for piece in streamer:
        text += piece
        shown = True
        yield text.strip()
    worker.join()
    if failure:
        raise failure[0]
    if not shown:
        yield ""


def distinct_rows(keys: Sequence[Any]) -> tuple[list[int], torch.Tensor]:
    """The first row of every distinct key, and for each row the index of its key among them."""
    first: dict[Any, int] = {}
    for row, key in enumerate(keys):
        first.setdefault(key, row)
    slot = {key: index for index, key in enumerate(first)}
    return list(first.values()), torch.tensor([slot[key] for key in keys], dtype=torch.long)


def model_generate_fn(
    model: VisionLanguageModel, settings: GenerationSettings, zero_images: bool = False
) -> GenerateFn:
    """A batch -> decoded answers function for a VLM (batches must be left-padded).

    Questions about the same volume (M3D-VQA asks five per scan, in consecutive rows) share one
    encoding: each distinct ``image_path`` of a batch goes through the vision tower and projector
    once and its image features are repeated for its questions. ``zero_images`` feeds all-zero
    volumes instead of the batch's: the control that shows how much of a score comes from the image
    rather than from the text alone.
    """
    param = next(model.parameters())
    kwargs = settings.kwargs()

    @torch.no_grad()
    def generate(batch: Mapping[str, Any]) -> list[str]:
        rows, inverse = distinct_rows(batch.get("image_path") or range(len(batch["image"])))
        images = batch["image"][rows].to(param.device, param.dtype)
        if zero_images:
            images = torch.zeros_like(images)
        features = model.project(model.encode_images(images))[inverse.to(param.device)]
        out = model.generate(
            None,
            batch["input_ids"].to(param.device),
            batch["attention_mask"].to(param.device),
            image_features=features,
            **kwargs,
        )
        return [text.strip() for text in model.tokenizer.batch_decode(out, skip_special_tokens=True)]

    return generate
