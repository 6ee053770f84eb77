"""DCFormer: sizes, parameter counts and key layout of every variant, stems, memory formats."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from med3dvlm.configs import CONFIG_DIR
from med3dvlm.models.dcformer import VARIANTS, DCFormer, input_coverage
from med3dvlm.models.reference_layout import (
    DCFORMER_PREFIXES,
    DCFORMER_RULES,
    ReferenceLayoutError,
    convert_state_dict,
)


@pytest.fixture(scope="module")
def reference_keys(reference_dir):
    return json.loads((reference_dir / "keys.json").read_text())


def _meta_state_dict(entries: list, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + key: torch.empty(shape, device="meta") for key, shape in entries}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count_and_layout_equal_the_original(variant, reference_keys):
    original = reference_keys["dcformer"][variant]
    with torch.device("meta"):
        model = DCFormer(variant)
    assert sum(p.numel() for p in model.parameters()) == original["num_parameters"]
    assert sum(b.numel() for b in model.buffers()) == original["num_buffer_elements"]
    assert len(model.state_dict()) == original["num_state_dict_entries"]
    # Every original key maps to one of ours with the same shape, and every key of ours is covered.
    converted = convert_state_dict(_meta_state_dict(original["state_dict"]), model, DCFORMER_RULES)
    assert set(converted) == set(model.state_dict())


@pytest.mark.parametrize("prefix", DCFORMER_PREFIXES)
def test_converter_takes_released_prefixes(prefix, reference_keys):
    with torch.device("meta"):
        model = DCFormer("small")
    entries = reference_keys["dcformer"]["small"]["state_dict"]
    assert len(convert_state_dict(_meta_state_dict(entries, prefix), model, DCFORMER_RULES, prefix)) == 426
    if prefix:
        with pytest.raises(ReferenceLayoutError, match="is not part of the original DCFormer layout"):
            convert_state_dict(_meta_state_dict(entries, prefix), model, DCFORMER_RULES, "")
        with pytest.raises(ReferenceLayoutError, match="does not start with the expected prefix"):
            convert_state_dict(_meta_state_dict(entries), model, DCFORMER_RULES, prefix)


def test_converter_names_the_first_offending_key(reference_keys):
    with torch.device("meta"):
        model = DCFormer("small")
    entries = reference_keys["dcformer"]["small"]["state_dict"]
    tiny = reference_keys["dcformer"]["tiny"]["state_dict"]
    with pytest.raises(
        ReferenceLayoutError,
        match=r"'encoder\.s0\.0\.0\.c1\.0\.weight': shape \[64, 1, 7, 1, 2\].* has \[64, 1, 7, 1, 1\]",
    ):
        convert_state_dict(
            _meta_state_dict([["encoder.s0.0.0.c1.0.weight", [64, 1, 7, 1, 2]]] + entries[1:]),
            model,
            DCFORMER_RULES,
        )
    with pytest.raises(ReferenceLayoutError, match=r"no entry for DCFormer key 'stages\.3\.3\.scale'"):
        convert_state_dict(_meta_state_dict(tiny), model, DCFORMER_RULES)
    with pytest.raises(ReferenceLayoutError, match=r"'encoder\.s9\.0\.scale' is not part of the original"):
        convert_state_dict(_meta_state_dict(entries + [["encoder.s9.0.scale", [4]]]), model, DCFORMER_RULES)


@pytest.mark.parametrize("size", [(32, 64, 64), (20, 36, 52), (17, 9, 33), (4, 4, 4)])
def test_output_shapes_match_token_counts(size):
    torch.manual_seed(0)
    model = DCFormer("nano").eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 1, *size))
    assert [o.shape for o in outputs] == [
        (2, t, c) for t, c in zip(model.token_counts(size), model.out_channels, strict=True)
    ]


def test_paper_token_counts():
    assert DCFormer("small").token_counts((128, 256, 256)) == [131072, 16384, 2048, 256, 32]


def test_tokens_are_in_d_h_w_raster_order():
    # A single bright voxel at (d, h, w) must light up the stem token d*H'*W' + h*W' + w.
    torch.manual_seed(0)
    model = DCFormer("nano").eval()
    x = torch.zeros(1, 1, 16, 24, 32)
    with torch.no_grad():
        base = model(x)[0]
        x[0, 0, 8, 4, 12] = 1.0
        changed = (model(x)[0] - base).abs().sum(-1)[0]
    d_out, h_out, w_out = 4, 6, 8
    assert changed.argmax().item() == 2 * h_out * w_out + 1 * w_out + 3
    assert changed.numel() == d_out * h_out * w_out


def test_reference_stem_reaches_ten_sixty_fourths_of_the_voxels():
    torch.manual_seed(0)
    stem = DCFormer("nano").stages[0]
    assert input_coverage(stem, (16, 24, 32)) == pytest.approx(10 / 64)


@pytest.mark.parametrize("size", [(16, 24, 32), (9, 14, 11)])
def test_full_stem_reaches_every_voxel(size):
    torch.manual_seed(0)
    model = DCFormer("nano", stem="full")
    assert input_coverage(model.stages[0], size) == 1.0
    reference = DCFormer("nano")
    assert model.token_counts(size) == reference.token_counts(size)
    with torch.no_grad():
        outputs = model.eval()(torch.rand(1, 1, *size))
    assert [o.shape[1] for o in outputs] == model.token_counts(size)


def test_bf16_autocast_runs_close_to_float32():
    torch.manual_seed(0)
    model = DCFormer("nano").eval()
    x = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    for a, b in zip(reference, low, strict=True):
        error = (a - b.float()).abs().max()
        assert 0 < error <= 3e-2 * a.abs().max()


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = DCFormer("nano", layer_scale=0.5).train()
    sum(o.mean() for o in model(torch.rand(2, 1, 16, 32, 32))).backward()
    assert all(p.grad is not None for p in model.parameters())
    # A convolution bias right before a training-mode BatchNorm is subtracted out with the batch
    # mean: its gradient is zero in exact arithmetic (rounding noise at most). Every other one moves.
    moving = {n: p for n, p in model.named_parameters() if not n.endswith("conv.bias")}
    assert len(moving) == 0.8 * len(list(model.parameters()))  # 24 of the 120 are such biases
    assert all(p.grad.abs().sum() > 0 for p in moving.values())


def test_drop_path_acts_in_training_only():
    torch.manual_seed(0)
    model = DCFormer("nano", drop_path=0.5, layer_scale=0.5)
    x = torch.rand(4, 1, 16, 16, 16)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x)[-1], model(x)[-1])
        model.train()
        torch.manual_seed(1)
        first = model(x)[-1]
        torch.manual_seed(2)
        assert not torch.equal(first, model(x)[-1])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="variant 'huge' unknown"):
        DCFormer("huge")
    with pytest.raises(ValueError, match="stem 'patch' unknown"):
        DCFormer("nano", stem="patch")
    with pytest.raises(ValueError, match=r"drop_path must be in \[0, 1\)"):
        DCFormer("nano", drop_path=1.0)
    with pytest.raises(ValueError, match=r"expects \(B, C, D, H, W\), got shape \(1, 16, 16, 16\)"):
        DCFormer("nano")(torch.rand(1, 16, 16, 16))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoder_configs_build_their_variant(variant):
    config = OmegaConf.load(CONFIG_DIR / "encoder" / f"dcformer_{variant}.yaml")
    with torch.device("meta"):
        model = instantiate(config)
    assert isinstance(model, DCFormer)
    assert model.out_channels == list(VARIANTS[variant].channels)


@pytest.mark.slow
def test_compiled_encoder_matches_eager():
    torch.manual_seed(0)
    eager = DCFormer("nano").eval()
    compiled = DCFormer("nano", compile=True).eval()
    compiled.load_state_dict(eager.state_dict())
    x = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        for a, b in zip(eager(x), compiled(x), strict=True):
            assert (a - b).abs().max() <= 1e-5 * a.abs().max()
