"""The encoder's fast paths compute what the plain convolutions and BatchNorms compute: each route
of ``branch_sum`` against three ``F.conv3d``, and the whole DCFormer (fused stem, folded eval
BatchNorm, banded depthwise products, checkpointed stages) against a copy that runs every branch
as ``BatchNorm3d(Conv3d(x))`` — outputs, gradients and running statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from med3dvlm.models.dcformer import DCFormer, DecompConv3d, ReferenceStem
from med3dvlm.models.decomposed_ops import banded, branch_sum, padding


def three_convolutions(x, kernels, bias, stride, groups):
    k = kernels[0].shape[2]
    return sum(
        F.conv3d(x, w, None, stride, padding(axis, k), groups=groups) for axis, w in enumerate(kernels)
    ) + (bias.view(1, -1, 1, 1, 1))


@pytest.mark.parametrize(
    ("c_in", "c_out", "k", "stride", "groups", "size"),
    [
        (8, 8, 13, 1, 8, (9, 4, 6)),  # depthwise, kernel longer than two axes: banded products
        (1, 32, 7, 4, 1, (21, 18, 13)),  # few input channels, strided: one product of the taps
        (6, 10, 3, 1, 1, (7, 5, 6)),  # kernel 3: centre taps merged
        (6, 10, 5, 2, 1, (7, 5, 6)),  # anything else: three convolutions
    ],
)
def test_each_route_equals_three_convolutions(c_in, c_out, k, stride, groups, size):
    torch.manual_seed(0)
    x = torch.randn(2, c_in, *size, requires_grad=True)
    kernels = []
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = k
        kernels.append(torch.randn(c_out, c_in // groups, *shape, requires_grad=True))
    bias = torch.randn(c_out, requires_grad=True)
    got, want = (
        branch_sum(x, kernels, bias, stride, groups),
        three_convolutions(x, kernels, bias, stride, groups),
    )
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    inputs = [x, bias, *kernels]
    weight = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad((got * weight).sum(), inputs),
        torch.autograd.grad((want * weight).sum(), inputs),
        strict=True,
    ):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_banded_matrix_is_the_convolution_along_an_axis():
    weight = torch.arange(1.0, 6.0).view(1, 5)  # taps at offsets -2..2
    matrix = banded(weight, 3)[0]
    assert torch.equal(matrix, torch.tensor([[3.0, 4.0, 5.0], [2.0, 3.0, 4.0], [1.0, 2.0, 3.0]]))


def plain_forward(module: DecompConv3d, x):
    return sum(branch(x) for branch in module.branches())


def run_plain(model, x, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(DecompConv3d, "forward", plain_forward)
        patch.setattr(ReferenceStem, "forward", lambda self, x: self.layers(x))
        return model(x)


def randomised(model: DCFormer) -> DCFormer:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-1, 1)
    return model


def assert_same_step(fast, plain, x, monkeypatch, grad_tolerance=1e-4):
    got, want = fast(x), run_plain(plain, x, monkeypatch)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() <= 2e-5 * b.abs().max()
    weights = [torch.rand_like(o) for o in want]
    sum((o * w).sum() for o, w in zip(got, weights, strict=True)).backward()
    sum((o * w).sum() for o, w in zip(want, weights, strict=True)).backward()
    scale = max(p.grad.abs().max() for p in plain.parameters())
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= grad_tolerance * scale, name
    for (name, a), b in zip(fast.named_buffers(), plain.buffers(), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("stem", ["reference", "full"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fast_paths_match_plain_convolutions(stem, mode, monkeypatch):
    torch.manual_seed(0)
    fast = randomised(DCFormer("nano", stem=stem, layer_scale=0.5)).train(mode == "train")
    plain = copy.deepcopy(fast)
    x = torch.rand(2, 1, 20, 36, 28)
    assert_same_step(fast, plain, x, monkeypatch)


def test_fused_stem_counts_a_cumulative_average_like_batchnorm(monkeypatch):
    torch.manual_seed(0)
    fast = randomised(DCFormer("nano", layer_scale=0.5)).train()
    for module in fast.modules():
        if isinstance(module, nn.BatchNorm3d):
            module.momentum = None
    plain = copy.deepcopy(fast)
    for _ in range(2):
        assert_same_step(fast, plain, torch.rand(2, 1, 16, 32, 32), monkeypatch)
    assert int(fast.stages[0].layers[0].along_h.norm.num_batches_tracked) == 2


def test_sync_batchnorm_is_left_to_its_own_forward():
    stem = ReferenceStem(1, 32, (7, 3, 3, 3), 4)
    assert stem._fusable()
    assert not nn.SyncBatchNorm.convert_sync_batchnorm(stem)._fusable()


def test_checkpointed_stages_give_the_same_step_and_count_each_batch_once(monkeypatch):
    torch.manual_seed(0)
    fast = randomised(DCFormer("nano", layer_scale=0.5, checkpoint_stages=(0, 1, 2, 3, 4))).train()
    plain = copy.deepcopy(fast)
    plain.checkpoint_stages = frozenset()
    assert_same_step(fast, plain, torch.rand(2, 1, 16, 32, 32), monkeypatch)
    assert int(fast.stages[2][0].dwconv.along_w.norm.num_batches_tracked) == 1


def test_checkpointing_keeps_less_for_backward():
    def kept_bytes(model):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.rand(2, 1, 16, 64, 64))
        return sum(sizes)

    torch.manual_seed(0)
    assert kept_bytes(DCFormer("nano", checkpoint_stages=(0, 1))) < 0.5 * kept_bytes(DCFormer("nano"))


def test_bad_checkpoint_stages_are_named():
    with pytest.raises(ValueError, match="checkpoint_stages"):
        DCFormer("nano", checkpoint_stages=(5,))


def test_an_old_export_recording_channels_last_still_loads():
    from med3dvlm.models.components import build_component

    node = {"_target_": "med3dvlm.models.dcformer.DCFormer", "variant": "nano", "channels_last": True}
    with pytest.warns(UserWarning, match="channels_last is no longer a setting"):
        assert isinstance(build_component(node, "export.json", "encoder"), DCFormer)
