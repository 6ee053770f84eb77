"""Benchmark sections for ``python -m med3dvlm.bench``.

Each section module exposes ``run(options: BenchOptions) -> list[BenchRow]``; ``SECTIONS`` lists
those a plain run measures, in print order, ``ON_REQUEST`` those run only when named. A section
measures on the machine at hand. A figure for the original implementation appears only when it was
measured here, side by side with ours (``--reference``): interleaved in one process, same shapes and
inputs, with the median of the per-pair ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from med3dvlm.utils.markdown import markdown_table


@dataclass(frozen=True)
class BenchOptions:
    """What every section is run with: fewer repeats (``quick``), the original's checkout."""

    quick: bool = False
    reference: Path | None = None


@dataclass(frozen=True)
class BenchRow:
    """One line of the benchmark table; ``original`` and ``ratio`` (ours / original, the median of
    interleaved pairs) only where the original ran beside ours."""

    section: str
    name: str
    value: float
    unit: str
    note: str = ""
    original: float | None = None
    ratio: float | None = None


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


def paired_seconds(
    original: Callable[[], object],
    ours: Callable[[], object],
    repeats: int,
    warmup: int = 2,
    synchronize: Callable[[], None] = lambda: None,
) -> tuple[float, float, float]:
    """Interleaved timing: each repeat runs the original, then ours. Returns both medians and the
    median of the per-pair ratios ours / original (machine noise hits both sides of a pair)."""
    for _ in range(warmup):
        original()
        ours()
    pairs = []
    for _ in range(repeats):
        seconds = []
        for fn in (original, ours):
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            seconds.append(time.perf_counter() - start)
        pairs.append(seconds)
    return (
        statistics.median(a for a, _ in pairs),
        statistics.median(b for _, b in pairs),
        statistics.median(b / a for a, b in pairs),
    )


def saved_for_backward_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd keeps between ``forward()`` and its backward pass, each storage
    counted once (several nodes may save the same tensor), leaving out ``exclude`` (parameters,
    which exist anyway)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(seen.values())


SECTIONS: tuple[str, ...] = ("loader", "encoder", "projector", "loss", "vlm", "generation")
"""The sections a plain ``bench`` runs, in print order."""
ON_REQUEST: tuple[str, ...] = ("import", "ctrate")
"""Sections run only when named (``--only import`` writes ~46 GB to the temporary folder; ``ctrate``
renders a CT-RATE-sized volume first)."""


def section_module(section: str) -> str:
    """The module of ``section`` (``import`` is a Python keyword: its module is ``release_import``)."""
    return f"med3dvlm.benchmarks.{'release_import' if section == 'import' else section}"


def bench_table(rows: list[BenchRow]) -> str:
    """Markdown table of benchmark rows; the original's columns only where some row has them."""
    side_by_side = any(r.original is not None for r in rows)
    header = [
        "section",
        "measurement",
        "ours",
        "unit",
        *(["original", "ours / original"] if side_by_side else []),
        "note",
    ]
    cells = []
    for r in rows:
        row = [r.section, r.name, f"{r.value:.3g}", r.unit]
        if side_by_side:
            row += [
                "" if r.original is None else f"{r.original:.3g}",
                "" if r.ratio is None else f"{r.ratio:.2f}",
            ]
        cells.append([*row, r.note])
    return markdown_table(header, cells, right=[2, 4, 5] if side_by_side else [2])
