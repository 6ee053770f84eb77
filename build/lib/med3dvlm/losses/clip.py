"""CLIP's symmetric InfoNCE loss (Radford et al. 2021), for ablations against SigLIP.

    L = (1/2B) sum_i [ CE(row i of S, i) + CE(column i of S, i) ],  S = exp(t') X Y^T

with ``t'`` (``log_scale``) learnable, initialised to log(1/0.07) as in CLIP, and no bias.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from med3dvlm.losses.distributed import data_parallel_rank, gather_rows, global_value, rows_per_rank


def _cross_entropy_sum(
    queries: Tensor, keys: Tensor, log_scale: Tensor, first_target: int, max_log_scale: float | None
) -> Tensor:
    """Sum over the query rows of the cross-entropy against all keys; query ``i``'s positive is
    key ``first_target + i``."""
    if max_log_scale is not None:
        log_scale = log_scale.clamp(max=max_log_scale)
    logits = log_scale.exp() * (queries @ keys.T)
    targets = torch.arange(queries.shape[0], device=queries.device) + first_target
    return F.cross_entropy(logits, targets, reduction="sum")


def _check_pairs(image_emb: Tensor, text_emb: Tensor) -> None:
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"CLIP loss needs image and text embeddings of the same shape (B, E); got image "
            f"{tuple(image_emb.shape)} and text {tuple(text_emb.shape)}"
        )


def clip_loss(
    image_emb: Tensor, text_emb: Tensor, log_scale: Tensor, max_log_scale: float | None = None
) -> Tensor:
    """Symmetric InfoNCE over one batch of L2-normalised ``(B, E)`` pairs (row ``i`` matches row ``i``)."""
    _check_pairs(image_emb, text_emb)
    total = _cross_entropy_sum(image_emb, text_emb, log_scale, 0, max_log_scale)
    total = total + _cross_entropy_sum(text_emb, image_emb, log_scale, 0, max_log_scale)
    return total / (2 * image_emb.shape[0])


class ClipLoss(nn.Module):
    """CLIP loss with a learnable ``log_scale`` (a 1-element vector, see ``SigLIPLoss``).

    ``max_log_scale``: the scale is clamped to ``exp(max_log_scale)`` (CLIP: 100) in the forward.
    ``distributed="gather"`` under a multi-process group: each rank scores its images against all
    texts and its texts against all images (gathered with gradient), which are exactly its rows and
    columns of the global matrix; the value and the rank-averaged gradients equal the
    single-process loss on the concatenated batch, as for ``SigLIPLoss``.
    """

    def __init__(
        self,
        init_log_scale: float = math.log(1 / 0.07),
        max_log_scale: float | None = math.log(100.0),
        distributed: Literal["none", "gather"] = "gather",
    ) -> None:
        super().__init__()
        if distributed not in ("none", "gather"):
            raise ValueError(f"ClipLoss distributed={distributed!r}: expected 'none' or 'gather'")
        self.log_scale = nn.Parameter(torch.tensor([float(init_log_scale)]))
        self.max_log_scale = max_log_scale
        self.distributed = distributed

    def forward(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        _check_pairs(image_emb, text_emb)
        placement = data_parallel_rank()
        if placement is None or self.distributed == "none":
            return clip_loss(image_emb, text_emb, self.log_scale, self.max_log_scale)
        rank, world = placement
        sizes = rows_per_rank(image_emb)
        first = sum(sizes[:rank])
        total = _cross_entropy_sum(
            image_emb, gather_rows(text_emb, sizes), self.log_scale, first, self.max_log_scale
        )
        total = total + _cross_entropy_sum(
            text_emb, gather_rows(image_emb, sizes), self.log_scale, first, self.max_log_scale
        )
        return global_value(total / (2 * sum(sizes)), world)
