"""LoRA on the VLM's language model through ``peft``; merge for export."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel

from med3dvlm.models.vlm import VisionLanguageModel


@contextmanager
def _peft_notices_silenced() -> Iterator[None]:
    """Without two notices peft gives on every use here: that it saves the embedding matrix of an LLM
    whose vocabulary grew (by ``<im_patch>``: saving it is right), and its reading of a transformers
    property that transformers deprecated (for peft to change)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Setting `save_embedding_layers` to `True`", category=UserWarning
        )
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def add_lora(model: VisionLanguageModel, config: LoraConfig) -> None:
    """Wrap ``model.llm`` with fresh LoRA adapters (base weights frozen by peft).

    ``target_modules="all-linear"`` adapts every linear layer of the LLM except the output head,
    as the paper; the vision tower and projector are outside the LLM and never adapted.
    """
    if isinstance(model.llm, PeftModel):
        raise TypeError("the language model already carries LoRA adapters")
    with _peft_notices_silenced():
        model.llm = get_peft_model(model.llm, config)


def save_lora(model: VisionLanguageModel, adapter_dir: str | os.PathLike) -> None:
    """Write ``model.llm``'s adapter (peft's folder: its config and weights) to ``adapter_dir``."""
    with _peft_notices_silenced():
        model.llm.save_pretrained(adapter_dir)


def load_lora(model: VisionLanguageModel, adapter_dir: str | os.PathLike, trainable: bool = False) -> None:
    """Attach the adapter saved in ``adapter_dir`` to ``model.llm``, strictly: peft only warns about
    keys that do not fit, so the saved and expected key sets and shapes are compared here."""
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: LoRA adapter weights not found")
    base: PreTrainedModel = model.llm
    with _peft_notices_silenced():
        model.llm = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
        expected = {k: v.shape for k, v in get_peft_model_state_dict(model.llm).items()}
    saved = {k: v.shape for k, v in load_file(str(weights)).items()}
    if saved != expected:
        missing = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
        raise ValueError(
            f"{weights}: adapter does not fit the language model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}, wrong shape {[(k, tuple(saved[k]), tuple(expected[k])) for k in reshaped[:3]]}"
        )


def merge_lora(model: VisionLanguageModel) -> None:
    """Fold the LoRA weights into the base layers; ``model.llm`` becomes a plain HF model again."""
    if not isinstance(model.llm, PeftModel):
        raise TypeError("the language model carries no LoRA adapters to merge")
    model.llm = model.llm.merge_and_unload()
