"""Distributed SigLIP/CLIP with 2 and 3 gloo processes equal the single-process loss on the
concatenated batch: the value on every rank, and the gradients once averaged over ranks (DDP).
The ranks hold different numbers of pairs, as a last partial batch can."""

from __future__ import annotations

import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from med3dvlm.losses import ClipLoss, SigLIPLoss

ROWS_PER_RANK = [3, 2, 4]
IN_DIM = 5
EMBED_DIM = 4
# (loss class, keyword arguments): every distributed implementation, dense and chunked.
CASES = [
    (SigLIPLoss, {"distributed": "gather"}),
    (SigLIPLoss, {"distributed": "gather", "chunk_size": 2}),
    (SigLIPLoss, {"distributed": "neighbour"}),
    (SigLIPLoss, {"distributed": "neighbour", "chunk_size": 2}),
    (ClipLoss, {"distributed": "gather"}),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def global_inputs(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(world)
    rows = sum(ROWS_PER_RANK[:world])
    images = torch.randn(rows, IN_DIM, generator=gen, dtype=torch.float64)
    texts = images + 0.5 * torch.randn(rows, IN_DIM, generator=gen, dtype=torch.float64)
    return images, texts


def rows_of(rank: int) -> slice:
    start = sum(ROWS_PER_RANK[:rank])
    return slice(start, start + ROWS_PER_RANK[rank])


class Towers(torch.nn.Module):
    """Two linear heads and a loss, identical on every rank as under DDP."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.image = torch.nn.Linear(IN_DIM, EMBED_DIM, dtype=torch.float64)
        self.text = torch.nn.Linear(IN_DIM, EMBED_DIM, dtype=torch.float64)
        with torch.no_grad():
            for param in [*self.image.parameters(), *self.text.parameters()]:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64))
        self.loss = loss.double()
        with torch.no_grad():
            # Away from the initial values so the scale and bias gradients are not negligible.
            self.loss.log_scale.fill_(1.2)
            if hasattr(self.loss, "bias"):
                self.loss.bias.fill_(-1.5)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        return self.loss(F.normalize(self.image(images), dim=-1), F.normalize(self.text(texts), dim=-1))


def loss_and_grads(model: Towers, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss = model(images, texts)
    loss.backward()
    return {"loss": loss.detach(), **{name: p.grad.clone() for name, p in model.named_parameters()}}


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A deadlocked exchange fails the test after the timeout instead of hanging it.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        images, texts = global_inputs(world)
        mine = rows_of(rank)
        results = []
        for loss_class, kwargs in CASES:
            result = loss_and_grads(Towers(loss_class(**kwargs)), images[mine], texts[mine])
            for name, value in result.items():
                if name != "loss":
                    dist.all_reduce(value)
                    value /= world  # DDP averages gradients over ranks.
            results.append(result)
        local_only = loss_and_grads(Towers(SigLIPLoss(distributed="none")), images[mine], texts[mine])
        torch.save({"cases": results, "local_only": local_only["loss"]}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def distributed_run(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=True)
    return world, [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c.__name__}-{k}" for c, k in CASES])
def test_distributed_equals_single_process_on_concatenated_batch(distributed_run, case):
    world, per_rank = distributed_run
    loss_class, kwargs = CASES[case]
    images, texts = global_inputs(world)
    expected = loss_and_grads(Towers(loss_class(**{**kwargs, "distributed": "none"})), images, texts)
    for rank, saved in enumerate(per_rank):
        got = saved["cases"][case]
        assert set(got) == set(expected)
        for name in expected:
            torch.testing.assert_close(
                got[name], expected[name], rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {name}"
            )


def test_mode_none_under_distributed_is_the_local_loss(distributed_run):
    world, per_rank = distributed_run
    images, texts = global_inputs(world)
    for rank, saved in enumerate(per_rank):
        mine = rows_of(rank)
        expected = loss_and_grads(Towers(SigLIPLoss(distributed="none")), images[mine], texts[mine])["loss"]
        torch.testing.assert_close(saved["local_only"], expected, rtol=1e-12, atol=1e-12)
    # The local losses differ from the global one: the check above cannot pass by accident.
    global_loss = loss_and_grads(Towers(SigLIPLoss(distributed="none")), images, texts)["loss"]
    assert not math.isclose(per_rank[0]["local_only"].item(), global_loss.item(), rel_tol=1e-3)
