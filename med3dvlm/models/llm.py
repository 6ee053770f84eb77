"""Where the VLM's causal LM comes from: a Hugging Face name or folder, loaded with its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


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
