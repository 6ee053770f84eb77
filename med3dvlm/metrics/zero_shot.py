"""Zero-shot multi-abnormality classification on CT-RATE, following CT-CLIP's evaluation.

For every volume and each of the 18 CT-RATE pathologies the model scores two prompts,
``"<label> is present."`` and ``"<label> is not present."``; the softmax over the pair gives
P(present) (:func:`present_probability`). Per pathology, CT-CLIP reports:

- AUROC of P(present) (``eval.py``: ``roc_curve`` + ``auc``, equal to ``roc_auc_score``);
- a threshold closest to the ROC corner (0, 1) over a 100-point grid (:func:`corner_threshold`,
  ``bootstrap_values.py``'s ``find_threshold``), and at ``prob > threshold``: weighted F1,
  accuracy and precision of the positive class (sklearn's ``f1_score(average="weighted")``,
  ``accuracy_score``, ``precision_score``).

The scores are computed here with numpy from the ROC curve and confusion counts and equal
sklearn's (the tests compare them): sklearn's per-call input validation costs milliseconds, which
over 1,000 bootstrap resamples of 18 labels adds up to many minutes.

CT-CLIP's "bootstrap" draws resample indices and then evaluates the full set every time, so its
1,000 rows are identical. :func:`bootstrap_intervals` resamples cases for real, keeping the
thresholds chosen on the full set as the reference does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# CT-CLIP's grid: 0, 1/99, ..., 1 (both ends included).
THRESHOLD_GRID: np.ndarray = np.linspace(0, 1, 100)
# The threshold for a label with one class only, where no ROC point exists (see corner_threshold).
SINGLE_CLASS_THRESHOLD = 0.5
SCORE_NAMES: tuple[str, ...] = ("auroc", "f1_weighted", "accuracy", "precision")

# metric_fn(labels (n, L), probs (n, L), thresholds (L,)) -> {name: value}
MetricFn = Callable[[np.ndarray, np.ndarray, np.ndarray], Mapping[str, float]]


def zero_shot_prompts(label: str) -> tuple[str, str]:
    """The (present, absent) prompt pair CT-CLIP scores for one pathology."""
    return f"{label} is present.", f"{label} is not present."


def present_probability(present_logit: ArrayLike, absent_logit: ArrayLike) -> np.ndarray:
    """Softmax over the (present, absent) logit pair, probability of "present" (elementwise).

    softmax([a, b])[0] = 1 / (1 + exp(b - a)) = exp(-log(1 + exp(b - a))); ``logaddexp`` takes
    that log without overflow, so logits of +-1000 give exactly 1 and 0 rather than NaN.
    """
    present = np.asarray(present_logit, dtype=np.float64)
    absent = np.asarray(absent_logit, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, absent - present))


def _binary_pair(labels: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D 0/1 labels and finite probabilities of the same length."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1 or y.shape != p.shape:
        raise ValueError(f"labels and probs must be 1-D of one length, got {y.shape} and {p.shape}")
    if y.size == 0:
        raise ValueError("no cases to evaluate")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(p).all():
        raise ValueError("probabilities contain NaN or Inf")
    return y.astype(np.int64), p


def has_both_classes(labels: np.ndarray) -> bool:
    """Whether 0/1 ``labels`` hold both classes (AUROC and the ROC corner need both)."""
    return bool(labels.min() != labels.max())


def corner_threshold(labels: ArrayLike, probs: ArrayLike) -> float:
    """CT-CLIP's operating point: the grid threshold closest to the ROC corner (0, 1).

    For each ``t`` in ``THRESHOLD_GRID`` the prediction is ``prob > t`` (strict) and the distance
    is ``sqrt((1 - TPR)^2 + FPR^2)``; the smallest distance wins and a tie goes to the larger
    threshold (the reference updates on ``<=`` while scanning upwards).

    With one class only, TPR or FPR is 0/0 at every threshold, so every distance is NaN and none
    can be chosen; the reference then indexes a 1x1 confusion matrix and crashes. Here the result
    is ``SINGLE_CLASS_THRESHOLD`` (0.5: predicted present when "present" outscores "not present").
    """
    y, p = _binary_pair(labels, probs)
    if not has_both_classes(y):
        return SINGLE_CLASS_THRESHOLD
    predicted = p[None, :] > THRESHOLD_GRID[:, None]
    positive = y == 1
    tpr = (predicted & positive).sum(axis=1) / positive.sum()
    fpr = (predicted & ~positive).sum(axis=1) / (~positive).sum()
    # The reference's order of operations, so equal distances tie bit for bit as they do there.
    distance = np.sqrt((1 - tpr) ** 2 + fpr**2)
    # argmin returns the first minimum; on the reversed array that is the last (largest) threshold.
    last_best = len(distance) - 1 - int(np.argmin(distance[::-1]))
    return float(THRESHOLD_GRID[last_best])


def auroc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Trapezoidal area under the ROC curve of 0/1 ``labels`` (``roc_curve`` + ``auc``); NaN with one class.

    The curve has one point per distinct probability, so tied cases move TPR and FPR together
    (a diagonal step: a tied positive-negative pair counts one half).
    """
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(-probs, kind="stable")
    ranked_probs, ranked_labels = probs[order], labels[order]
    # the last case of each run of equal probabilities, scanning from the highest
    run_ends = np.r_[np.flatnonzero(np.diff(ranked_probs)), len(ranked_probs) - 1]
    true_pos = np.cumsum(ranked_labels)[run_ends]
    tpr = np.r_[0, true_pos] / positives
    fpr = np.r_[0, run_ends + 1 - true_pos] / negatives
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def _f1(true_pos: int, false_pos: int, false_neg: int) -> float:
    """F1 of one class; 0 for a class that is neither true nor predicted (weighted 0 anyway)."""
    denominator = 2 * true_pos + false_pos + false_neg
    return 2 * true_pos / denominator if denominator else 0.0


def thresholded_scores(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Weighted F1, accuracy and positive-class precision of 0/1 predictions.

    ``f1_weighted`` averages the F1 of classes 0 and 1 weighted by their true counts;
    ``precision`` is 0 when nothing is predicted positive (sklearn's default gives 0 with a warning).
    """
    positive, called = labels == 1, predicted == 1
    tp, fp = int((positive & called).sum()), int((~positive & called).sum())
    fn, tn = int((positive & ~called).sum()), int((~positive & ~called).sum())
    n = len(labels)
    weighted_f1 = ((tp + fn) * _f1(tp, fp, fn) + (tn + fp) * _f1(tn, fn, fp)) / n
    return {
        "f1_weighted": weighted_f1,
        "accuracy": (tp + tn) / n,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
    }


def label_metrics(labels: ArrayLike, probs: ArrayLike, threshold: float | None = None) -> dict[str, float]:
    """CT-CLIP's metrics for one pathology.

    Keys: ``auroc`` (NaN with one class), ``threshold`` (``threshold`` if given, else
    :func:`corner_threshold`), the :func:`thresholded_scores` at ``prob > threshold``
    (``f1_weighted``, ``accuracy``, ``precision``), ``support`` (positive cases) and ``n`` (cases).
    """
    y, p = _binary_pair(labels, probs)
    if threshold is None:
        threshold = corner_threshold(y, p)
    return {
        "auroc": auroc(y, p),
        "threshold": float(threshold),
        **thresholded_scores(y, (p > threshold).astype(np.int64)),
        "support": int(y.sum()),
        "n": int(y.size),
    }


def _label_matrix(labels: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(N, L)`` labels and probabilities; a 1-D pair is one label."""
    y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape or y.ndim not in (1, 2):
        raise ValueError(f"labels and probs must both be (N,) or (N, L), got {y.shape} and {p.shape}")
    return y.reshape(len(y), -1), p.reshape(len(p), -1)


def zero_shot_metrics(
    labels: ArrayLike,
    probs: ArrayLike,
    names: Sequence[str],
    thresholds: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Per-label :func:`label_metrics` and their means, for ``(N, L)`` labels and P(present).

    Returns ``{"per_label": {name: metrics}, "mean": {score: value}, "auroc_labels": k}``. The
    mean AUROC is over the ``k`` labels with both classes present (NaN when there are none); the
    other means are over all labels. ``thresholds`` (one per label) fixes the operating points;
    by default each label's :func:`corner_threshold` is used.
    """
    y, p = _label_matrix(labels, probs)
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} names for {y.shape[1]} label columns")
    if thresholds is not None and len(thresholds) != y.shape[1]:
        raise ValueError(f"{len(thresholds)} thresholds for {y.shape[1]} label columns")
    per_label = {
        name: label_metrics(y[:, j], p[:, j], None if thresholds is None else thresholds[j])
        for j, name in enumerate(names)
    }
    aurocs = [m["auroc"] for m in per_label.values() if not np.isnan(m["auroc"])]
    mean = {"auroc": float(np.mean(aurocs)) if aurocs else float("nan")}
    mean |= {key: float(np.mean([m[key] for m in per_label.values()])) for key in SCORE_NAMES[1:]}
    return {"per_label": per_label, "mean": mean, "auroc_labels": len(aurocs)}


def zero_shot_scores(
    labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, names: Sequence[str]
) -> dict[str, float]:
    """:func:`zero_shot_metrics` at fixed thresholds, flat: ``"<name>/<score>"`` and ``"mean/<score>"``.

    A :data:`MetricFn` for :func:`bootstrap_intervals` (bind ``names`` for other label sets).
    """
    result = zero_shot_metrics(labels, probs, names, thresholds)
    scores = {f"{name}/{key}": m[key] for name, m in result["per_label"].items() for key in SCORE_NAMES}
    scores |= {f"mean/{key}": value for key, value in result["mean"].items()}
    return scores


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile intervals: ``lower[key] <= point[key] <= upper[key]`` is typical, not guaranteed."""

    point: dict[str, float]  # metric_fn on the full set
    lower: dict[str, float]
    upper: dict[str, float]
    thresholds: np.ndarray  # per label, chosen once on the full set
    resamples: int  # resamples evaluated
    skipped: int  # resamples dropped because a label lost one of its classes


def _percentiles(values: list[float], level: float) -> tuple[float, float]:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[~np.isnan(finite)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_intervals(
    labels: ArrayLike,
    probs: ArrayLike,
    metric_fn: MetricFn,
    iterations: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Percentile bootstrap intervals of ``metric_fn`` over cases resampled with replacement.

    Thresholds are :func:`corner_threshold` on the full set, fixed for every resample (as in
    CT-CLIP). A resample in which a label that has both classes in the full set keeps only one
    is skipped (its AUROC is undefined) and counted in ``skipped``; labels with one class in the
    full set do not cause skips. Intervals are ``np.percentile`` (linear interpolation) at
    ``(1 - level) / 2`` and ``(1 + level) / 2`` of the evaluated resamples, ignoring NaN; NaN
    when nothing was evaluated. (CT-CLIP's ``compute_cis`` instead picks sorted values at
    ``int(0.025 n) - 1`` and ``int(0.975 n) - 1``.) Deterministic for a given ``seed``.
    """
    if iterations < 1 or not 0 < level < 1:
        raise ValueError(f"need iterations >= 1 and 0 < level < 1, got {iterations} and {level}")
    y, p = _label_matrix(labels, probs)
    thresholds = np.array([corner_threshold(y[:, j], p[:, j]) for j in range(y.shape[1])])
    point = dict(metric_fn(y, p, thresholds))
    must_keep_both = y.min(axis=0) != y.max(axis=0)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {key: [] for key in point}
    skipped = 0
    for _ in range(iterations):
        rows = rng.integers(0, len(y), size=len(y))
        y_boot = y[rows]
        if (y_boot.min(axis=0) == y_boot.max(axis=0))[must_keep_both].any():
            skipped += 1
            continue
        for key, value in metric_fn(y_boot, p[rows], thresholds).items():
            samples[key].append(value)
    bounds = {key: _percentiles(values, level) for key, values in samples.items()}
    return BootstrapResult(
        point=point,
        lower={key: low for key, (low, _) in bounds.items()},
        upper={key: high for key, (_, high) in bounds.items()},
        thresholds=thresholds,
        resamples=iterations - skipped,
        skipped=skipped,
    )
