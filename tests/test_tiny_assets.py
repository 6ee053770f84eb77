"""The tiny BERT text encoder: offline, deterministic, cached, a normal Hugging Face folder."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from med3dvlm.models.tiny_assets import DONE_MARKER, build_tiny_bert, ensure_tiny_bert

CORPUS = [
    "A cyst measuring 12 mm is seen in the upper right part of the liver.",
    "There is an irregular hypodense mass in the lower left part of the spleen, measuring 30 mm.",
    "The kidneys enhance normally in the arterial phase.",
] * 3
SIZES = {
    "vocab_size": 200,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 64,
    "max_length": 64,
}


def _digest(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def test_builds_a_loadable_folder(tmp_path):
    folder = build_tiny_bert(tmp_path / "bert", CORPUS, **SIZES)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    batch = tok(
        ["cyst in the liver", "mass in the spleen measuring 30 mm"], padding=True, return_tensors="pt"
    )
    assert tok.decode(batch["input_ids"][0], skip_special_tokens=True) == "cyst in the liver"
    assert batch["input_ids"][0, 0] == tok.cls_token_id
    assert tok.model_max_length == 64 and model.config.max_position_embeddings == 64
    assert model.config.vocab_size == len(tok) <= 200
    out = model(**batch).last_hidden_state
    assert out.shape[:2] == batch["input_ids"].shape and out.shape[2] == 32
    long = tok(" ".join(CORPUS) * 5, truncation=True)["input_ids"]
    assert len(long) == 64


def test_build_is_deterministic(tmp_path):
    a = build_tiny_bert(tmp_path / "a", CORPUS, **SIZES)
    b = build_tiny_bert(tmp_path / "b", CORPUS, **SIZES)
    assert _digest(a) == _digest(b)
    # the seed decides the weights; the global RNG is left alone
    state = torch.random.get_rng_state()
    c = build_tiny_bert(tmp_path / "c", CORPUS, seed=1, **SIZES)
    assert torch.equal(state, torch.random.get_rng_state())
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]


def test_ensure_builds_once(tmp_path):
    calls = []

    def corpus():
        calls.append(1)
        return CORPUS

    first = ensure_tiny_bert(tmp_path / "bert", corpus, **SIZES)
    second = ensure_tiny_bert(tmp_path / "bert", corpus, **SIZES)
    assert first == second and len(calls) == 1
    assert (tmp_path / "bert" / DONE_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["bert"]


def test_incomplete_folder_is_rebuilt(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text("{")  # a killed earlier build
    ensure_tiny_bert(tmp_path / "bert", lambda: CORPUS, **SIZES)
    assert (tmp_path / "bert" / DONE_MARKER).is_file()
    assert _digest(tmp_path / "bert") == _digest(build_tiny_bert(tmp_path / "again", CORPUS, **SIZES))
    assert AutoModel.from_pretrained(tmp_path / "bert").config.hidden_size == SIZES["hidden_size"]


def test_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="corpus .* is empty"):
        build_tiny_bert(tmp_path / "bert", ["", "  "], **SIZES)
