"""``python -m med3dvlm.parity`` on the original's test vectors, and on damaged copies of them."""

from __future__ import annotations

import pytest
import torch

from med3dvlm.artifacts.released import split_state
from med3dvlm.models.dcformer import DCFormer
from med3dvlm.models.projectors import MixerProjector
from med3dvlm.models.reference_layout import ReferenceLayoutError, load_reference_state_dict
from med3dvlm.parity import compare_file, main

FILES = ("dcformer_nano.pt", "mixer_small.pt")


@pytest.fixture(scope="module")
def vectors(reference_dir):
    return {name: torch.load(reference_dir / name, weights_only=True) for name in FILES}


@pytest.mark.parametrize("name", FILES)
def test_reference_files_pass(name, reference_dir, capsys):
    assert main([str(reference_dir / name)]) == 0
    table = capsys.readouterr().out
    assert "NO" not in table
    expected_rows = 10 if name.startswith("dcformer") else 1
    assert table.count(" yes") == expected_rows


def test_dcformer_compares_every_output_and_stage(reference_dir):
    rows = compare_file(reference_dir / "dcformer_nano.pt")
    assert [r.name for r in rows] == [f"hidden_states[{i}]" for i in range(5)] + [
        f"stage_io.s{i}" for i in range(5)
    ]
    assert all(r.relative <= 1e-5 and r.max_ref > 0 for r in rows)


@pytest.mark.parametrize("name", FILES)
def test_a_difference_at_float32_noise_passes_the_default_tolerance_and_fails_a_tighter_one(
    name, vectors, tmp_path, capsys
):
    # The Mixer can match the original to the bit on some CPUs: plant a float32-noise-sized difference.
    data = dict(vectors[name])
    key = "hidden_states" if name.startswith("dcformer") else "output"
    nudge = lambda t: t + 1e-7 * t.abs().max()
    data[key] = [nudge(t) for t in data[key]] if isinstance(data[key], list) else nudge(data[key])
    torch.save(data, tmp_path / name)
    assert main([str(tmp_path / name)]) == 0
    assert main([str(tmp_path / name), "--tolerance", "1e-12"]) == 1
    assert "NO" in capsys.readouterr().out


def test_perturbed_weights_fail(vectors, tmp_path):
    data = dict(vectors["dcformer_nano.pt"])
    state = dict(data["state_dict"])
    # c3 convolves along D: a swap with c2 (W) would be an axis mix-up the stage tests must catch.
    state["encoder.s3.0.dwconv.c3.0.weight"] = state["encoder.s3.0.dwconv.c3.0.weight"].flip(-1)
    data["state_dict"] = state
    torch.save(data, tmp_path / "flipped.pt")
    rows = {r.name: r for r in compare_file(tmp_path / "flipped.pt")}
    assert rows["stage_io.s3"].relative > 1e-3
    assert main([str(tmp_path / "flipped.pt")]) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn])
def test_low_precision_weights_are_cast(dtype, vectors, tmp_path):
    data = dict(vectors["mixer_small.pt"])
    data["state_dict"] = {k: v.to(dtype) for k, v in data["state_dict"].items()}
    rounded = MixerProjector([128, 256], [32, 4], 256, (24, 16), (8, 16)).eval()
    load_reference_state_dict(rounded, {k: v.float() for k, v in data["state_dict"].items()})
    with torch.no_grad():
        data["output"] = rounded([data["low"], data["high"]])
    torch.save(data, tmp_path / "low.pt")
    assert main([str(tmp_path / "low.pt")]) == 0


def test_missing_and_misshaped_keys_are_named(vectors, tmp_path, capsys):
    data = dict(vectors["dcformer_nano.pt"])
    state = dict(data["state_dict"])
    del state["encoder.s2.0.mlp.mlp.3.bias"]
    torch.save({**data, "state_dict": state}, tmp_path / "missing.pt")
    assert main([str(tmp_path / "missing.pt")]) == 2
    assert "no entry for DCFormer key 'stages.2.0.mlp.fc2.bias'" in capsys.readouterr().err

    state = dict(data["state_dict"])
    state["encoder.s1.0.scale"] = torch.ones(33)
    torch.save({**data, "state_dict": state}, tmp_path / "shape.pt")
    assert main([str(tmp_path / "shape.pt")]) == 2
    assert "'encoder.s1.0.scale': shape [33]" in capsys.readouterr().err


def test_unusable_files_exit_2(vectors, tmp_path, capsys):
    torch.save({"kind": "siglip", "config": {}, "state_dict": {}}, tmp_path / "kind.pt")
    assert main([str(tmp_path / "kind.pt")]) == 2
    assert "kind 'siglip' unknown" in capsys.readouterr().err
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    assert main([str(tmp_path / "broken.pt")]) == 2
    assert "broken.pt: cannot be read as a torch file" in capsys.readouterr().err
    data = {k: v for k, v in vectors["mixer_small.pt"].items() if k != "high"}
    torch.save(data, tmp_path / "nohigh.pt")
    assert main([str(tmp_path / "nohigh.pt")]) == 2
    assert "missing entries ['high']" in capsys.readouterr().err


def test_prefixed_checkpoints_load_through_the_importers_split(vectors):
    nano = vectors["dcformer_nano.pt"]["state_dict"]
    mixer = vectors["mixer_small.pt"]["state_dict"]
    vlm = {f"model.vision_tower.vision_tower.{k}": v for k, v in nano.items()}
    vlm |= {f"model.mm_projector.{k}": v for k, v in mixer.items()}
    vlm["lm_head.weight"] = torch.zeros(3, 2)
    groups, _, _ = split_state(
        vlm,
        {"vision": "model.vision_tower.vision_tower.", "projector": "model.mm_projector.", "llm": "lm_head."},
        (),
        "VLM",
    )
    encoder = DCFormer("nano")
    load_reference_state_dict(encoder, groups["vision"], prefix="model.vision_tower.vision_tower.")
    assert torch.equal(encoder.stages[4][0].scale, nano["encoder.s4.0.scale"])
    projector = MixerProjector([128, 256], [32, 4], 256, (24, 16), (8, 16))
    load_reference_state_dict(projector, groups["projector"], prefix="model.mm_projector.")
    assert torch.equal(
        projector.high[1].channel_mlp.linears[1].weight, mixer["high_mixer.1.mlp2.mm_projector.1.1.weight"]
    )
    with pytest.raises(ReferenceLayoutError, match="no key starting with 'vision_encoder.'"):
        split_state(vlm, {"vision": "vision_encoder.", "rest": ("model.", "lm_head.")}, (), "VLM")
