"""Linear probing of frozen image features on multi-label targets (e.g. CT-RATE's 18 labels).

One L2-regularised logistic regression per label on standardised features (the scaler is fit on
the training features only, so nothing about the test set leaks into the probe), scored by AUROC
on the test set. lbfgs is deterministic, so equal inputs give equal results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler


def _features(features: ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or Inf")
    return x


def _labels(labels: ArrayLike, rows: int, columns: int, name: str) -> np.ndarray:
    y = np.asarray(labels)
    y = y.reshape(len(y), -1) if y.ndim == 1 else y
    if y.shape != (rows, columns):
        raise ValueError(f"{name} must be ({rows}, {columns}), got {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{name} must be 0 or 1")
    return y.astype(np.int64)


def _single_class_split(train: np.ndarray, test: np.ndarray) -> str | None:
    """Why a label cannot be probed, or None."""
    if train.min() == train.max():
        return f"train has only class {train[0]}"
    if test.min() == test.max():
        return f"test has only class {test[0]}"
    return None


def linear_probe(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    names: Sequence[str],
    C: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Test AUROC of a per-label logistic-regression probe.

    Features are ``(N, D)``, labels ``(N, L)`` with 0/1 entries (``(N,)`` for one label) and
    ``len(names) == L``. Returns ``{"auroc": {name: value}, "mean_auroc": float, "skipped":
    {name: reason}}``: a label with one class in train or test is skipped (no probe can be fit or
    no AUROC exists) and left out of ``auroc`` and of the mean (NaN when every label is skipped).
    """
    x_train, x_test = _features(train_features, "train_features"), _features(test_features, "test_features")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train and test features differ in width: {x_train.shape[1]} vs {x_test.shape[1]}")
    y_train = _labels(train_labels, len(x_train), len(names), "train_labels")
    y_test = _labels(test_labels, len(x_test), len(names), "test_labels")
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    aurocs: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for j, name in enumerate(names):
        reason = _single_class_split(y_train[:, j], y_test[:, j])
        if reason is not None:
            skipped[name] = reason
            continue
        probe = LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(x_train, y_train[:, j])
        aurocs[name] = float(roc_auc_score(y_test[:, j], probe.predict_proba(x_test)[:, 1]))
    mean = float(np.mean(list(aurocs.values()))) if aurocs else float("nan")
    return {"auroc": aurocs, "mean_auroc": mean, "skipped": skipped}
