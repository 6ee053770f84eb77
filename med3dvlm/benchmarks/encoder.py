"""Encoder bench: DCFormer-small forward (eval) and forward+backward (train) at (2, 1, 64, 128, 128)
on 2 CPU threads (or the GPU in bf16), the training step's peak memory with and without activation
checkpointing, and the fraction of input voxels that reach the stem output at 128x256x256.

With ``--reference`` the original's ``decomp_small`` runs beside ours on the same ``(B, 1, D, H, W)``
input (each permutes it to its internal frame) with the same weights (converted to our layout):
timings interleaved, outputs compared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from med3dvlm.benchmarks import (
    BenchOptions,
    BenchRow,
    median_seconds,
    paired_seconds,
    saved_for_backward_bytes,
)
from med3dvlm.benchmarks.original import load_original
from med3dvlm.benchmarks.peak_memory import step_peak_mib
from med3dvlm.models.dcformer import DCFormer, input_coverage
from med3dvlm.models.reference_layout import load_reference_state_dict

SHAPE = (2, 1, 64, 128, 128)
COVERAGE_SIZE = (128, 256, 256)
CHECKPOINTED = (0, 1)
"""The stages the checkpointed row recomputes: the stem and stage 1 hold most activations."""


@contextlib.contextmanager
def _threads(device: str) -> Iterator[None]:
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _steps(model: nn.Module, x: torch.Tensor, device: str) -> tuple[Callable[[], None], Callable[[], None]]:
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def forward() -> None:
        model.eval()
        with torch.no_grad(), autocast:
            model(x)

    def forward_backward() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        with autocast:
            outputs = model(x)
        sum(o.float().mean() for o in outputs).backward()

    return forward, forward_backward


def _largest_difference(original: nn.Module, ours: nn.Module, x: torch.Tensor) -> float:
    original.eval(), ours.eval()
    with torch.no_grad():
        pairs = zip(original(x), ours(x), strict=True)
        return max(((a.float() - b.float()).abs().max() / a.float().abs().max()).item() for a, b in pairs)


def _coverage() -> list[BenchRow]:
    rows = []
    for stem in ("reference", "full"):
        torch.manual_seed(0)
        model = DCFormer("small", stem=stem)
        d, h, w = COVERAGE_SIZE  # input_coverage works in the encoder's internal (H, W, D) frame
        rows.append(
            BenchRow(
                "encoder",
                f"input voxels reaching the output, stem={stem}, {COVERAGE_SIZE}",
                100 * input_coverage(model.stages[0], (h, w, d)),
                "%",
                "gradient support of the stem" + (" (the original's stem)" if stem == "reference" else ""),
            )
        )
    return rows


def run(options: BenchOptions, device: str = "cpu") -> list[BenchRow]:
    repeats = 3 if options.quick else 11
    where = "2 threads" if device == "cpu" else "GPU, bf16 autocast"
    with _threads(device):
        torch.manual_seed(0)
        x = torch.rand(SHAPE, device=device)
        ours = DCFormer("small").to(device)
        checkpointed = DCFormer("small", checkpoint_stages=CHECKPOINTED).to(device)
        rows: list[BenchRow] = []
        if options.reference is None:
            for name, step in zip(
                ("forward, eval", "forward+backward, train"), _steps(ours, x, device), strict=True
            ):
                rows.append(
                    BenchRow(
                        "encoder",
                        f"DCFormer-small {name}, {SHAPE}",
                        median_seconds(step, repeats, 2),
                        "s",
                        f"{where}, median",
                    )
                )
            original = None
        else:
            original = load_original(options.reference).decomp_small().to(device)
            load_reference_state_dict(ours, original.state_dict())
            rows.append(
                BenchRow(
                    "encoder",
                    "DCFormer-small outputs vs the original's, same weights, eval",
                    _largest_difference(original, ours, x),
                    "max rel. diff",
                    "all five stage outputs",
                )
            )
            theirs = _steps(original, x, device)
            for name, mine, other in zip(
                ("forward, eval", "forward+backward, train"), _steps(ours, x, device), theirs, strict=True
            ):
                sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
                a, b, ratio = paired_seconds(other, mine, repeats, synchronize=sync)
                rows.append(
                    BenchRow(
                        "encoder",
                        f"DCFormer-small {name}, {SHAPE}",
                        b,
                        "s",
                        f"{where}; interleaved pairs, medians",
                        original=a,
                        ratio=ratio,
                    )
                )
        rows += _memory_rows(ours, checkpointed, original, x, device)
    return rows + _coverage()


def _memory_rows(
    ours: nn.Module, checkpointed: nn.Module, original: nn.Module | None, x: torch.Tensor, device: str
) -> list[BenchRow]:
    def peak(model: nn.Module) -> float | None:
        step = _steps(model, x, device)[1]
        step()  # one-time allocations (kernel caches, thread pools) are not the step's
        return step_peak_mib(step, device)

    def kept(model: nn.Module) -> float:
        return saved_for_backward_bytes(lambda: model.train()(x), model.parameters()) / 2**20

    baseline = None if original is None else peak(original)
    how = "max_memory_allocated" if device == "cuda" else "heap in use after each operation"
    rows = []
    for name, model in (
        ("DCFormer-small training step, peak memory above model and input", ours),
        (f"same, checkpoint_stages={list(CHECKPOINTED)}", checkpointed),
    ):
        value = peak(model)
        if value is not None:
            rows.append(
                BenchRow(
                    "encoder",
                    name,
                    value,
                    "MiB",
                    f"{how}; activations kept for backward {kept(model):.0f} MiB",
                    original=baseline,
                    ratio=None if baseline is None else value / baseline,
                )
            )
    return rows
