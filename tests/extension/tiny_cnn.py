"""A new volume encoder in one file (with ``configs/encoder/tiny_cnn.yaml``): what README "Add an
encoder" describes, used by the test that trains it under ``trainer=fsdp``."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from med3dvlm.models.components import register_component


@register_component
class TinyCNN(nn.Module):
    """Strided 3D convolutions, one stage per channel count; each stage's output is a token sequence."""

    def __init__(self, channels: Sequence[int] = (8, 16, 32), in_channels: int = 1) -> None:
        super().__init__()
        self.out_channels = list(channels)
        widths = [in_channels, *channels]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv3d(a, b, 3, stride=2, padding=1), nn.GELU())
            for a, b in itertools.pairwise(widths)
        )

    def token_counts(self, input_size: tuple[int, int, int]) -> list[int]:
        counts, sizes = [], list(input_size)
        for _ in self.stages:
            sizes = [(n + 1) // 2 for n in sizes]
            counts.append(sizes[0] * sizes[1] * sizes[2])
        return counts

    def shard_units(self) -> list[nn.Module]:
        return list(self.stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        marker = os.environ.get("TINY_CNN_SHARD_MARKER")
        if marker and torch.distributed.is_initialized():  # which of its units FSDP wrapped, per rank
            rank = torch.distributed.get_rank()
            with open(f"{marker}.{rank}", "w") as handle:
                json.dump([isinstance(stage, FSDPModule) for stage in [*self.stages, self]], handle)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x.flatten(2).transpose(1, 2))
        return outputs
