"""Asking a VLM about one volume: explicit decoding settings, a whole answer (``infer``) or the
answer as it is decoded (the web page). Batched benchmark generation is
:func:`med3dvlm.evaluation.runner.model_generate_fn`, with the same settings."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from med3dvlm.models.vlm import VisionLanguageModel


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


def _inputs(model: VisionLanguageModel, volume: np.ndarray | torch.Tensor, prompt: str) -> dict[str, torch.Tensor]:
    param = next(model.vision_tower.parameters())
    image = torch.as_tensor(np.ascontiguousarray(volume) if isinstance(volume, np.ndarray) else volume)
    image = image.reshape(1, 1, *image.shape[-3:]).to(param.device, param.dtype)
    encoded = model.tokenizer([prompt], return_tensors="pt")
    return {"images": image, "input_ids": encoded["input_ids"].to(param.device),
            "attention_mask": encoded["attention_mask"].to(param.device)}


@torch.no_grad()
def answer(model: VisionLanguageModel, volume: np.ndarray | torch.Tensor, prompt: str,
           settings: GenerationSettings | None = None) -> str:
    """The answer to ``prompt`` (image block + question, from :mod:`med3dvlm.data.prompts`) about one
    ``(D, H, W)`` volume of the model's input size."""
    inputs = _inputs(model, volume, prompt)
    out = model.generate(inputs["images"], inputs["input_ids"], inputs["attention_mask"],
                         **(settings or GenerationSettings()).kwargs())
    return model.tokenizer.decode(out[0], skip_special_tokens=True).strip()


def stream_answer(model: VisionLanguageModel, volume: np.ndarray | torch.Tensor, prompt: str,
                  settings: GenerationSettings | None = None) -> Iterator[str]:
    """:func:`answer` as it is decoded: the answer so far, each time a piece is added (greedy: the
    last one is :func:`answer`'s)."""
    from transformers import TextIteratorStreamer

    inputs = _inputs(model, volume, prompt)
    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=False, skip_special_tokens=True)
    failure: list[Exception] = []

    def generate() -> None:
        try:
            with torch.no_grad():
                model.generate(inputs["images"], inputs["input_ids"], inputs["attention_mask"], streamer=streamer,
                               **(settings or GenerationSettings()).kwargs())
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
