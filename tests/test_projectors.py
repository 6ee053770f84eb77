"""Projectors: the Mixer's sizes and semantics, size errors, ablation projectors, configs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from med3dvlm.configs import CONFIG_DIR
from med3dvlm.models.dcformer import DCFormer
from med3dvlm.models.projectors import LinearProjector, MixerProjector, MLPProjector, encoder_sizes
from med3dvlm.models.reference_layout import MIXER_PREFIXES, MIXER_RULES, convert_state_dict

PAPER = {"encoder_channels": [64, 96, 192, 384, 768], "encoder_tokens": [131072, 16384, 2048, 256, 32]}


def test_paper_mixer_size_and_layout(reference_dir):
    original = json.loads((reference_dir / "keys.json").read_text())["mixer_default"]
    with torch.device("meta"):
        mixer = MixerProjector(**PAPER, llm_dim=3584)
    assert mixer.num_tokens == 256
    assert sum(p.numel() for p in mixer.parameters()) == original["num_parameters"] == 47_221_248
    for prefix in MIXER_PREFIXES:
        entries = {prefix + k: torch.empty(s, device="meta") for k, s in original["state_dict"]}
        assert set(convert_state_dict(entries, mixer, MIXER_RULES, prefix)) == set(mixer.state_dict())


def test_mixer_output_is_low_then_high_stream():
    torch.manual_seed(0)
    mixer = MixerProjector(
        [8, 16, 32], [999, 40, 6], llm_dim=24, low_tokens=(10, 7), high_tokens=(5, 3)
    ).eval()
    stages = [torch.randn(2, 999, 8), torch.randn(2, 40, 16), torch.randn(2, 6, 32)]
    with torch.no_grad():
        out = mixer(stages)
        assert out.shape == (2, mixer.num_tokens, 24) == (2, 10, 24)
        assert torch.equal(out[:, :7], mixer.low(stages[1]))
        assert torch.equal(out[:, 7:], mixer.high(stages[2]))
    widths = [layer.channel_mlp.linears[-1].out_features for layer in mixer.low]
    assert widths == [12, 24]


def test_mixer_layer_matches_its_definition():
    torch.manual_seed(0)
    mixer = MixerProjector(
        [6, 10], [9, 4], llm_dim=8, low_tokens=(5,), high_tokens=(3,), depth=1, mlp_depth=3
    )
    layer = mixer.low[0]
    x = torch.randn(2, 9, 6)
    expected = _layer_norm(x, layer.token_norm).transpose(1, 2)
    linears = layer.token_mlp.linears
    expected = linears[2](F.gelu(linears[1](F.gelu(linears[0](expected)))))
    expected = _layer_norm(expected.transpose(1, 2), layer.channel_norm)
    c = layer.channel_mlp.linears
    expected = c[2](F.gelu(c[1](F.gelu(c[0](expected)))))
    torch.testing.assert_close(layer(x), expected)


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"low_tokens": (192, 128, 64)},
            r"depth=2 needs one low_tokens entry per Mixer layer, got \[192, 128, 64\]",
        ),
        ({"high_tokens": (64,)}, r"depth=2 needs one high_tokens entry per Mixer layer"),
        ({"llm_dim": 3583}, r"llm_dim=3583 is not divisible by 2\*\*\(depth-1\)=2"),
        (
            {"depth": 3, "low_tokens": (1, 2, 3), "high_tokens": (1, 2, 3), "llm_dim": 6},
            r"llm_dim=6 is not divisible by 2\*\*\(depth-1\)=4",
        ),
        ({"encoder_tokens": [256, 32]}, r"encoder_channels has 5 stages but encoder_tokens has 2"),
        ({"encoder_channels": [768], "encoder_tokens": [32]}, r"needs at least 2 encoder stage\(s\), got 1"),
        ({"mlp_depth": 0}, r"depth and mlp_depth must be >= 1"),
        ({"low_tokens": (0, 128)}, r"low_tokens must be positive"),
    ],
)
def test_mixer_size_errors_name_the_sizes(kwargs, message):
    arguments = {**PAPER, "llm_dim": 3584, **kwargs}
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        MixerProjector(**arguments)


def test_mixer_rejects_inputs_of_another_encoder():
    mixer = MixerProjector([16, 32], [8, 2], llm_dim=8, low_tokens=(4, 4), high_tokens=(2, 2))
    with pytest.raises(
        ValueError, match=r"low \(stages\[-2\]\) stage: expected \(B, 8, 16\).*got \(1, 9, 16\)"
    ):
        mixer([torch.randn(1, 9, 16), torch.randn(1, 2, 32)])


@pytest.mark.parametrize("stage", [-1, -2, 0])
def test_single_stage_projectors(stage):
    torch.manual_seed(0)
    channels, tokens = [8, 16, 32], [50, 12, 3]
    stages = [torch.randn(2, t, c) for t, c in zip(tokens, channels, strict=True)]
    linear = LinearProjector(channels, tokens, llm_dim=20, stage=stage)
    mlp = MLPProjector(channels, tokens, llm_dim=20, stage=stage, depth=3, hidden_dim=7)
    for projector in (linear, mlp):
        assert projector(stages).shape == (2, tokens[stage], 20)
        assert projector.num_tokens == tokens[stage]
    assert [lin.out_features for lin in mlp.linears] == [7, 7, 20]
    torch.testing.assert_close(linear(stages), linear.proj(stages[stage]))


def test_single_stage_projector_errors():
    with pytest.raises(ValueError, match="stage=3 is out of range for 3 encoder stages"):
        LinearProjector([8, 16, 32], [50, 12, 3], llm_dim=20, stage=3)
    with pytest.raises(ValueError, match="MLPProjector depth must be >= 1, got 0"):
        MLPProjector([8], [5], llm_dim=20, depth=0)
    with pytest.raises(ValueError, match=r"stages\[-1\] stage: expected \(B, 3, 32\)"):
        LinearProjector([8, 16, 32], [50, 12, 3], llm_dim=20)([torch.randn(1, 3, 16)])


@pytest.mark.parametrize("name", ["mixer", "linear", "mlp"])
def test_projector_configs_build_from_derived_sizes(name):
    torch.manual_seed(0)
    encoder = DCFormer("nano").eval()
    input_size = (32, 64, 48)
    config = OmegaConf.load(CONFIG_DIR / "projector" / f"{name}.yaml")
    overrides = {"low_tokens": [8, 6], "high_tokens": [4, 6]} if name == "mixer" else {}
    projector = instantiate(config, **encoder_sizes(encoder, input_size), llm_dim=32, **overrides)
    with torch.no_grad():
        out = projector(encoder(torch.rand(2, 1, *input_size)))
    assert out.shape == (2, projector.num_tokens, 32)
