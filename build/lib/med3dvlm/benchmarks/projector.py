"""Projector bench: the Mixer forward at the paper's sizes (low (16, 256, 384), high (16, 32, 768)
-> Qwen2.5-7B width 3584), batch 16, 2 threads."""

from __future__ import annotations

import torch

from med3dvlm.benchmarks import BenchRow, median_seconds
from med3dvlm.models.projectors import MixerProjector

BATCH = 16
LLM_DIM = 3584


def run(quick: bool) -> list[BenchRow]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        mixer = MixerProjector(encoder_channels=[384, 768], encoder_tokens=[256, 32], llm_dim=LLM_DIM).eval()
        low, high = torch.randn(BATCH, 256, 384), torch.randn(BATCH, 32, 768)

        def forward() -> None:
            with torch.no_grad():
                mixer([low, high])

        seconds = median_seconds(forward, repeats=2 if quick else 5)
    finally:
        torch.set_num_threads(threads)
    return [
        BenchRow(
            "projector",
            f"Mixer forward, batch {BATCH}, (256x384, 32x768) -> 256x{LLM_DIM}",
            seconds,
            "s",
            "1.60 s",
            "2 threads, median",
        )
    ]
