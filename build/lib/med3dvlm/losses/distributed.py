"""The few torch.distributed operations the contrastive losses need, each differentiable.

All of them act on the default process group. ``data_parallel_rank()`` says whether there is
anything to do: ``None`` when torch.distributed is not initialised or runs a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def data_parallel_rank() -> tuple[int, int] | None:
    """``(rank, world_size)`` of this process, or ``None`` without a multi-process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return (dist.get_rank(), world) if world > 1 else None


def rows_per_rank(tensor: Tensor) -> list[int]:
    """Every rank's ``tensor.shape[0]`` in rank order (ranks may hold different batch sizes)."""
    local = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(size) for size in sizes]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int]) -> Tensor:
        most = max(sizes)
        padded = tensor.new_zeros((most, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        rank = dist.get_rank()
        ctx.start, ctx.rows = sum(sizes[:rank]), sizes[rank]
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # Every rank's loss used every row: a row's gradient is the sum over ranks. An all-reduce
        # (not a reduce-scatter) because gloo has no reduce-scatter; the tensors are small.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.start + ctx.rows], None


def gather_rows(tensor: Tensor, sizes: list[int]) -> Tensor:
    """All ranks' ``tensor`` concatenated along dim 0 in rank order; ``sizes``: ``rows_per_rank``.

    Differentiable: each rank's rows receive the sum over ranks of their gradients.
    """
    return _GatherRows.apply(tensor, sizes)


def _exchange(tensor: Tensor, send_to: int, receive_from: int, receive_rows: int) -> Tensor:
    received = tensor.new_empty((receive_rows, *tensor.shape[1:]))
    ops = [dist.P2POp(dist.isend, tensor, send_to), dist.P2POp(dist.irecv, received, receive_from)]
    # Posting the send and the receive together is what keeps the ring free of deadlock.
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _RingShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, send_to: int, receive_from: int, receive_rows: int) -> Tensor:
        ctx.send_to, ctx.receive_from, ctx.sent_rows = send_to, receive_from, tensor.shape[0]
        return _exchange(tensor.contiguous(), send_to, receive_from, receive_rows)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        # The gradient travels back the way the tensor came.
        return _exchange(grad.contiguous(), ctx.receive_from, ctx.send_to, ctx.sent_rows), None, None, None


def ring_shift(tensor: Tensor, receive_rows: int) -> Tensor:
    """Send ``tensor`` to rank ``r + 1`` and return the ``receive_rows`` rows that rank ``r - 1``
    sends (modulo the world).

    Differentiable: the backward pass returns the gradient to rank ``r - 1``. Every rank must call
    it the same number of times.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    return _RingShift.apply(tensor, (rank + 1) % world, (rank - 1) % world, receive_rows)


def global_value(local_share: Tensor, world: int) -> Tensor:
    """Turn this rank's share ``L_r`` of a loss ``L = sum_r L_r`` into what each rank returns.

    The value is ``L`` itself (an all-reduce of the detached shares), identical on every rank. The
    gradient is that of ``world * L_r``: data-parallel training AVERAGES gradients over ranks
    (DDP, FSDP), and ``mean_r grad(world * L_r) = grad(sum_r L_r) = grad L``. Where gradients are
    summed instead, divide the result by ``world``.
    """
    scaled = local_share * world
    total = local_share.detach().clone()
    dist.all_reduce(total)
    return scaled + (total - scaled.detach())
