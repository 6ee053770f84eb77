"""A tiny Qwen2-architecture causal LM with a byte-level BPE tokenizer, built offline.

It stands in for Qwen2.5-7B-Instruct in the demo and the tests: same model class, same special
tokens (``<|endoftext|>`` pads, ``<|im_end|>`` ends a turn), a tokenizer trained on the synthetic
corpus. The build is deterministic (fixed seed, fixed corpus order) and cached: a folder that
already holds a complete build is reused.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from med3dvlm.models.tiny_assets import build_asset, is_built

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN]
# ChatML, as Qwen2.5-Instruct renders a conversation that starts with a system message (what the
# FLARE prompts send): "<|im_start|>{role}\n{content}<|im_end|>\n" per message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

# General English so that words outside the synthetic corpus still tokenise into sensible pieces.
ENGLISH_TEXT = (
    "The quick brown fox jumps over the lazy dog. Please describe the findings of this image. "
    "What is shown in this scan? Answer the question with a short sentence. There is no evidence "
    "of disease. The image shows normal anatomy without any abnormality. Which option is correct? "
    "Choose one answer from the options below. Yes. No. The patient has a mass in the left side. "
    "The right side appears normal. Findings are consistent with the clinical history."
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (Qwen2-style) trained on ``texts``, wrapped as a HF fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, padding_side="right"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen_config(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
) -> Qwen2Config:
    """A Qwen2 config at toy size (untied embeddings, like Qwen2.5-7B)."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        use_cache=True,
    )


def build_tiny_qwen(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    vocab_size: int = 1024,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    seed: int = 0,
) -> Path:
    """Train the tokenizer, initialise the model with ``seed`` and save both as a HF folder.

    The folder appears complete or not at all (built beside it, then renamed).
    """
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer([*texts, ENGLISH_TEXT], vocab_size)
    config = tiny_qwen_config(
        len(tokenizer), hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size
    )
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return build_asset(out_dir, write)


def ensure_tiny_qwen(out_dir: str | os.PathLike, corpus: Callable[[], Iterable[str]], **sizes: int) -> str:
    """Path of the tiny Qwen folder, building it from ``corpus()`` on first use."""
    out_dir = Path(out_dir)
    if not is_built(out_dir):
        build_tiny_qwen(out_dir, corpus(), **sizes)
    return str(out_dir)
