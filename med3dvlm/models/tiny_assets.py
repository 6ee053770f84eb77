"""Tiny models built locally and offline for the demo and the tests, saved as Hugging Face folders.

Each asset is built deterministically (fixed seed, fixed corpus order) into a staging folder beside
its destination and renamed into place with a completion marker, so a folder is either a complete
build or absent. ``ensure_*`` functions build on first use and reuse the folder afterwards; they
are what the ``text_encoder=tiny`` / ``llm=tiny`` configs call.

* tiny BERT (this module): ``BertModel`` + WordPiece tokenizer built from the synthetic corpus; the
  stand-in for ``medicalai/ClinicalBERT`` in the SigLIP stage.
* tiny Qwen2: ``med3dvlm.models.tiny_qwen`` (the stand-in for Qwen2.5-7B-Instruct).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, BertTokenizerFast

DONE_MARKER = ".asset_complete"
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# General clinical English so that words outside the synthetic reports still split into known pieces.
CLINICAL_TEXT = (
    "Computed tomography of the abdomen and pelvis with and without intravenous contrast. "
    "The liver, spleen, pancreas, adrenal glands and kidneys are unremarkable. No free fluid. "
    "There is a hypodense lesion in the right lobe of the liver. No lymphadenopathy. Impression: "
    "findings are consistent with a simple cyst. Recommend follow-up imaging in six months."
)


def build_asset(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(staging_folder)`` and rename the result onto ``out_dir`` with a completion marker."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        write(staging)
        (staging / DONE_MARKER).write_text("ok\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def is_built(out_dir: str | os.PathLike) -> bool:
    return (Path(out_dir) / DONE_MARKER).is_file()


def wordpiece_vocab(texts: Iterable[str], vocab_size: int) -> dict[str, int]:
    """A deterministic WordPiece vocabulary: special tokens, every character (alone and as a
    ``##`` continuation), then whole words by falling frequency (ties alphabetical).

    The ``tokenizers`` WordPiece trainer breaks frequency ties in hash order, so its ids differ
    between runs; this keeps the build reproducible byte for byte.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    tokens = [*BERT_SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    if len(tokens) > vocab_size:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the {len(tokens)} special and character tokens"
        )
    known = set(tokens)
    words = sorted((w for w in counts if w not in known), key=lambda w: (-counts[w], w))
    tokens += words[: vocab_size - len(tokens)]
    return {token: i for i, token in enumerate(tokens)}


def train_wordpiece(texts: Iterable[str], vocab_size: int, max_length: int) -> BertTokenizerFast:
    """A lower-casing BERT WordPiece tokenizer (``[CLS] text [SEP]``) with a vocabulary from ``texts``."""
    vocab = wordpiece_vocab(texts, vocab_size)
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def build_tiny_bert(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    max_length: int = 256,
    seed: int = 0,
) -> Path:
    """Train the tokenizer on ``texts``, initialise a ``BertModel`` with ``seed``, save both to ``out_dir``."""
    texts = [*texts, CLINICAL_TEXT]
    if not any(t.strip() for t in texts[:-1]):
        raise ValueError(f"{out_dir}: the corpus for the tiny BERT tokenizer is empty")
    tokenizer = train_wordpiece(texts, vocab_size, max_length)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return build_asset(out_dir, write)


def ensure_tiny_bert(out_dir: str | os.PathLike, corpus: Callable[[], Iterable[str]], **sizes: int) -> str:
    """Path of the tiny BERT folder, building it from ``corpus()`` on first use."""
    if not is_built(out_dir):
        build_tiny_bert(out_dir, corpus(), **sizes)
    return str(out_dir)
