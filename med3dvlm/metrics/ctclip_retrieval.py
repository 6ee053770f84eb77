"""Report-to-volume recall@K as CT-CLIP's ``report_to_volume_new.py`` computes it.

Text ``i`` scores every volume by dot product (cosine for the L2-normalised latents CT-CLIP
saves); the volumes are ordered by a stable descending sort, so on a tie the lower index comes
first, and text ``i`` is a hit at K when volume ``i`` is among the first K. Recall@K is the
share of hits. Note the tie rule differs from :mod:`med3dvlm.metrics.retrieval`, where ties count
against the query: here a tied true match ahead of the others by index is found.

CT-CLIP pairs rows through two unsorted ``os.listdir`` calls; callers should pair text and volume
latents by name (row ``i`` of both is one scan).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike

CTCLIP_RECALL_AT: tuple[int, ...] = (5, 10, 50, 100)
# Rows of the similarity matrix handled at once: bounds memory at _CHUNK x N scores.
_CHUNK = 1024


def _matrix(embeddings: ArrayLike | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().double().numpy()
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty (N, E) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or Inf")
    return x


def own_positions(text_emb: ArrayLike | torch.Tensor, image_emb: ArrayLike | torch.Tensor) -> np.ndarray:
    """0-based position of volume ``i`` in text ``i``'s stable descending ordering of volumes.

    Position = volumes scoring strictly higher + tied volumes with a lower index, which is where
    a stable descending sort puts it. Scores are float64 dot products.
    """
    text, image = _matrix(text_emb, "text_emb"), _matrix(image_emb, "image_emb")
    if text.shape != image.shape:
        raise ValueError(f"text and image embeddings differ in shape: {text.shape} vs {image.shape}")
    n = len(text)
    positions = np.empty(n, dtype=np.int64)
    for start in range(0, n, _CHUNK):
        rows = np.arange(start, min(start + _CHUNK, n))
        scores = text[rows] @ image.T
        own = scores[np.arange(len(rows)), rows][:, None]
        lower_index = np.arange(n)[None, :] < rows[:, None]
        positions[rows] = (scores > own).sum(axis=1) + ((scores == own) & lower_index).sum(axis=1)
    return positions


def report_to_volume_recall(
    text_emb: ArrayLike | torch.Tensor,
    image_emb: ArrayLike | torch.Tensor,
    ks: Sequence[int] = CTCLIP_RECALL_AT,
) -> dict[int, float]:
    """Recall@K of text -> volume retrieval for each K in ``ks`` (row ``i`` of both is pair ``i``).

    A K larger than the number of pairs N uses all N volumes, so recall is 1.0 (CT-CLIP raises
    there); every position is below N, so ``position < K`` already says that.
    """
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be at least 1, got {tuple(ks)}")
    positions = own_positions(text_emb, image_emb)
    return {k: float((positions < k).mean()) for k in ks}
