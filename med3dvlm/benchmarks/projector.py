"""Projector bench: the Mixer forward at the paper's sizes (low (16, 256, 384), high (16, 32, 768)
-> Qwen2.5-7B width 3584), batch 16, 2 CPU threads (or the GPU in bf16); with ``--reference``, the
original's ``MixerLowHighHybridMLP`` beside it with the same weights, interleaved."""

from __future__ import annotations

import torch

from med3dvlm.benchmarks import BenchOptions, BenchRow, median_seconds, paired_seconds
from med3dvlm.benchmarks.original import load_original
from med3dvlm.models.projectors import MixerProjector
from med3dvlm.models.reference_layout import load_reference_state_dict

BATCH = 16
LLM_DIM = 3584
NAME = f"Mixer forward, batch {BATCH}, (256x384, 32x768) -> 256x{LLM_DIM}"


def run(options: BenchOptions, device: str = "cpu") -> list[BenchRow]:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    repeats = 3 if options.quick else 7
    where = "2 threads" if device == "cpu" else "GPU, bf16 autocast"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        torch.manual_seed(0)
        mixer = MixerProjector(encoder_channels=[384, 768], encoder_tokens=[256, 32], llm_dim=LLM_DIM)
        stages = [torch.randn(BATCH, 256, 384, device=device), torch.randn(BATCH, 32, 768, device=device)]

        def forward(module: torch.nn.Module) -> torch.Tensor:
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                return module(stages).float()

        if options.reference is None:
            seconds = median_seconds(lambda: (forward(mixer.to(device).eval()), sync()), repeats)
            return [BenchRow("projector", NAME, seconds, "s", f"{where}, median")]
        original = load_original(options.reference).mixer()
        load_reference_state_dict(mixer, original.state_dict())
        original, mixer = original.to(device).eval(), mixer.to(device).eval()
        want = forward(original)
        difference = ((want - forward(mixer)).abs().max() / want.abs().max()).item()
        a, b, ratio = paired_seconds(
            lambda: forward(original), lambda: forward(mixer), repeats, synchronize=sync
        )
    finally:
        torch.set_num_threads(threads)
    return [
        BenchRow("projector", "Mixer outputs vs the original's, same weights", difference, "max rel. diff"),
        BenchRow("projector", NAME, b, "s", f"{where}; interleaved pairs, medians", original=a, ratio=ratio),
    ]
