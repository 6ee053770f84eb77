"""Retrieval recall against hand-computed similarity matrices."""

from __future__ import annotations

import pytest
import torch

from med3dvlm.metrics.retrieval import retrieval_metrics, retrieval_table, subset_sizes, true_match_ranks


def test_ranks_of_a_hand_made_matrix():
    # rows: images, columns: texts; true pairs on the diagonal
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # image 0: its text is best -> rank 1
            [0.8, 0.5, 0.7],  # image 1: text 0 and text 2 beat it -> rank 3
            [0.3, 0.6, 0.4],  # image 2: text 1 beats it -> rank 2
        ]
    )
    ranks = true_match_ranks(sim)
    assert ranks["i2t"].tolist() == [1, 3, 2]
    # column 0: 0.9 best -> 1; column 1: 0.6 beats 0.5 -> 2; column 2: 0.7 beats 0.4 -> 2
    assert ranks["t2i"].tolist() == [1, 2, 2]


def test_ties_count_against_the_query():
    ranks = true_match_ranks(torch.zeros(4, 4))
    assert ranks["i2t"].tolist() == [4, 4, 4, 4]
    assert ranks["t2i"].tolist() == [4, 4, 4, 4]


def _embeddings_with_known_ranks(n: int, ranks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot texts; image i scores its own text with rank ranks[i] among the texts."""
    text = torch.eye(n)
    image = torch.zeros(n, n)
    for i, rank in enumerate(ranks):
        others = [j for j in range(n) if j != i][: rank - 1]
        image[i, i] = 0.5
        image[i, others] = 1.0
    return image, text


def test_recall_per_subset_and_direction():
    n = 120
    ranks = [1 + (i % 12) for i in range(n)]  # ranks 1..12 cycling
    image, text = _embeddings_with_known_ranks(n, ranks)
    metrics = retrieval_metrics(image, text, sizes=(100, 500), recall_at=(1, 5, 10))
    first = ranks[:100]
    assert metrics["i2t_R@1_n100"] == pytest.approx(sum(r <= 1 for r in first) / 100)
    assert metrics["i2t_R@5_n100"] == pytest.approx(sum(r <= 5 for r in first) / 100)
    assert metrics["i2t_R@10_n100"] == pytest.approx(sum(r <= 10 for r in first) / 100)
    assert not any(key.endswith("_n500") for key in metrics)  # only 120 pairs: no 500 subset
    # text->image on the same matrix, computed by brute force
    sim = image[:100] @ text[:100].T
    t2i = [(sim[:, j] >= sim[j, j]).sum().item() for j in range(100)]
    assert metrics["t2i_R@5_n100"] == pytest.approx(sum(r <= 5 for r in t2i) / 100)


def test_subsets_use_the_first_pairs_only():
    image, text = _embeddings_with_known_ranks(200, [1] * 100 + [50] * 100)
    metrics = retrieval_metrics(image, text, sizes=(100, 200))
    assert metrics["i2t_R@1_n100"] == 1.0
    assert metrics["i2t_R@1_n200"] == pytest.approx(0.5)


def test_perfect_and_smaller_than_smallest_subset():
    emb = torch.nn.functional.normalize(torch.randn(30, 16), dim=1)
    metrics = retrieval_metrics(emb, emb)
    assert subset_sizes(30) == [30]
    assert metrics["i2t_R@1_n30"] == metrics["t2i_R@1_n30"] == metrics["recall_mean"] == 1.0


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="square"):
        true_match_ranks(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="num_pairs, E"):
        retrieval_metrics(torch.zeros(4, 8), torch.zeros(5, 8))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((4, 8), float("nan")), torch.zeros(4, 8))


def test_table_lists_each_subset():
    image, text = _embeddings_with_known_ranks(100, [1] * 100)
    table = retrieval_table({f"test/{k}": v for k, v in retrieval_metrics(image, text).items()})
    assert "| 100 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in table
