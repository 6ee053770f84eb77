"""Encoder bench: DCFormer-small forward and forward+backward at (2, 1, 64, 128, 128) on 2 threads,
and the fraction of input voxels that reach the stem output at 128x256x256 for each stem."""

from __future__ import annotations

import torch

from med3dvlm.benchmarks import BenchRow, median_seconds
from med3dvlm.models.dcformer import DCFormer, input_coverage

SHAPE = (2, 1, 64, 128, 128)
COVERAGE_SIZE = (128, 256, 256)
ORIGINAL = {"forward": "0.31 s", "forward+backward": "1.04 s"}


def _timings(channels_last: bool, repeats: int) -> list[BenchRow]:
    torch.manual_seed(0)
    model = DCFormer("small", channels_last=channels_last)
    x = torch.rand(SHAPE)
    layout = "channels_last_3d" if channels_last else "contiguous"

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        sum(out.mean() for out in model(x)).backward()

    model.eval()
    rows = [
        BenchRow(
            "encoder",
            f"DCFormer-small forward {SHAPE}, eval, {layout}",
            median_seconds(forward, repeats),
            "s",
            ORIGINAL["forward"],
            "2 threads, median",
        )
    ]
    model.train()
    rows.append(
        BenchRow(
            "encoder",
            f"DCFormer-small forward+backward {SHAPE}, train, {layout}",
            median_seconds(forward_backward, repeats),
            "s",
            ORIGINAL["forward+backward"],
            "2 threads, median",
        )
    )
    return rows


def _coverage() -> list[BenchRow]:
    rows = []
    for stem, original in (("reference", "15.6 %"), ("full", "")):
        torch.manual_seed(0)
        model = DCFormer("small", stem=stem)
        # input_coverage works in the encoder's internal (H, W, D) frame.
        d, h, w = COVERAGE_SIZE
        fraction = input_coverage(model.stages[0], (h, w, d))
        rows.append(
            BenchRow(
                "encoder",
                f"input voxels reaching the output, stem={stem}, {COVERAGE_SIZE}",
                100 * fraction,
                "%",
                original,
                "gradient support of the stem",
            )
        )
    return rows


def run(quick: bool) -> list[BenchRow]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        repeats = 2 if quick else 5
        return _timings(False, repeats) + _timings(True, repeats) + _coverage()
    finally:
        torch.set_num_threads(threads)
