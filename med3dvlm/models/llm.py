"""Where the VLM's causal LM comes from: a Hugging Face name or folder, loaded with its tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging


@dataclass(frozen=True)
class LanguageModel:
    """A causal LM checkpoint (any ``AutoModelForCausalLM``) and how to load it.

    Args:
        name_or_path: Hub id (e.g. ``Qwen/Qwen2.5-7B-Instruct``) or local folder.
        dtype: weight dtype (``float32``, ``bfloat16``, ...).
        attn_implementation: ``sdpa``, ``eager``, ``flash_attention_2``; ``None`` = library default.
        trust_remote_code: off by default (house rule); turn on only for checkpoints you trust.
    """

    name_or_path: str
    dtype: str = "float32"
    attn_implementation: str | None = None
    trust_remote_code: bool = False

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.name_or_path, trust_remote_code=self.trust_remote_code)

    def load_model(self) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(
            self.name_or_path,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
        )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return folder / name
    pickled = [name for name in PICKLE_WEIGHTS if (folder / name).is_file()]
    why = f" ({pickled[0]} is a pickle and is not loaded)" if pickled else ""
    raise FileNotFoundError(f"{folder / 'model.safetensors'}: the LLM's weights are missing{why}")


def load_llm_folder(
    folder: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The LLM and tokenizer of a saved folder, strictly: config, tokenizer files and safetensors
    weights present, every weight in the file and none unexpected (Hugging Face would initialise a
    missing one at random and only log it), shapes as the config says."""
    folder = Path(folder)
    for name in ("config.json", *TOKENIZER_FILES):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; the model folder is incomplete")
    weights = _weights_file(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the problems are raised below, naming the file
    try:
        llm, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = [
        *(f"missing {k!r}" for k in sorted(info["missing_keys"])),
        *(f"unexpected {k!r}" for k in sorted(info["unexpected_keys"])),
        *(f"wrong shape {k!r}" for k in sorted(str(m) for m in info["mismatched_keys"])),
        *info["error_msgs"],
    ]
    if problems:
        raise ValueError(
            f"{weights}: does not fit the LLM its config.json describes: {'; '.join(problems[:5])}"
        )
    rows = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ValueError(
            f"{folder / 'tokenizer.json'}: {len(tokenizer)} tokens but the LLM's embedding matrix "
            f"has {rows} rows; the tokenizer belongs to another model"
        )
    return llm, tokenizer
