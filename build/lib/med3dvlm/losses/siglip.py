"""SigLIP: the pairwise sigmoid loss of Zhai et al. 2023 (arXiv:2303.15343), Algorithm 1.

    L = -(1/|B|) sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b)),  t = exp(t'),  z_ij = +1 iff i == j

with ``x_i`` / ``y_j`` the L2-normalised image / text embeddings of the batch ``B``, ``t'``
(``log_scale``) initialised to log 10 and ``b`` (``bias``) to -10, both learnable.

How the original Med3DVLM code (``src/model/CLIP.py``) differs, and why this is not a port of it:

* the single-process path multiplies the logits by ``t'`` itself, not ``exp(t')`` (only its
  multi-GPU path exponentiates), so the scale can go negative and the two paths disagree;
* it sums over the batch without the ``1/|B|`` outside torch.distributed, so the loss and the
  effective learning rate grow with the batch size;
* ``t'`` starts at CLIP's log(1/0.07) and ``b`` at 0 instead of log 10 and -10: with ``b = 0`` the
  |B|^2 - |B| negatives dominate the first steps, which the paper's -10 exists to prevent;
* it symmetrises the logits (averages the image->text and text->image matrices), which the
  sigmoid loss does not need: the pairwise terms are already symmetric in their roles;
* its "efficient" distributed branch deadlocks; the neighbour exchange here posts each send
  together with its receive (``batch_isend_irecv``), so no rank blocks in a send while its peer
  blocks in one too, and every rank runs the same exchanges in the same order.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from med3dvlm.losses.distributed import (
    data_parallel_rank,
    gather_rows,
    global_value,
    ring_shift,
    rows_per_rank,
)

DistributedMode = Literal["none", "gather", "neighbour"]
DISTRIBUTED_MODES: tuple[str, ...] = ("none", "gather", "neighbour")


def _check_pairs(image_emb: Tensor, text_emb: Tensor) -> None:
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"SigLIP needs image and text embeddings of the same shape (B, E); got image "
            f"{tuple(image_emb.shape)} and text {tuple(text_emb.shape)}"
        )


def _labels(rows: int, cols: int, positive_offset: int | None, like: Tensor) -> Tensor:
    """``z``: -1 everywhere, +1 at ``(i, i + positive_offset)`` (no +1 for ``None``)."""
    labels = torch.full((rows, cols), -1.0, dtype=like.dtype, device=like.device)
    if positive_offset is not None:
        labels.diagonal(positive_offset).fill_(1.0)
    return labels


def _dense_sum(x: Tensor, y: Tensor, log_scale: Tensor, bias: Tensor, positive_offset: int | None) -> Tensor:
    logits = log_scale.exp() * (x @ y.T) + bias
    return -F.logsigmoid(_labels(x.shape[0], y.shape[0], positive_offset, logits) * logits).sum()


class _ChunkedSum(torch.autograd.Function):
    """``_dense_sum`` over row chunks that keeps no ``rows x cols`` matrix for the backward pass:
    the backward recomputes each chunk's logits and applies the closed-form gradient

        d/ds_ij = -z_ij sigmoid(-z_ij s_ij),  s_ij = t x_i.y_j + b.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, log_scale: Tensor, bias: Tensor, offset: int | None, chunk: int):
        ctx.save_for_backward(x, y, log_scale, bias)
        ctx.offset, ctx.chunk = offset, chunk
        total = x.new_zeros(())
        for start in range(0, x.shape[0], chunk):
            rows = x[start : start + chunk]
            shifted = None if offset is None else offset + start
            total = total + _dense_sum(rows, y, log_scale, bias, shifted)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, log_scale, bias = ctx.saved_tensors
        scale = log_scale.exp()
        grad_x, grad_y = torch.zeros_like(x), torch.zeros_like(y)
        grad_dot, grad_bias = x.new_zeros(()), x.new_zeros(())
        for start in range(0, x.shape[0], ctx.chunk):
            rows = x[start : start + ctx.chunk]
            dots = rows @ y.T
            shifted = None if ctx.offset is None else ctx.offset + start
            labels = _labels(rows.shape[0], y.shape[0], shifted, dots)
            d_logits = -labels * torch.sigmoid(-labels * (scale * dots + bias)) * grad
            grad_x[start : start + ctx.chunk] = scale * (d_logits @ y)
            grad_y += scale * (d_logits.T @ rows)
            grad_dot += (d_logits * dots).sum()
            grad_bias += d_logits.sum()
        grad_log_scale = (scale * grad_dot).reshape(log_scale.shape)
        return grad_x, grad_y, grad_log_scale, grad_bias.reshape(bias.shape), None, None


def pairwise_sigmoid_sum(
    image_emb: Tensor,
    text_emb: Tensor,
    log_scale: Tensor,
    bias: Tensor,
    positive_offset: int | None = 0,
    chunk_size: int | None = None,
) -> Tensor:
    """``sum_ij -log sigmoid(z_ij (exp(log_scale) x_i.y_j + b))`` over ``image_emb (n, E)`` x
    ``text_emb (m, E)``, with ``z_ij = +1`` iff ``j == i + positive_offset`` (never, for ``None``).

    Computed in float32 (float64 stays float64) with autocast off: the sum has ``n*m`` terms.
    ``chunk_size`` rows at a time keeps memory at ``chunk_size x m`` (same value and gradients).
    """
    dtype = torch.promote_types(image_emb.dtype, torch.float32)
    with torch.autocast(image_emb.device.type, enabled=False):
        x, y = image_emb.to(dtype), text_emb.to(dtype)
        log_scale, bias = log_scale.to(dtype), bias.to(dtype)
        if chunk_size is None or chunk_size >= x.shape[0]:
            return _dense_sum(x, y, log_scale, bias, positive_offset)
        return _ChunkedSum.apply(x, y, log_scale, bias, positive_offset, chunk_size)


def siglip_loss(
    image_emb: Tensor, text_emb: Tensor, log_scale: Tensor, bias: Tensor, chunk_size: int | None = None
) -> Tensor:
    """The paper's loss on one batch: mean over the ``B`` images of the sum over the ``B`` texts.

    ``image_emb`` / ``text_emb``: ``(B, E)``, L2-normalised, row ``i`` of each a matching pair;
    ``log_scale`` (``t'``) and ``bias``: scalars (any shape with one element).
    """
    _check_pairs(image_emb, text_emb)
    return pairwise_sigmoid_sum(image_emb, text_emb, log_scale, bias, 0, chunk_size) / image_emb.shape[0]


class SigLIPLoss(nn.Module):
    """SigLIP with learnable ``log_scale`` (``t'``) and ``bias``; ``forward(image_emb, text_emb)``.

    The parameters are 1-element vectors, not 0-d tensors, because FSDP2 cannot shard scalars; their
    names (``log_scale``, ``bias``) are what the optimiser set-up keeps free of weight decay.

    Under torch.distributed with more than one process, ``distributed`` picks how the negatives of
    the whole global batch (all ranks' pairs, rank order) are reached:

    * ``"gather"``: all-gather the text embeddings (with gradient); each rank scores its images
      against every text, a ``B_local x B_global`` matrix;
    * ``"neighbour"``: pass the text embeddings round a ring, ``world - 1`` exchanges of one rank's
      block; each rank scores its images against one ``B_local x B_local`` block at a time and the
      global matrix, or a ``B_local x B_global`` slice of it, never exists;
    * ``"none"``: only the local batch (the plain loss).

    With ``gather`` and ``neighbour`` every rank returns the value of the single-process loss on the
    concatenated global batch, and the gradients, once AVERAGED over ranks as DDP and FSDP do, equal
    that loss's gradients (see ``med3dvlm.losses.distributed.global_value``). Ranks may hold
    different numbers of pairs. Without a multi-process group all modes are the plain loss.

    ``chunk_size``: score that many images at a time and recompute in the backward pass instead of
    storing the logits (same value and gradients, memory ``chunk_size x`` texts).
    """

    def __init__(
        self,
        init_log_scale: float = math.log(10.0),
        init_bias: float = -10.0,
        distributed: DistributedMode = "gather",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if distributed not in DISTRIBUTED_MODES:
            raise ValueError(f"SigLIPLoss distributed={distributed!r}: expected one of {DISTRIBUTED_MODES}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"SigLIPLoss chunk_size={chunk_size}: must be a positive number of rows or None")
        self.log_scale = nn.Parameter(torch.tensor([float(init_log_scale)]))
        self.bias = nn.Parameter(torch.tensor([float(init_bias)]))
        self.distributed = distributed
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return f"distributed={self.distributed!r}, chunk_size={self.chunk_size}"

    def forward(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        _check_pairs(image_emb, text_emb)
        placement = data_parallel_rank()
        if placement is None or self.distributed == "none":
            return siglip_loss(image_emb, text_emb, self.log_scale, self.bias, self.chunk_size)
        rank, world = placement
        sizes = rows_per_rank(image_emb)
        if self.distributed == "gather":
            texts = gather_rows(text_emb, sizes)
            total = pairwise_sigmoid_sum(
                image_emb, texts, self.log_scale, self.bias, sum(sizes[:rank]), self.chunk_size
            )
        else:
            total = pairwise_sigmoid_sum(image_emb, text_emb, self.log_scale, self.bias, 0, self.chunk_size)
            block = text_emb
            for step in range(1, world):
                # After ``step`` shifts this rank holds the texts of rank ``rank - step``.
                block = ring_shift(block, sizes[(rank - step) % world])
                total = total + pairwise_sigmoid_sum(
                    image_emb, block, self.log_scale, self.bias, None, self.chunk_size
                )
        return global_value(total / sum(sizes), world)
