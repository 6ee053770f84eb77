"""Text and image towers, and the loss / text-encoder configs that build them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoModel, BertConfig, BertModel, DistilBertConfig, DistilBertModel

from med3dvlm.losses import ClipLoss, SigLIPLoss
from med3dvlm.models.towers import ImageTower, TextTower

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB = 50
POSITIONS = 16


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=POSITIONS,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def distilbert_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_distilbert")
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=48, max_position_embeddings=POSITIONS
    )
    DistilBertModel(config).save_pretrained(folder)
    return folder


def token_batch(batch: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("which, width", [("bert_dir", 24), ("distilbert_dir", 32)])
def test_text_tower_first_token_pooling(request, which, width):
    folder = request.getfixturevalue(which)
    tower = TextTower(str(folder), embed_dim=10).eval()
    assert (tower.hidden_size, tower.max_length, tower.tokenizer_path) == (width, POSITIONS, str(folder))
    input_ids, attention_mask = token_batch()
    with torch.no_grad():
        out = tower(input_ids, attention_mask)
        hidden = AutoModel.from_pretrained(folder).eval()(input_ids, attention_mask=attention_mask)
        expected = F.normalize(tower.mm_language_proj(hidden.last_hidden_state[:, 0]), dim=-1)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out, expected)


def test_text_tower_mean_pooling_ignores_padding(bert_dir):
    tower = TextTower(str(bert_dir), embed_dim=8, pooling="mean").eval()
    input_ids, attention_mask = token_batch()
    padded_ids = torch.cat([input_ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([attention_mask, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(tower(padded_ids, padded_mask), tower(input_ids, attention_mask))
        first = TextTower(str(bert_dir), embed_dim=8).eval()
        first.load_state_dict(tower.state_dict())
        assert not torch.allclose(first(input_ids, attention_mask), tower(input_ids, attention_mask))


def test_text_tower_keys_gradients_and_errors(bert_dir):
    tower = TextTower(str(bert_dir), embed_dim=6)
    prefixes = {key.split(".")[0] for key in tower.state_dict()}
    assert prefixes == {"language_encoder", "mm_language_proj"}
    input_ids, attention_mask = token_batch()
    tower(input_ids, attention_mask).sum().backward()
    # Every parameter trains (BERT's unused pooler is dropped): DDP rejects parameters without gradient.
    assert [name for name, p in tower.named_parameters() if p.grad is None] == []
    assert tower.language_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=f"17 tokens exceed the {POSITIONS} positions"):
        tower(torch.ones(1, 17, dtype=torch.long), torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="pooling='last'"):
        TextTower(str(bert_dir), embed_dim=6, pooling="last")


class FakeEncoder(nn.Module):
    """Two 'stages': per-voxel linear maps of the input, flattened to tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.out_channels = [3, 5]
        self.first = nn.Linear(1, 3)
        self.last = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        tokens = x.flatten(2).transpose(1, 2)
        first = self.first(tokens)
        return [first, self.last(first)]


def test_image_tower_pools_the_last_stage():
    torch.manual_seed(0)
    tower = ImageTower(FakeEncoder(), embed_dim=4)
    image = torch.rand(2, 1, 3, 4, 5)
    out = tower(image)
    last = tower.encoder(image)[-1]
    assert last.shape == (2, 60, 5)
    expected = F.normalize(tower.mm_vision_proj(last.mean(dim=1)), dim=-1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    assert {key.split(".")[0] for key in tower.state_dict()} == {"encoder", "mm_vision_proj"}


def test_image_tower_needs_out_channels():
    with pytest.raises(ValueError, match="Linear has no out_channels"):
        ImageTower(nn.Linear(2, 2), embed_dim=4)


def test_image_tower_on_dcformer_nano():
    from med3dvlm.models.dcformer import DCFormer

    torch.manual_seed(0)
    tower = ImageTower(DCFormer(variant="nano"), embed_dim=16)
    out = tower(torch.rand(2, 1, 16, 32, 32))
    assert out.shape == (2, 16)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
    out[:, 0].sum().backward()
    assert all(p.grad is not None for p in tower.encoder.stages[-1].parameters() if p.requires_grad)


def test_loss_configs_build_the_documented_defaults():
    siglip = instantiate(OmegaConf.load(CONFIGS / "loss" / "siglip.yaml"))
    assert isinstance(siglip, SigLIPLoss)
    assert siglip.log_scale.item() == pytest.approx(math.log(10.0))
    assert siglip.bias.item() == pytest.approx(-10.0)
    assert (siglip.distributed, siglip.chunk_size) == ("gather", None)
    clip = instantiate(OmegaConf.load(CONFIGS / "loss" / "clip.yaml"))
    assert isinstance(clip, ClipLoss)
    assert clip.log_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert clip.max_log_scale == pytest.approx(math.log(100.0))


def test_text_encoder_configs(bert_dir):
    clinical = OmegaConf.load(CONFIGS / "text_encoder" / "clinicalbert.yaml")
    assert clinical.model_name_or_path == "medicalai/ClinicalBERT"
    assert clinical.pooling == "first" and clinical.trust_remote_code is False
    clinical.model_name_or_path = str(bert_dir)
    root = OmegaConf.create({"text_encoder": clinical, "stage": {"embed_dim": 12}})
    tower = instantiate(root.text_encoder)
    assert isinstance(tower, TextTower) and tower.embed_dim == 12
    tiny = OmegaConf.load(CONFIGS / "text_encoder" / "tiny.yaml")
    assert tiny.model_name_or_path["_target_"] == "med3dvlm.models.tiny_assets.ensure_tiny_bert"
    assert tiny._target_ == clinical._target_
