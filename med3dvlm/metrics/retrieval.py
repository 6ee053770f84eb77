"""Image-text retrieval recall, following the M3D benchmark protocol.

The test pairs are taken in order; for each subset size N in ``SUBSET_SIZES`` that the test set
holds, the first N pairs form an N x N similarity matrix (image i belongs with text i) and
recall@K is the share of queries whose true match is among the K best candidates, in both
directions: image->text (rows) and text->image (columns). A query's rank is the number of
candidates scoring at least as high as its true match: ties count against the query, so a
collapsed model (every score equal) gets rank N, not 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SUBSET_SIZES: tuple[int, ...] = (100, 500, 1000, 2000)
RECALL_AT: tuple[int, ...] = (1, 5, 10)
DIRECTIONS: tuple[str, ...] = ("i2t", "t2i")

from med3dvlm.utils.markdown import markdown_table


def true_match_ranks(similarity: torch.Tensor) -> dict[str, torch.Tensor]:
    """1-based rank of the true match for every query of a square similarity matrix.

    ``similarity[i, j]`` scores image ``i`` against text ``j``; pair ``i`` is ``(i, i)``.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {tuple(similarity.shape)}")
    diagonal = similarity.diagonal()
    return {
        "i2t": (similarity >= diagonal[:, None]).sum(dim=1),
        "t2i": (similarity >= diagonal[None, :]).sum(dim=0),
    }


def subset_sizes(num_pairs: int, sizes: Sequence[int] = SUBSET_SIZES) -> list[int]:
    """The subset sizes the test set holds; all pairs when it is smaller than the smallest size."""
    if num_pairs < 1:
        raise ValueError("retrieval needs at least one image-text pair")
    held = [n for n in sizes if n <= num_pairs]
    return held or [num_pairs]


def metric_name(direction: str, k: int, n: int) -> str:
    return f"{direction}_R@{k}_n{n}"


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    sizes: Sequence[int] = SUBSET_SIZES,
    recall_at: Sequence[int] = RECALL_AT,
) -> dict[str, float]:
    """Recall@K for both directions on each subset of the first N pairs.

    ``image_emb`` and ``text_emb`` are ``(num_pairs, E)`` in test order (row i of both is pair i);
    the similarity is their dot product (cosine for L2-normalised embeddings). Keys are
    ``metric_name(direction, k, n)``, e.g. ``i2t_R@5_n100``, plus ``recall_mean`` (mean over both
    directions and every K on the largest subset, the number to monitor).
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(
            f"image and text embeddings must both be (num_pairs, E); got {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    image_emb, text_emb = image_emb.float(), text_emb.float()
    if not (torch.isfinite(image_emb).all() and torch.isfinite(text_emb).all()):
        raise ValueError("retrieval embeddings contain NaN or Inf (diverged training?)")
    metrics: dict[str, float] = {}
    held = subset_sizes(image_emb.shape[0], sizes)
    for n in held:
        ranks = true_match_ranks(image_emb[:n] @ text_emb[:n].T)
        for direction in DIRECTIONS:
            for k in recall_at:
                metrics[metric_name(direction, k, n)] = (ranks[direction] <= k).float().mean().item()
    largest = held[-1]
    metrics["recall_mean"] = sum(
        metrics[metric_name(d, k, largest)] for d in DIRECTIONS for k in recall_at
    ) / (len(DIRECTIONS) * len(recall_at))
    return metrics


def retrieval_table(metrics: dict[str, float], recall_at: Sequence[int] = RECALL_AT) -> str:
    """A Markdown table of ``retrieval_metrics`` output (keys may carry a ``split/`` prefix)."""
    by_n: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        name = key.rsplit("/", 1)[-1]
        if "_R@" not in name:
            continue
        head, n = name.rsplit("_n", 1)
        by_n.setdefault(int(n), {})[head] = value
    columns = [f"{d}_R@{k}" for d in DIRECTIONS for k in recall_at]
    rows = [[n, *(f"{by_n[n][c]:.3f}" if c in by_n[n] else "-" for c in columns)] for n in sorted(by_n)]
    return markdown_table(["pairs", *columns], rows, right=range(len(columns) + 1))
