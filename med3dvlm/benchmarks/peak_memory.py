"""Peak memory of a step (forward + backward): the most memory its tensors hold at once above what
was allocated before it.

On a GPU that is ``torch.cuda.max_memory_allocated``. On CPU there is no allocator counter, so the
step runs under a dispatch mode that reads glibc's count of bytes in use (``mallinfo2``) after
every operation, forward and backward: the peak seen between operations (a temporary freed inside
one operation is missed; everything a step keeps or passes on is seen).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_in_use() -> Callable[[], int] | None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd  # heap chunks in use + mmapped chunks

    return in_use


class _PeakAfterEachOp(TorchDispatchMode):
    def __init__(self, in_use: Callable[[], int]) -> None:
        super().__init__()
        self.in_use = in_use
        self.peak = in_use()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def step_peak_mib(step: Callable[[], object], device: str = "cpu") -> float | None:
    """MiB ``step()`` needs at its peak beyond what was allocated before it; ``None`` where this
    platform offers no count (CPU without glibc's ``mallinfo2``)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    in_use = _heap_in_use()
    if in_use is None:
        return None
    before = in_use()
    with _PeakAfterEachOp(in_use) as mode:
        step()
    return (mode.peak - before) / 2**20
