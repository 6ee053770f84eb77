"""A plain 3D Vision Transformer baseline with the encoder list-of-stages interface.

Unlike the original's ViT (whose MLP width is the constant 4), the MLP width here is
``int(dim * mlp_ratio)``. Stages are the token sequences after selected blocks (``stage_blocks``,
1-based block counts ending at ``depth``; by default after each quarter of the depth), the last one
after the final LayerNorm. So ``stages[-2:]`` are the tokens after block ``3*depth/4`` and the
normalised output, usable as the Mixer's low and high streams. All stages have ``dim`` channels
and the same tokens, in ``(D, H, W)`` raster order of the patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head self-attention (scaled dot product, no mask)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` with MLP width ``dim * mlp_ratio``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """3D ViT: ``(B, in_channels, D, H, W)`` -> ``len(stage_blocks)`` outputs ``(B, patches, dim)``.

    ``input_size`` fixes the grid of the learned position embedding; other sizes (each a multiple
    of ``patch_size``) are accepted and the embedding is interpolated trilinearly.
    """

    def __init__(
        self,
        input_size: Sequence[int] = (128, 256, 256),
        patch_size: Sequence[int] = (16, 16, 16),
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        in_channels: int = 1,
        dropout: float = 0.0,
        stage_blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"ViT3D dim={dim} is not divisible by heads={heads}")
        self.patch_size = tuple(patch_size)
        self.grid = self._grid(tuple(input_size))
        stage_blocks = list(stage_blocks or sorted({max(1, depth * q // 4) for q in (1, 2, 3, 4)}))
        if stage_blocks != sorted(set(stage_blocks)) or stage_blocks[0] < 1 or stage_blocks[-1] != depth:
            raise ValueError(
                f"ViT3D stage_blocks={stage_blocks} must be increasing block counts >= 1 "
                f"ending at depth={depth}"
            )
        self.stage_blocks = stage_blocks
        self.out_channels: list[int] = [dim] * len(stage_blocks)
        self.patch_embed = nn.Conv3d(in_channels, dim, self.patch_size, stride=self.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, dim, *self.grid) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def _grid(self, input_size: tuple[int, ...]) -> tuple[int, int, int]:
        if len(input_size) != 3 or any(n % p for n, p in zip(input_size, self.patch_size)):
            raise ValueError(
                f"ViT3D input size {list(input_size)} must be 3 sizes, each a multiple of patch_size "
                f"{list(self.patch_size)}"
            )
        d, h, w = (n // p for n, p in zip(input_size, self.patch_size))
        return d, h, w

    def shard_units(self) -> list[nn.Module]:
        """The transformer blocks (``models.encoder.VolumeEncoder``)."""
        return list(self.blocks)

    def token_counts(self, input_size: tuple[int, int, int]) -> list[int]:
        """Tokens of each stage output for an input of spatial size ``(D, H, W)``."""
        d, h, w = self._grid(tuple(input_size))
        return [d * h * w] * len(self.stage_blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        grid = self._grid(tuple(x.shape[2:]))
        x = self.patch_embed(x)
        pos = self.pos_embed
        if grid != self.grid:
            pos = F.interpolate(pos, size=grid, mode="trilinear", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)
        outputs = []
        for count, block in enumerate(self.blocks, start=1):
            x = block(x)
            if count in self.stage_blocks:
                outputs.append(self.norm(x) if count == len(self.blocks) else x)
        return outputs
