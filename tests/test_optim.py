"""Optimiser parameter groups: every trainable parameter exactly once, tied weights included."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from med3dvlm.training.optim import param_groups, split_decay


def tiny_qwen2(tied: bool) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    return Qwen2ForCausalLM(config)


def test_tied_embeddings_are_listed_once():
    model = tiny_qwen2(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    decay, no_decay = split_decay(model)
    names = decay + no_decay
    assert len(names) == len(set(names)) == len(dict(model.named_parameters()))
    assert "model.embed_tokens.weight" in decay and "lm_head.weight" not in names
    groups = param_groups(model, weight_decay=0.1)
    params = [p for g in groups for p in g["params"]]
    assert len({id(p) for p in params}) == len(params) == len(list(model.parameters()))
    optimizer = torch.optim.AdamW(groups, lr=1e-3)  # raises on a parameter listed twice
    model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    optimizer.step()


def test_untied_embeddings_keep_both_matrices():
    model = tiny_qwen2(tied=False)
    decay, _ = split_decay(model)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(decay)


def test_prefix_learning_rate_gets_its_own_groups():
    model = tiny_qwen2(tied=False)
    groups = param_groups(model, weight_decay=0.1, lr_by_prefix={"model.layers.": 1e-5})
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    by_id = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        group = by_id[id(param)]
        assert group["lr"] == (1e-5 if name.startswith("model.layers.") else 1e-3), name
        assert group["weight_decay"] == (0.1 if name in split_decay(model)[0] else 0.0), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
