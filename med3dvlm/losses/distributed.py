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


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's ``(n, E)`` tensor along dim 0 (rank order), keeping the gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank's loss used every row: a row's gradient is the sum over ranks. An all-reduce
        # (not a reduce-scatter) because gloo has no reduce-scatter; the tensors are small.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_rows(tensor: Tensor) -> Tensor:
    """All ranks' ``tensor`` concatenated in rank order; gradients flow back to each owner, summed.

    Every rank must hold the same number of rows (``DistributedSampler`` guarantees it).
    """
    return _GatherRows.apply(tensor)


def _exchange(tensor: Tensor, send_to: int, receive_from: int) -> Tensor:
    received = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, send_to), dist.P2POp(dist.irecv, received, receive_from)]
    # Posting the send and the receive together is what keeps the ring free of deadlock.
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


class _RingShift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, send_to: int, receive_from: int) -> Tensor:
        ctx.send_to, ctx.receive_from = send_to, receive_from
        return _exchange(tensor.contiguous(), send_to, receive_from)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        # The gradient travels back the way the tensor came.
        return _exchange(grad.contiguous(), ctx.receive_from, ctx.send_to), None, None


def ring_shift(tensor: Tensor) -> Tensor:
    """Send ``tensor`` to rank ``r + 1`` and return the one from rank ``r - 1`` (modulo the world).

    Differentiable: the backward pass sends the gradient to rank ``r - 1``. Every rank must call it
    the same number of times with tensors of the same shape.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    return _RingShift.apply(tensor, (rank + 1) % world, (rank - 1) % world)


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
