"""Projectors from encoder stage outputs to the LLM's embedding width.

Every projector takes the encoder's list of stage outputs ``[(B, T_i, C_i), ...]`` and returns
``(B, num_tokens, llm_dim)``. Constructors take the sizes derived from the configured encoder
(``encoder.out_channels``, ``encoder.token_counts(input_size)``) and LLM width, so impossible
combinations fail at construction and name the sizes that disagree. In Hydra configs those sizes
are ``???`` and the model builder supplies them:
``instantiate(cfg.projector, **encoder_sizes(encoder, input_size), llm_dim=llm_width)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def encoder_sizes(encoder: nn.Module, input_size: Sequence[int]) -> dict[str, list[int]]:
    """``encoder_channels`` and ``encoder_tokens`` of ``encoder`` for volumes of size ``(D, H, W)``."""
    return {
        "encoder_channels": list(encoder.out_channels),
        "encoder_tokens": list(encoder.token_counts(tuple(input_size))),
    }


def _check_stages(encoder_channels: Sequence[int], encoder_tokens: Sequence[int], needed: int) -> None:
    if len(encoder_channels) != len(encoder_tokens):
        raise ValueError(
            f"encoder_channels has {len(encoder_channels)} stages "
            f"but encoder_tokens has {len(encoder_tokens)}"
        )
    if len(encoder_channels) < needed:
        raise ValueError(f"projector needs at least {needed} encoder stage(s), got {len(encoder_channels)}")


def _check_input(name: str, x: Tensor, tokens: int, channels: int) -> None:
    if x.ndim != 3 or x.shape[1] != tokens or x.shape[2] != channels:
        raise ValueError(
            f"{name} stage: expected (B, {tokens}, {channels}) as configured, got {tuple(x.shape)}"
        )


class MLP(nn.Module):
    """``Linear(in, out)``, then ``depth - 1`` times ``[GELU, Linear(out, out)]``; no final activation."""

    def __init__(self, in_features: int, out_features: int, depth: int) -> None:
        super().__init__()
        self.linears = nn.ModuleList(
            [nn.Linear(in_features, out_features)]
            + [nn.Linear(out_features, out_features) for _ in range(depth - 1)]
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.linears[0](x)
        for linear in self.linears[1:]:
            x = linear(F.gelu(x))
        return x


class MixerLayer(nn.Module):
    """LN -> token MLP (T -> T') -> LN -> channel MLP (C -> C'); no residual, as in the original."""

    def __init__(
        self, tokens_in: int, tokens_out: int, channels_in: int, channels_out: int, mlp_depth: int
    ) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(channels_in)
        self.token_mlp = MLP(tokens_in, tokens_out, mlp_depth)
        self.channel_norm = nn.LayerNorm(channels_in)
        self.channel_mlp = MLP(channels_in, channels_out, mlp_depth)

    def forward(self, x: Tensor) -> Tensor:
        x = self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return self.channel_mlp(self.channel_norm(x))


class MixerProjector(nn.Module):
    """Dual-stream MLP-Mixer (the original's ``MixerLowHighHybridMLP``).

    The low stream takes ``stages[-2]``, the high stream ``stages[-1]``; each runs ``depth`` Mixer
    layers. Layer ``i`` maps tokens to ``{low,high}_tokens[i]`` and channels to
    ``llm_dim / 2**(depth - 1 - i)``. The output is the low tokens followed by the high tokens,
    ``(B, low_tokens[-1] + high_tokens[-1], llm_dim)``. With DCFormer-small at 128x256x256 and
    Qwen2.5-7B (3584) the defaults give the paper's 256 image tokens and 47,221,248 parameters.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_tokens: Sequence[int],
        llm_dim: int,
        low_tokens: Sequence[int] = (192, 128),
        high_tokens: Sequence[int] = (64, 128),
        depth: int = 2,
        mlp_depth: int = 2,
    ) -> None:
        super().__init__()
        _check_stages(encoder_channels, encoder_tokens, needed=2)
        if depth < 1 or mlp_depth < 1:
            raise ValueError(f"MixerProjector depth and mlp_depth must be >= 1, got {depth} and {mlp_depth}")
        for name, tokens in (("low_tokens", low_tokens), ("high_tokens", high_tokens)):
            if len(tokens) != depth:
                raise ValueError(
                    f"MixerProjector depth={depth} needs one {name} entry per Mixer layer, got {list(tokens)}"
                )
            if min(tokens) < 1:
                raise ValueError(f"MixerProjector {name} must be positive, got {list(tokens)}")
        if llm_dim % 2 ** (depth - 1):
            raise ValueError(
                f"MixerProjector llm_dim={llm_dim} is not divisible by 2**(depth-1)={2 ** (depth - 1)} "
                f"(depth={depth}); layer i has llm_dim / 2**(depth-1-i) channels"
            )
        self.llm_dim = llm_dim
        self.low_size = (encoder_tokens[-2], encoder_channels[-2])
        self.high_size = (encoder_tokens[-1], encoder_channels[-1])
        self.low = self._stream(self.low_size, low_tokens, llm_dim, depth, mlp_depth)
        self.high = self._stream(self.high_size, high_tokens, llm_dim, depth, mlp_depth)
        self._num_tokens = low_tokens[-1] + high_tokens[-1]

    @staticmethod
    def _stream(
        size: tuple[int, int], out_tokens: Sequence[int], llm_dim: int, depth: int, mlp_depth: int
    ) -> nn.Sequential:
        tokens, channels = size
        layers = []
        for i, tokens_out in enumerate(out_tokens):
            channels_out = llm_dim // 2 ** (depth - 1 - i)
            layers.append(MixerLayer(tokens, tokens_out, channels, channels_out, mlp_depth))
            tokens, channels = tokens_out, channels_out
        return nn.Sequential(*layers)

    @property
    def num_tokens(self) -> int:
        """Image tokens produced per sample."""
        return self._num_tokens

    def forward(self, stages: Sequence[Tensor]) -> Tensor:
        low, high = stages[-2], stages[-1]
        _check_input("low (stages[-2])", low, *self.low_size)
        _check_input("high (stages[-1])", high, *self.high_size)
        return torch.cat([self.low(low), self.high(high)], dim=1)


class _SingleStageProjector(nn.Module):
    """Base of the ablation projectors: they read one encoder stage, ``stages[stage]``."""

    def __init__(self, encoder_channels: Sequence[int], encoder_tokens: Sequence[int], stage: int) -> None:
        super().__init__()
        _check_stages(encoder_channels, encoder_tokens, needed=1)
        if not -len(encoder_channels) <= stage < len(encoder_channels):
            raise ValueError(
                f"projector stage={stage} is out of range for {len(encoder_channels)} encoder stages"
            )
        self.stage = stage
        self.in_size = (encoder_tokens[stage], encoder_channels[stage])

    @property
    def num_tokens(self) -> int:
        """Image tokens produced per sample (the selected stage's tokens)."""
        return self.in_size[0]

    def _select(self, stages: Sequence[Tensor]) -> Tensor:
        x = stages[self.stage]
        _check_input(f"stages[{self.stage}]", x, *self.in_size)
        return x


class LinearProjector(_SingleStageProjector):
    """One ``Linear(C, llm_dim)`` applied to every token of ``stages[stage]``."""

    def __init__(
        self, encoder_channels: Sequence[int], encoder_tokens: Sequence[int], llm_dim: int, stage: int = -1
    ) -> None:
        super().__init__(encoder_channels, encoder_tokens, stage)
        self.proj = nn.Linear(self.in_size[1], llm_dim)

    def forward(self, stages: Sequence[Tensor]) -> Tensor:
        return self.proj(self._select(stages))


class MLPProjector(_SingleStageProjector):
    """LLaVA-style ``Linear(C, hidden) -> [GELU, Linear]...`` on every token of ``stages[stage]``.

    ``depth`` Linear layers; the hidden width defaults to ``llm_dim``.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        encoder_tokens: Sequence[int],
        llm_dim: int,
        stage: int = -1,
        depth: int = 2,
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__(encoder_channels, encoder_tokens, stage)
        if depth < 1:
            raise ValueError(f"MLPProjector depth must be >= 1, got {depth}")
        hidden = hidden_dim or llm_dim
        widths = [self.in_size[1]] + [hidden] * (depth - 1) + [llm_dim]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, stages: Sequence[Tensor]) -> Tensor:
        x = self.linears[0](self._select(stages))
        for linear in self.linears[1:]:
            x = linear(F.gelu(x))
        return x
