"""What a volume encoder declares, so the rest of the framework needs no list of encoder classes.

An encoder takes ``(B, C, D, H, W)`` volumes and returns one token sequence ``(B, T_i, C_i)`` per
stage. It declares ``out_channels`` (``C_i``), ``token_counts(input_size)`` (``T_i`` for a volume of
that size: the projector's sizes derive from both) and ``shard_units()`` (the submodules FSDP shards
one by one and recomputes under activation checkpointing, innermost first: its stages). A new encoder
is one module with such a class, registered as a component (``models.components.register_component``)
so artifacts may rebuild it, and one YAML in ``configs/encoder/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class VolumeEncoder(Protocol):
    """The interface of a volume encoder (see the module docstring)."""

    out_channels: list[int]

    def token_counts(self, input_size: tuple[int, int, int]) -> list[int]: ...

    def shard_units(self) -> Sequence[nn.Module]: ...

    def __call__(self, x: Tensor) -> list[Tensor]: ...


def volume_encoders(module: nn.Module) -> list[nn.Module]:
    """Every volume encoder inside ``module`` (itself included), outermost first."""
    return [m for m in module.modules() if isinstance(m, VolumeEncoder)]
