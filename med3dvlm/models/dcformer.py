"""DCFormer: the 3D encoder of Med3DVLM, with decomposed depthwise convolutions.

The network reproduces the original implementation (mirthAI/Med3DVLM, ``DecompModel``) exactly, so
its released weights load through :mod:`med3dvlm.models.reference_layout` and give the same
numbers. Two quirks of the original are kept by default because the weights depend on them:

* Internal frame. The input ``(B, 1, D, H, W)`` is permuted to ``(B, 1, H, W, D)`` and every layer
  works there; conv kernels are stored in that frame. Stage outputs are flattened back in
  ``(D, H, W)`` raster order (W fastest), channels last.
* The stem (``stem="reference"``) is linear (no activation) and its first decomposed convolution
  strides 4 along all three axes, although each 1D kernel only spans one axis. Each branch
  therefore reads every 4th plane along its two other axes, and only 15.6% of the input voxels
  (10/64: those with at least two coordinates divisible by 4) reach any output, at 128x256x256
  as at any size that is a multiple of 4.

``stem="full"`` is the corrected stem for ablations: a lossless 4x4x4 space-to-depth rearrangement
(after zero-padding each axis to a multiple of 4) followed by the same decomposed convolutions at
stride 1, so 100% of the input voxels reach the output and the token counts equal the reference
stem's (``ceil(n / 4)`` per axis). It is still linear, so the comparison isolates coverage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from med3dvlm.models.decomposed_ops import branch_sum, depthwise_along, gather_taps, taps_matrix

AXES: tuple[str, ...] = ("along_h", "along_w", "along_d")
"""Branch names of a decomposed convolution, in the internal (H, W, D) frame's axis order."""


@dataclass(frozen=True)
class Variant:
    """Block counts and channels of one of the original's ``decomp_*`` factory functions."""

    num_blocks: tuple[int, int, int, int, int]
    channels: tuple[int, int, int, int, int]


VARIANTS: dict[str, Variant] = {
    "nano": Variant((1, 1, 1, 1, 1), (32, 32, 64, 128, 256)),
    "naive": Variant((1, 2, 2, 2, 2), (32, 64, 128, 256, 512)),
    "tiny": Variant((1, 2, 3, 3, 2), (64, 96, 192, 384, 768)),
    "small": Variant((1, 2, 3, 6, 2), (64, 96, 192, 384, 768)),
    "base": Variant((1, 2, 6, 6, 2), (64, 128, 256, 512, 1024)),
    "large": Variant((1, 2, 6, 12, 2), (64, 256, 512, 1024, 2048)),
}


class ConvNorm(nn.Sequential):
    """A 3D convolution with bias followed by BatchNorm3d."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.conv = conv
        self.norm = nn.BatchNorm3d(conv.out_channels)


class DecompConv3d(nn.Module):
    """Sum of three parallel 1D convolutions (k,1,1), (1,k,1), (1,1,k), each with its own BatchNorm.

    As in the original, each branch is padded only along its own kernel axis but uses ``stride``
    on all three axes, and no activation follows.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        for axis, name in enumerate(AXES):
            kernel = [1, 1, 1]
            kernel[axis] = kernel_size
            padding = [0, 0, 0]
            padding[axis] = kernel_size // 2
            conv = nn.Conv3d(
                in_channels, out_channels, tuple(kernel), stride=stride, padding=tuple(padding), groups=groups
            )
            self.add_module(name, ConvNorm(conv))

    def forward(self, x: Tensor) -> Tensor:
        if self.along_h.norm.training:
            return sum(self._normalised_branches(x))
        kernels, bias = self.folded()
        conv = self.along_h.conv
        return branch_sum(x, kernels, bias, conv.stride[0], conv.groups)

    def _normalised_branches(self, x: Tensor) -> list[Tensor]:
        # Batch statistics: each branch is normalised on its own, as in the original.
        conv = self.along_h.conv
        if conv.groups == conv.in_channels == conv.out_channels and conv.stride == (1, 1, 1):
            return [
                b.norm(depthwise_along(x, b.conv.weight, b.conv.bias, axis))
                for axis, b in enumerate(self.branches())
            ]
        return [b(x) for b in self.branches()]

    def branches(self) -> tuple[ConvNorm, ConvNorm, ConvNorm]:
        """The three branches in axis order (H, W, D of the internal frame)."""
        return self.along_h, self.along_w, self.along_d

    def folded(self) -> tuple[list[Tensor], Tensor]:
        """Each branch's kernel with its BatchNorm's running statistics folded in, and the summed
        bias: with BatchNorm in eval mode the module computes ``sum_b conv_b(x, kernel_b) + bias``."""
        kernels, bias = [], 0
        for b in self.branches():
            norm = b.norm
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            kernels.append(b.conv.weight * scale.view(-1, 1, 1, 1, 1))
            shift = -norm.running_mean if b.conv.bias is None else b.conv.bias - norm.running_mean
            bias = bias + norm.bias + shift * scale
        return kernels, bias

    def plain_batch_norm(self) -> bool:
        """Whether every branch normalises with a plain BatchNorm3d (not SyncBatchNorm), whose
        batch statistics :meth:`taps_affine` may compute itself."""
        return all(type(b.norm) is nn.BatchNorm3d for b in self.branches())

    def taps_affine(self, taps: Tensor) -> tuple[Tensor, Tensor]:
        """This module as an affine map of its :func:`gather_taps` columns, ``y = taps @ M.T + b``,
        without running a convolution. In training each branch's batch mean and variance follow from
        the taps' mean and covariance (the same statistics BatchNorm computes from the branch's
        output, to float rounding) and update the running statistics as BatchNorm does."""
        if not self.along_h.norm.training:
            kernels, bias = self.folded()
            return taps_matrix(kernels), bias
        flat = taps.flatten(0, 3)
        count = flat.shape[0]
        mean = flat.mean(0)
        centred = flat - mean
        covariance = centred.t() @ centred / count
        width = flat.shape[1] // 3
        matrices, bias = [], 0
        for i, b in enumerate(self.branches()):
            part = slice(i * width, (i + 1) * width)
            weight = b.conv.weight.flatten(1)
            branch_mean = weight @ mean[part] + b.conv.bias
            branch_var = ((weight @ covariance[part, part]) * weight).sum(1)
            _update_running_statistics(b.norm, branch_mean, branch_var, count)
            scale = b.norm.weight * torch.rsqrt(branch_var + b.norm.eps)
            matrices.append(weight * scale[:, None])
            bias = bias + b.norm.bias + (b.conv.bias - branch_mean) * scale
        return torch.cat(matrices, dim=1), bias

    def after_channel_map(self, x: Tensor, matrix: Tensor) -> Tensor:
        """This module applied to ``matrix @ x`` over channels (dense convolutions only), computed
        with kernels composed with ``matrix``: cheaper when ``x`` has fewer channels than the map's
        output. Zero padding commutes with the map, so the borders are exact."""
        if self.along_h.norm.training:
            return sum(
                b.norm(
                    F.conv3d(x, _compose(b.conv.weight, matrix), b.conv.bias, b.conv.stride, b.conv.padding)
                )
                for b in self.branches()
            )
        kernels, bias = self.folded()
        return branch_sum(x, [_compose(k, matrix) for k in kernels], bias, self.along_h.conv.stride[0], 1)


def _compose(kernel: Tensor, matrix: Tensor) -> Tensor:
    return torch.einsum("oc...,ct->ot...", kernel, matrix)


@torch.no_grad()
def _update_running_statistics(norm: nn.BatchNorm3d, mean: Tensor, var: Tensor, count: int) -> None:
    # What BatchNorm does in training: the unbiased variance, momentum or (momentum=None) the
    # cumulative average.
    if not norm.track_running_stats:
        return
    norm.num_batches_tracked.add_(1)
    factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    norm.running_mean.lerp_(mean, factor)
    norm.running_var.lerp_(var * count / max(count - 1, 1), factor)


class ReferenceStem(nn.Module):
    """The original's linear stem: decomposed conv (kernel 7, stride 4), then three with kernel 3.

    Its first two convolutions run as one (they are linear, with no activation between): the first
    is an affine map of the few input values each position reads (:meth:`DecompConv3d.taps_affine`),
    so the second reads those taps through composed kernels, a third of the channels, and the
    first's 64-channel output is never built. Same outputs, gradients and running statistics.
    """

    def __init__(self, in_channels: int, channels: int, kernel_sizes: Sequence[int], stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.layers = nn.Sequential(
            *(
                DecompConv3d(in_channels if i == 0 else channels, channels, k, stride if i == 0 else 1)
                for i, k in enumerate(kernel_sizes)
            )
        )

    def _fusable(self) -> bool:
        if len(self.layers) < 2:
            return False
        first, second = self.layers[0], self.layers[1]
        taps = 3 * first.along_h.conv.in_channels * first.along_h.conv.kernel_size[0]
        return (
            first.plain_batch_norm()
            and second.plain_batch_norm()
            and first.along_h.norm.training == second.along_h.norm.training
            and taps + 1 < first.along_h.conv.out_channels
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self._fusable():
            return self.layers(x)
        first, second = self.layers[0], self.layers[1]
        taps = gather_taps(x, first.along_h.conv.kernel_size[0], self.stride)
        matrix, bias = first.taps_affine(taps)
        # A constant channel carries the first layer's bias: zero in the second's padding, exactly
        # where the first's output would be zero-padded.
        extended = torch.cat([taps, taps.new_ones(*taps.shape[:4], 1)], dim=4).permute(0, 4, 1, 2, 3)
        if first.along_h.norm.training:
            extended = extended.contiguous()  # oneDNN's training convolutions are slower channels-last
        x = second.after_channel_map(extended, torch.cat([matrix, bias[:, None]], dim=1))
        return self.layers[2:](x)


class FullStem(nn.Module):
    """Corrected stem: space-to-depth by ``stride`` on every axis, then decomposed convs at stride 1.

    Every input voxel lands in some channel of the rearranged grid, so all of them reach the output.
    """

    def __init__(self, in_channels: int, channels: int, kernel_sizes: Sequence[int], stride: int) -> None:
        super().__init__()
        self.stride = stride
        first = in_channels * stride**3
        self.layers = nn.Sequential(
            *(DecompConv3d(first if i == 0 else channels, channels, k) for i, k in enumerate(kernel_sizes))
        )

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        b, c, h, w, d = x.shape
        x = F.pad(x, (0, -d % s, 0, -w % s, 0, -h % s))
        h, w, d = x.shape[2:]
        x = x.reshape(b, c, h // s, s, w // s, s, d // s, s)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * s**3, h // s, w // s, d // s)
        return self.layers(x)


class ChannelMLP(nn.Module):
    """``Linear(C, 4C) -> GELU (erf) -> Linear(4C, C)`` over the last axis."""

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, expansion * channels)
        self.fc2 = nn.Linear(expansion * channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability ``rate``."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class ConvBlock(nn.Module):
    """``x + scale * MLP(DecompConv(x))`` with a depthwise decomposed conv and a per-channel scale.

    The first block of a stage first downsamples: MaxPool3d(3, 2, 1), then a bias-free 1x1x1 conv.
    There is no normalisation around the MLP, as in the original.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        kernel_size: int,
        downsample: bool,
        drop_path_rate: float = 0.0,
        layer_scale: float = 1e-6,
    ) -> None:
        super().__init__()
        self.downsample = downsample
        if downsample:
            self.pool = nn.MaxPool3d(3, stride=2, padding=1)
            self.proj = nn.Conv3d(in_channels, channels, 1, bias=False)
        self.dwconv = DecompConv3d(channels, channels, kernel_size, groups=channels)
        self.mlp = ChannelMLP(channels)
        self.scale = nn.Parameter(torch.full((channels,), layer_scale))
        self.drop_path_rate = drop_path_rate

    def _pool(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
            # CPU max pooling runs about 10x faster channels-last; its backward does not, so a
            # pass that needs gradients keeps the layout it has.
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return self.pool(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample:
            x = self.proj(self._pool(x)).contiguous()
        y = self.dwconv(x).permute(0, 2, 3, 4, 1)
        y = (self.mlp(y) * self.scale).permute(0, 4, 1, 2, 3)
        return x + drop_path(y, self.drop_path_rate, self.training)


def _out_size(n: int, stride: int) -> int:
    # Size after a kernel-k conv padded k//2 (k odd) or MaxPool3d(3, 2, 1): floor((n - 1) / s) + 1.
    return (n - 1) // stride + 1


class DCFormer(nn.Module):
    """DCFormer encoder: ``(B, in_channels, D, H, W)`` -> five stage outputs ``(B, tokens_i, C_i)``.

    Args:
        variant: one of ``nano naive tiny small base large`` (block counts and channels of the
            original's ``decomp_*``); ``small`` (18,244,800 parameters) is the paper's.
        stem: ``"reference"`` (the original's stem, 15.6% of voxels reach the output) or ``"full"``
            (corrected: every voxel does); see the module docstring.
        in_channels: input channels.
        drop_path: maximum stochastic-depth rate, increased linearly over the blocks of s1..s4.
        num_blocks, channels: override the variant's values (five entries each).
        kernel_sizes: depthwise kernel of stages s1..s4.
        stem_kernel_sizes, stem_stride: the stem's kernels and the first one's stride.
        layer_scale: initial value of every block's per-channel scale.
        compile: run the forward through ``torch.compile`` (one graph per mode and input shape).
        checkpoint_stages: stages (0 = stem .. 4) whose activations are recomputed in the backward
            pass instead of kept (less memory, one more forward of those stages); BatchNorm's
            running statistics are updated once, by the first forward.

    Memory layout is chosen per operation (see :mod:`med3dvlm.models.decomposed_ops`), not by the
    caller: inputs of any layout give the same results. The fast paths read each BatchNorm's mode,
    parameters and statistics rather than always calling it, so forward hooks registered on the
    BatchNorm modules themselves may not run; set their mode with ``train()`` / ``eval()``.
    """

    def __init__(
        self,
        variant: str = "small",
        stem: Literal["reference", "full"] = "reference",
        in_channels: int = 1,
        drop_path: float = 0.0,
        num_blocks: Sequence[int] | None = None,
        channels: Sequence[int] | None = None,
        kernel_sizes: Sequence[int] = (13, 11, 9, 7),
        stem_kernel_sizes: Sequence[int] = (7, 3, 3, 3),
        stem_stride: int = 4,
        layer_scale: float = 1e-6,
        compile: bool = False,
        checkpoint_stages: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"DCFormer variant {variant!r} unknown; choose one of {sorted(VARIANTS)}")
        preset = VARIANTS[variant]
        num_blocks = tuple(num_blocks or preset.num_blocks)
        channels = tuple(channels or preset.channels)
        if len(num_blocks) != 5 or len(channels) != 5 or len(kernel_sizes) != 4:
            raise ValueError(
                f"DCFormer needs 5 num_blocks, 5 channels and 4 kernel_sizes; got {len(num_blocks)}, "
                f"{len(channels)} and {len(kernel_sizes)}"
            )
        if num_blocks[0] != 1:
            raise ValueError(
                f"DCFormer stage s0 is the stem and has exactly 1 block, got num_blocks[0]={num_blocks[0]}"
            )
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"DCFormer drop_path must be in [0, 1), got {drop_path}")
        stems = {"reference": ReferenceStem, "full": FullStem}
        if stem not in stems:
            raise ValueError(f"DCFormer stem {stem!r} unknown; choose one of {sorted(stems)}")
        if not set(checkpoint_stages) <= set(range(5)):
            raise ValueError(f"DCFormer checkpoint_stages must be among 0..4, got {list(checkpoint_stages)}")

        self.out_channels: list[int] = list(channels)
        self.stem_stride = stem_stride
        self.checkpoint_stages = frozenset(checkpoint_stages)
        total = sum(num_blocks[1:])
        rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
        stages: list[nn.Module] = [stems[stem](in_channels, channels[0], stem_kernel_sizes, stem_stride)]
        for i in range(1, 5):
            stages.append(
                nn.Sequential(
                    *(
                        ConvBlock(
                            channels[i - 1],
                            channels[i],
                            kernel_sizes[i - 1],
                            downsample=j == 0,
                            drop_path_rate=rates.pop(0),
                            layer_scale=layer_scale,
                        )
                        for j in range(num_blocks[i])
                    )
                )
            )
        self.stages = nn.ModuleList(stages)
        if compile:
            self.compile(dynamic=False)

    def shard_units(self) -> list[nn.Module]:
        """The five stages (``models.encoder.VolumeEncoder``)."""
        return list(self.stages)

    def token_counts(self, input_size: tuple[int, int, int]) -> list[int]:
        """Tokens of each stage output for an input of spatial size ``(D, H, W)``."""
        sizes = [_out_size(n, self.stem_stride) for n in input_size]
        counts = [sizes[0] * sizes[1] * sizes[2]]
        for _ in range(4):
            sizes = [_out_size(n, 2) for n in sizes]
            counts.append(sizes[0] * sizes[1] * sizes[2])
        return counts

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.ndim != 5:
            raise ValueError(f"DCFormer expects (B, C, D, H, W), got shape {tuple(x.shape)}")
        x = x.permute(0, 1, 3, 4, 2).contiguous()
        outputs = []
        for i, stage in enumerate(self.stages):
            if i in self.checkpoint_stages and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False, context_fn=partial(_recompute_contexts, stage))
            else:
                x = stage(x)
            # (B, C, H, W, D) -> (B, D, H, W, C) -> tokens in (D, H, W) raster order.
            outputs.append(x.permute(0, 4, 2, 3, 1).flatten(1, 3))
        return outputs


def _recompute_contexts(
    stage: nn.Module,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _statistics_kept(stage)


@contextlib.contextmanager
def _statistics_kept(module: nn.Module) -> Iterator[None]:
    """BatchNorm's running statistics stay as they are (the recomputed forward of a checkpointed
    stage must not count its batch twice): momentum 0 leaves them bitwise unchanged."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [
        (m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms
    ]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def input_coverage(stem: nn.Module, input_size: tuple[int, int, int], in_channels: int = 1) -> float:
    """Fraction of input voxels on which the stem output depends (nonzero input gradient).

    ``input_size`` is in the encoder's internal (H, W, D) frame; the stem is linear, so a random
    output gradient has a nonzero input gradient exactly where a voxel reaches the output.
    """
    was_training = stem.training
    stem.eval()
    try:
        x = torch.zeros(1, in_channels, *input_size, requires_grad=True)
        out = stem(x)
        (grad,) = torch.autograd.grad(out, x, torch.randn_like(out))
    finally:
        stem.train(was_training)
    return (grad != 0).float().mean().item()
