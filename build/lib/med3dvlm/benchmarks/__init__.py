"""Benchmark sections for ``python -m med3dvlm.bench``.

Each section module exposes ``run(quick: bool) -> list[BenchRow]``; ``SECTIONS`` lists them in
print order. A section measures on the machine at hand and states the original
implementation's figure beside ours where one is known.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRow:
    """One line of the benchmark table."""

    section: str
    name: str
    value: float
    unit: str
    original: str = ""
    note: str = ""


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


SECTIONS: tuple[str, ...] = ("loader", "encoder", "projector", "loss", "vlm", "generation")
