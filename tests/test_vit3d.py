"""ViT3D: stage interface, sizes, MLP width, position-embedding interpolation, errors."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from med3dvlm.configs import CONFIG_DIR
from med3dvlm.models.projectors import MixerProjector, encoder_sizes
from med3dvlm.models.vit3d import ViT3D


def _tiny(**kwargs) -> ViT3D:
    torch.manual_seed(0)
    arguments = {"input_size": (16, 32, 32), "patch_size": (8, 8, 8), "dim": 32, "depth": 4, "heads": 4}
    return ViT3D(**{**arguments, **kwargs})


def test_stages_shapes_and_token_counts():
    model = _tiny().eval()
    assert model.stage_blocks == [1, 2, 3, 4]
    with torch.no_grad():
        outputs = model(torch.rand(2, 1, 16, 32, 32))
    assert model.token_counts((16, 32, 32)) == [32] * 4
    assert [o.shape for o in outputs] == [(2, 32, 32)] * 4
    assert model.out_channels == [32] * 4


def test_mlp_width_is_dim_times_ratio():
    model = _tiny(mlp_ratio=2.5)
    assert model.blocks[0].mlp[0].out_features == 80
    assert model.blocks[0].mlp[-1].in_features == 80


def test_non_cubic_patches_and_interpolated_position_embedding():
    model = _tiny(patch_size=(4, 8, 16), stage_blocks=(2, 4)).eval()
    size = (12, 40, 48)
    with torch.no_grad():
        outputs = model(torch.rand(1, 1, *size))
    assert model.token_counts(size) == [3 * 5 * 3] * 2
    assert [o.shape for o in outputs] == [(1, 45, 32)] * 2


def test_stage_selection_and_last_stage_is_normalised():
    model = _tiny(stage_blocks=(2, 4)).eval()
    x = torch.rand(1, 1, 16, 32, 32)
    with torch.no_grad():
        mid, last = model(x)
    # The final LayerNorm (fresh: weight 1, bias 0) leaves every token with zero mean.
    assert last.mean(-1).abs().max() < 1e-5
    assert mid.mean(-1).abs().max() > 1e-3


def test_vit_feeds_the_mixer():
    model = _tiny().eval()
    mixer = MixerProjector(
        **encoder_sizes(model, (16, 32, 32)), llm_dim=16, low_tokens=(24, 8), high_tokens=(16, 8)
    )
    with torch.no_grad():
        assert mixer(model(torch.rand(2, 1, 16, 32, 32))).shape == (2, 16, 16)


def test_errors_name_the_sizes():
    with pytest.raises(
        ValueError, match=r"input size \[16, 30, 32\] must be 3 sizes, each a multiple of patch_size"
    ):
        _tiny().token_counts((16, 30, 32))
    with pytest.raises(ValueError, match="dim=30 is not divisible by heads=4"):
        _tiny(dim=30)
    with pytest.raises(
        ValueError, match=r"stage_blocks=\[2, 3\] must be increasing block counts >= 1 ending at depth=4"
    ):
        _tiny(stage_blocks=(2, 3))


def test_config_builds_the_paper_vit():
    with torch.device("meta"):
        model = instantiate(OmegaConf.load(CONFIG_DIR / "encoder" / "vit3d.yaml"))
    assert model.stage_blocks == [3, 6, 9, 12]
    assert model.token_counts((128, 256, 256)) == [2048] * 4
    assert model.blocks[0].mlp[0].out_features == 3072
