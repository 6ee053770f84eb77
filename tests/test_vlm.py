"""The VLM module on its own: image-token splice, padding, generation, tiny Qwen build."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from med3dvlm.models.tiny_qwen import build_tiny_qwen
from med3dvlm.models.vlm import VisionLanguageModel

CORPUS = [
    f"The scan shows a {size} {shape} in the {side} {part}. Which side? A. left B. right C. both D. none"
    for size in ("small", "large")
    for shape in ("sphere", "cube", "mass")
    for side in ("left", "right")
    for part in ("lung", "liver", "kidney")
]
N_IMG = 6


class ToyEncoder(nn.Module):
    """Two-stage toy vision tower with BatchNorm, returning token sequences like DCFormer."""

    def __init__(self) -> None:
        super().__init__()
        self.s0 = nn.Sequential(nn.Conv3d(1, 8, 2, 2), nn.BatchNorm3d(8))
        self.s1 = nn.Conv3d(8, 16, 2, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = self.s0(x)
        b = self.s1(a)
        return [a.flatten(2).transpose(1, 2), b.flatten(2).transpose(1, 2)]


class ToyProjector(nn.Module):
    """Last stage's tokens -> N_IMG tokens of the LLM width."""

    num_tokens = N_IMG

    def __init__(self, tokens_in: int, llm_dim: int) -> None:
        super().__init__()
        self.tokens = nn.Linear(tokens_in, N_IMG)
        self.channels = nn.Linear(16, llm_dim)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return self.channels(self.tokens(xs[-1].transpose(1, 2)).transpose(1, 2))


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    return build_tiny_qwen(
        tmp_path_factory.mktemp("assets") / "tiny_qwen", CORPUS, vocab_size=400, hidden_size=64
    )


def make_vlm(path, reference_placement: bool = False) -> VisionLanguageModel:
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = VisionLanguageModel(
        ToyEncoder(),
        ToyProjector(8, llm.config.hidden_size),
        llm,
        tokenizer,
        reference_placement=reference_placement,
    )
    return model.eval()


@pytest.fixture(scope="module")
def vlm(tiny_qwen_dir) -> VisionLanguageModel:
    return make_vlm(tiny_qwen_dir)


QUESTIONS = ["Which side?", "The scan shows a large mass in the right kidney. Which side?"]


def batch(model: VisionLanguageModel, texts: list[str], side: str) -> dict[str, torch.Tensor]:
    model.tokenizer.padding_side = side
    return model.tokenizer([model.image_prompt() + t for t in texts], return_tensors="pt", padding=True)


def test_image_token_added_with_mean_rows(vlm):
    emb = vlm.llm.get_input_embeddings().weight
    assert vlm.image_token_id == len(vlm.tokenizer) - 1 == emb.shape[0] - 1
    torch.testing.assert_close(emb[-1], emb[:-1].mean(0))
    out = vlm.llm.get_output_embeddings().weight
    torch.testing.assert_close(out[-1], out[:-1].mean(0))
    torch.testing.assert_close(vlm.image_token_embedding.detach(), emb[-1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_splice_lands_on_image_tokens(vlm, side):
    enc = batch(vlm, QUESTIONS, side)
    ids = enc["input_ids"]
    features = torch.randn(2, N_IMG, vlm.hidden_size)
    embeds = vlm.embed(ids, features)
    plain = vlm.llm.get_input_embeddings()(ids)
    for b in range(2):
        pos = (ids[b] == vlm.image_token_id).nonzero().flatten()
        assert len(pos) == N_IMG
        torch.testing.assert_close(embeds[b, pos], features[b])
        others = torch.ones(ids.shape[1], dtype=torch.bool)
        others[pos] = False
        torch.testing.assert_close(embeds[b, others], plain[b, others])
    # padding really is on the requested side for the shorter sample
    pad_at = 0 if side == "left" else -1
    assert enc["attention_mask"][0, pad_at] == 0


def test_padding_side_does_not_change_logits(vlm):
    images = torch.rand(2, 1, 8, 8, 8)
    single = batch(vlm, QUESTIONS[:1], "right")
    with torch.no_grad():
        alone = vlm(single["input_ids"], single["attention_mask"], images=images[:1]).logits[0]
        n = alone.shape[0]
        for side in ("left", "right"):
            enc = batch(vlm, QUESTIONS, side)
            logits = vlm(enc["input_ids"], enc["attention_mask"], images=images).logits[0]
            real = enc["attention_mask"][0].bool()
            assert int(real.sum()) == n
            torch.testing.assert_close(logits[real], alone, atol=1e-5, rtol=1e-4)


def test_wrong_image_token_count_is_a_clear_error(vlm):
    ids = vlm.tokenizer([vlm.image_token * (N_IMG - 1) + "Which side?"], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match=f"sample 0 has {N_IMG - 1} <im_patch> tokens.*produces {N_IMG}"):
        vlm.embed(ids, torch.zeros(1, N_IMG, vlm.hidden_size))


@pytest.mark.parametrize("side", ["left", "right"])
def test_reference_placement_reproduces_original(tiny_qwen_dir, side):
    model = make_vlm(tiny_qwen_dir, reference_placement=True)
    enc = batch(model, QUESTIONS, side)
    ids = enc["input_ids"]
    features = torch.randn(2, N_IMG, model.hidden_size)
    embeds = model.embed(ids, features, enc["attention_mask"])
    plain = model.llm.get_input_embeddings()(ids)
    for b in range(2):
        p = int((ids[b] == model.image_token_id).nonzero()[0])
        # the original: keep position 0's raw <im_patch>, features at 1..N, drop tokens 1..N
        expected = torch.cat([plain[b, : p + 1], features[b], plain[b, p + 1 + N_IMG :]])
        torch.testing.assert_close(embeds[b], expected)
        assert ids[b, p + N_IMG] != model.image_token_id  # a text token was overwritten


def test_reference_placement_writes_positions_1_to_n_wherever_the_image_block_is(tiny_qwen_dir):
    """FLARE's VQA prompts carry the image block inside the user turn: the original still writes the
    features over positions 1..N, over the text before the block, and the block's last tokens keep
    the raw <im_patch> embedding."""
    model = make_vlm(tiny_qwen_dir, reference_placement=True)
    text = model.tokenizer(["Is it"], add_special_tokens=False)["input_ids"][0]
    row = torch.tensor([[*text, *[model.image_token_id] * N_IMG, *text]])
    features = torch.randn(1, N_IMG, model.hidden_size)
    for pad in (0, 2):  # left padding moves the first real token
        ids = torch.cat([torch.full((1, pad), model.tokenizer.pad_token_id), row], dim=1)
        mask = (torch.arange(ids.shape[1]) >= pad).long()[None]
        embeds = model.embed(ids, features, mask)[0, pad:]
        plain = model.llm.get_input_embeddings()(row)[0]
        raw = model.image_token_embedding.to(plain.dtype)
        expected_block = [raw] * (len(text) - 1)  # the block's last len(text) - 1 tokens stay raw rows
        expected = torch.cat([plain[:1], features[0], torch.stack(expected_block), plain[-len(text) :]])
        torch.testing.assert_close(embeds, expected)


def test_reference_placement_trains_the_row_default_does_not(tiny_qwen_dir):
    enc = batch(make_vlm(tiny_qwen_dir), QUESTIONS, "right")
    images = torch.rand(2, 1, 8, 8, 8)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    for reference, expect_grad in ((False, False), (True, True)):
        model = make_vlm(tiny_qwen_dir, reference_placement=reference)
        model(enc["input_ids"], enc["attention_mask"], images=images, labels=labels).loss.backward()
        grad = model.image_token_embedding.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) == expect_grad


def test_batched_generation_equals_one_by_one(vlm):
    images = torch.rand(2, 1, 8, 8, 8)
    enc = batch(vlm, QUESTIONS, "left")
    batched = vlm.generate(images, enc["input_ids"], enc["attention_mask"], max_new_tokens=8, do_sample=False)
    for b in range(2):
        one = batch(vlm, QUESTIONS[b : b + 1], "left")
        single = vlm.generate(
            images[b : b + 1], one["input_ids"], one["attention_mask"], max_new_tokens=8, do_sample=False
        )
        n = single.shape[1]
        assert torch.equal(batched[b, :n], single[0])


def test_generate_from_precomputed_image_features(vlm):
    images = torch.rand(2, 1, 8, 8, 8)
    enc = batch(vlm, QUESTIONS, "left")
    from_images = vlm.generate(
        images, enc["input_ids"], enc["attention_mask"], max_new_tokens=8, do_sample=False
    )
    with torch.no_grad():
        features = vlm.project(vlm.encode_images(images))
    from_features = vlm.generate(
        None,
        enc["input_ids"],
        enc["attention_mask"],
        image_features=features,
        max_new_tokens=8,
        do_sample=False,
    )
    assert torch.equal(from_images, from_features)
    for both_or_neither in ({"images": images, "image_features": features}, {"images": None}):
        with pytest.raises(ValueError, match="exactly one"):
            vlm.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=2,
                **both_or_neither,
            )


def test_generate_rejects_right_padding(vlm):
    enc = batch(vlm, QUESTIONS, "right")
    with pytest.raises(ValueError, match="left-padded"):
        vlm.generate(torch.rand(2, 1, 8, 8, 8), enc["input_ids"], enc["attention_mask"], max_new_tokens=2)


def test_frozen_vision_tower_stays_in_eval_mode(tiny_qwen_dir):
    model = make_vlm(tiny_qwen_dir)
    model.freeze_vision_tower()
    model.train()
    assert not model.vision_tower.training and model.projector.training and model.llm.training
    bn = model.vision_tower.s0[1]
    before = bn.running_mean.clone()
    enc = batch(model, QUESTIONS, "right")
    model(enc["input_ids"], enc["attention_mask"], images=torch.rand(2, 1, 8, 8, 8))
    assert torch.equal(bn.running_mean, before)
    assert not any(p.requires_grad for p in model.vision_tower.parameters())


def test_tiny_qwen_build_is_deterministic(tiny_qwen_dir, tmp_path):
    again = build_tiny_qwen(tmp_path / "again", CORPUS, vocab_size=400, hidden_size=64)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        digest = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (tiny_qwen_dir, again)]
        assert digest[0] == digest[1], name
    tok = AutoTokenizer.from_pretrained(again)
    assert tok.decode(tok("The scan shows a small cube.")["input_ids"]) == "The scan shows a small cube."
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
