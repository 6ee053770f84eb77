"""Loss bench: SigLIP forward+backward at batch 64 x 768 (dense and chunked) on one thread, and the
memory each keeps for its backward pass at a large (global-batch-sized) pair matrix.

One thread: a 64 x 64 logit matrix is too small to split, and on a busy 2-core machine a second
thread waiting for its core turns a sub-millisecond step into tens of milliseconds.

The saved-for-backward bytes are counted exactly with ``saved_tensors_hooks``: that memory is held
from the forward to the backward pass and is what the chunked variant removes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from med3dvlm.benchmarks import BenchOptions, BenchRow, median_seconds, saved_for_backward_bytes
from med3dvlm.losses import SigLIPLoss

BATCH, WIDTH = 64, 768
CHUNK = 16
MEMORY_BATCH, MEMORY_CHUNK = 2048, 128


def _embeddings(batch: int, requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(batch, WIDTH, generator=gen), dim=-1)
    text = F.normalize(torch.randn(batch, WIDTH, generator=gen), dim=-1)
    return image.requires_grad_(requires_grad), text.requires_grad_(requires_grad)


def _step_seconds(chunk_size: int | None, repeats: int) -> float:
    loss = SigLIPLoss(distributed="none", chunk_size=chunk_size)
    image, text = _embeddings(BATCH, requires_grad=True)

    def step() -> None:
        image.grad = text.grad = None
        loss.zero_grad(set_to_none=True)
        loss(image, text).backward()

    return median_seconds(step, repeats, warmup=3)


def _saved_bytes(chunk_size: int | None, batch: int) -> int:
    loss = SigLIPLoss(distributed="none", chunk_size=chunk_size)
    image, text = _embeddings(batch, requires_grad=True)
    return saved_for_backward_bytes(lambda: loss(image, text))


def run(options: BenchOptions) -> list[BenchRow]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    repeats = 10 if options.quick else 50
    try:
        dense = _step_seconds(None, repeats)
        chunked = _step_seconds(CHUNK, repeats)
        dense_mb = _saved_bytes(None, MEMORY_BATCH) / 2**20
        chunked_mb = _saved_bytes(MEMORY_CHUNK, MEMORY_BATCH) / 2**20
    finally:
        torch.set_num_threads(threads)
    pairs = f"{MEMORY_BATCH}x{MEMORY_BATCH} pairs, width {WIDTH}"
    return [
        BenchRow(
            "loss",
            f"SigLIP forward+backward, batch {BATCH} x {WIDTH}",
            dense * 1e3,
            "ms",
            "1 thread, median",
        ),
        BenchRow(
            "loss",
            f"SigLIP forward+backward chunked ({CHUNK} rows), batch {BATCH} x {WIDTH}",
            chunked * 1e3,
            "ms",
            "1 thread, median; backward recomputes the logits",
        ),
        BenchRow("loss", f"SigLIP kept for backward, dense, {pairs}", dense_mb, "MiB", "saved-tensor bytes"),
        BenchRow(
            "loss",
            f"SigLIP kept for backward, chunked ({MEMORY_CHUNK} rows), {pairs}",
            chunked_mb,
            "MiB",
            "saved-tensor bytes (the embeddings only)",
        ),
    ]
