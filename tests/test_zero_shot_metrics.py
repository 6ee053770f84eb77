"""CT-CLIP-style zero-shot metrics, bootstrap, report->volume recall and linear probing, by hand."""

from __future__ import annotations

import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    auc,
    confusion_matrix,
    f1_score,
    precision_score,
    roc_auc_score,
    roc_curve,
)
from sklearn.preprocessing import StandardScaler

from med3dvlm.data.releases.ctrate.layout import CTRATE_LABELS
from med3dvlm.metrics import ctclip_retrieval
from med3dvlm.metrics.ctclip_retrieval import own_positions, report_to_volume_recall
from med3dvlm.metrics.linear_probe import linear_probe
from med3dvlm.metrics.zero_shot import (
    SINGLE_CLASS_THRESHOLD,
    THRESHOLD_GRID,
    bootstrap_intervals,
    corner_threshold,
    label_metrics,
    present_probability,
    thresholded_scores,
    zero_shot_metrics,
    zero_shot_prompts,
    zero_shot_scores,
)

# Two negatives, two positives. Over the grid t = k/99 (predict prob > t):
#   k 0..9   (t < 0.1):        all positive          TPR 1,   FPR 1   -> d = 1
#   k 10..39 (0.101..0.394):   0.4, 0.6, 0.8         TPR 1,   FPR 1/2 -> d = 1/2
#   k 40..59 (0.404..0.596):   0.6, 0.8              TPR 1/2, FPR 1/2 -> d = sqrt(1/2)
#   k 60..79 (0.606..0.798):   0.8                   TPR 1/2, FPR 0   -> d = 1/2
#   k 80..99 (t >= 0.808):     none                  TPR 0,   FPR 0   -> d = 1
# d = 1/2 ties between k = 10..39 and 60..79; the tie goes to the largest: k = 79.
TIE_LABELS = np.array([0, 0, 1, 1])
TIE_PROBS = np.array([0.1, 0.6, 0.4, 0.8])


def test_labels_are_ctrate_columns_in_order():
    assert len(CTRATE_LABELS) == len(set(CTRATE_LABELS)) == 18
    assert CTRATE_LABELS[:3] == ("Medical material", "Arterial wall calcification", "Cardiomegaly")
    assert CTRATE_LABELS[9] == "Lung nodule"
    assert CTRATE_LABELS[-1] == "Interlobular septal thickening"


def test_prompts():
    assert zero_shot_prompts("Cardiomegaly") == ("Cardiomegaly is present.", "Cardiomegaly is not present.")


def test_present_probability_is_the_pair_softmax():
    logits = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    expected = torch.softmax(logits, dim=1)[:, 0].numpy()
    np.testing.assert_allclose(present_probability(logits[:, 0], logits[:, 1]), expected, rtol=1e-12)
    # softmax([2, 0])[0] = e^2 / (e^2 + 1) = 1 / (1 + e^-2)
    assert float(present_probability(2.0, 0.0)) == pytest.approx(1 / (1 + math.exp(-2)))
    assert float(present_probability(3.0, 3.0)) == 0.5
    # a naive exp overflows here (inf / inf = NaN)
    assert present_probability([1000.0, -1000.0], [-1000.0, 1000.0]).tolist() == [1.0, 0.0]


def test_corner_threshold_tie_goes_to_the_larger_threshold():
    assert corner_threshold(TIE_LABELS, TIE_PROBS) == THRESHOLD_GRID[79]
    assert THRESHOLD_GRID[79] == pytest.approx(79 / 99)


def test_corner_threshold_prediction_is_strict():
    # The positive's probability IS grid value 33. For k <= 32, 0.0 > t is false and p > t is
    # true: TPR 1, FPR 0, d = 0. At k = 33, p > p is false: TPR 0, d = 1. So the last d = 0 is
    # k = 32; with ">=" it would be k = 33 (and at k = 0 the negative would count as positive).
    probs = np.array([0.0, THRESHOLD_GRID[33]])
    assert corner_threshold([0, 1], probs) == THRESHOLD_GRID[32]


def _reference_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The described rule as a plain loop over the grid with a confusion matrix."""
    best_threshold, best_distance = 0.0, 10000.0
    for threshold in np.linspace(0, 1, 100):
        predicted = (probs > threshold).astype(int)
        tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
        distance = math.sqrt((1 - tp / (tp + fn)) ** 2 + (fp / (fp + tn)) ** 2)
        if distance <= best_distance:
            best_distance, best_threshold = distance, threshold
    return float(best_threshold)


@pytest.mark.parametrize("seed", range(12))
def test_corner_threshold_matches_the_loop(seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    labels[:2] = (0, 1)
    # probabilities on the grid itself and on a coarse grid: ties everywhere, and values equal to t
    probs = np.where(
        rng.random(40) < 0.5, THRESHOLD_GRID[rng.integers(0, 100, 40)], rng.integers(0, 6, 40) / 5
    )
    assert corner_threshold(labels, probs) == _reference_threshold(labels, probs)


@pytest.mark.parametrize("value", [0, 1])
def test_corner_threshold_single_class_falls_back(value: int):
    assert corner_threshold(np.full(5, value), np.linspace(0.1, 0.9, 5)) == SINGLE_CLASS_THRESHOLD == 0.5


def test_label_metrics_by_hand():
    metrics = label_metrics(TIE_LABELS, TIE_PROBS)
    # AUROC: positive-negative pairs (0.4, 0.1) yes, (0.4, 0.6) no, (0.8, 0.1) yes, (0.8, 0.6) yes: 3/4
    assert metrics["auroc"] == pytest.approx(0.75)
    assert metrics["threshold"] == THRESHOLD_GRID[79]
    # prob > 0.798: predictions [0, 0, 0, 1] against labels [0, 0, 1, 1]
    # class 1: P = 1/1, R = 1/2, F1 = 2 * 1/2 / (3/2) = 2/3
    # class 0: P = 2/3, R = 2/2, F1 = 2 * (2/3) / (5/3) = 4/5
    # weighted by support (2, 2): (2/3 + 4/5) / 2 = 11/15
    assert metrics["f1_weighted"] == pytest.approx(11 / 15)
    assert metrics["accuracy"] == pytest.approx(3 / 4)
    assert metrics["precision"] == pytest.approx(1.0)
    assert (metrics["support"], metrics["n"]) == (2, 4)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_sklearn_on_planted_probabilities(seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 80)
    probs = np.clip(0.35 * labels + rng.normal(0.35, 0.2, 80), 0, 1)  # clipping makes ties at 0 and 1
    probs[:20] = np.round(probs[:20], 1)  # more ties
    fpr, tpr, _ = roc_curve(labels, probs)
    value = label_metrics(labels, probs)["auroc"]
    assert value == pytest.approx(auc(fpr, tpr), abs=1e-12)
    assert value == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert 0.75 < value < 1.0


@pytest.mark.parametrize("seed", range(30))
def test_thresholded_scores_equal_sklearn(seed: int):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    # low and high rates make one-class labels and all-0 / all-1 predictions common
    labels = (rng.random(n) < rng.choice([0.0, 0.2, 0.5, 1.0])).astype(int)
    predicted = (rng.random(n) < rng.choice([0.0, 0.3, 0.7, 1.0])).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {
            "f1_weighted": f1_score(labels, predicted, average="weighted"),
            "accuracy": accuracy_score(labels, predicted),
            "precision": precision_score(labels, predicted),
        }
    assert thresholded_scores(labels, predicted) == pytest.approx(expected, abs=1e-12)


def test_precision_is_zero_without_positive_predictions():
    metrics = label_metrics([0, 1, 1], [0.1, 0.2, 0.3], threshold=0.9)
    assert metrics["precision"] == 0.0
    # all predicted 0: class 0 F1 = 2 * (1/3) * 1 / (4/3) = 1/2, class 1 F1 = 0; weights (1, 2) / 3
    assert metrics["f1_weighted"] == pytest.approx(1 / 6)


def test_zero_shot_metrics_means_skip_undefined_auroc():
    labels = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 1, 1]])
    probs = np.array([[0.1, 0.2, 0.9], [0.6, 0.9, 0.8], [0.4, 0.3, 0.7], [0.8, 0.7, 0.6]])
    result = zero_shot_metrics(labels, probs, names=("a", "b", "c"))
    # a is the hand-worked case (AUROC 3/4); b is perfectly ranked (1.0); c has one class (NaN)
    assert result["per_label"]["a"]["auroc"] == pytest.approx(0.75)
    assert result["per_label"]["b"]["auroc"] == pytest.approx(1.0)
    assert math.isnan(result["per_label"]["c"]["auroc"])
    assert result["per_label"]["c"]["threshold"] == SINGLE_CLASS_THRESHOLD
    assert result["auroc_labels"] == 2
    assert result["mean"]["auroc"] == pytest.approx((0.75 + 1.0) / 2)
    # c at 0.5: predictions [1, 1, 1, 1] all right -> accuracy 1; the accuracy mean covers all three
    accuracies = [result["per_label"][n]["accuracy"] for n in "abc"]
    assert result["per_label"]["c"]["accuracy"] == 1.0
    assert result["mean"]["accuracy"] == pytest.approx(sum(accuracies) / 3)
    with pytest.raises(ValueError, match="names"):
        zero_shot_metrics(labels, probs, names=("a", "b"))


def _planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two informative labels (AUROC about 0.85) and one constant label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (n, 3))
    labels[:, 2] = 0
    probs = np.clip(0.3 * labels + rng.uniform(0.1, 0.6, (n, 3)), 0, 1)
    return labels, probs


SCORES = partial(zero_shot_scores, names=("a", "b", "constant"))


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal dicts of floats, NaN equal to NaN."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_bootstrap_resamples_cases():
    labels, probs = _planted(200, seed=0)
    first = bootstrap_intervals(labels, probs, SCORES, iterations=100, seed=0)
    other = bootstrap_intervals(labels, probs, SCORES, iterations=100, seed=1)
    assert first.lower["mean/auroc"] != other.lower["mean/auroc"]
    assert first.upper["a/f1_weighted"] != other.upper["a/f1_weighted"]
    # the constant label has one class in the full set, so it never forces a skip
    assert (first.resamples, first.skipped) == (100, 0)
    np.testing.assert_array_equal(
        first.thresholds, [corner_threshold(labels[:, j], probs[:, j]) for j in range(3)]
    )
    for key in ("mean/auroc", "a/auroc", "b/f1_weighted", "a/accuracy"):
        # not degenerate (CT-CLIP's rows are all equal), and around the point estimate
        assert first.lower[key] < first.point[key] < first.upper[key]
        assert first.upper[key] - first.lower[key] < 0.25
    assert math.isnan(first.lower["constant/auroc"]) and math.isnan(first.upper["constant/auroc"])
    assert _same(first.point, SCORES(labels, probs, first.thresholds))


def test_bootstrap_skips_resamples_that_lose_a_class():
    # one positive in ten: a resample misses it with probability 0.9^10 = 0.349 -> ~70 of 200
    labels = np.array([0] * 9 + [1])
    probs = np.linspace(0.05, 0.95, 10)
    scores = partial(zero_shot_scores, names=("rare",))
    result = bootstrap_intervals(labels, probs, scores, iterations=200, seed=3)
    assert result.resamples + result.skipped == 200
    assert 40 < result.skipped < 100
    again = bootstrap_intervals(labels, probs, scores, iterations=200, seed=3)
    assert (again.lower, again.upper, again.skipped) == (result.lower, result.upper, result.skipped)
    assert result.lower["rare/auroc"] <= result.upper["rare/auroc"] == 1.0


def _reference_recall(text: np.ndarray, image: np.ndarray, k: int) -> float:
    """The CT-CLIP rule as a double loop: Python's stable sort, lower index first on ties."""
    hits = 0
    for i in range(len(text)):
        scores = [float(text[i] @ image[j]) for j in range(len(image))]
        order = sorted(enumerate(scores), key=lambda item: item[1], reverse=True)
        hits += i in [index for index, _ in order[:k]]
    return hits / len(text)


def test_report_to_volume_recall_with_planted_ties():
    # text = identity, so score[i, j] = image[j, i]: image = scores.T
    scores = np.array(
        [
            [1.0, 1.0, 1.0, 1.0],  # text 0: all tie, own index 0 first -> position 0
            [1.0, 1.0, 0.0, 0.0],  # text 1: tied with volume 0, which comes first -> position 1
            [0.0, 0.0, 0.5, 0.5],  # text 2: tied with volume 3, which comes after -> position 0
            [1.0, 1.0, 1.0, 1.0],  # text 3: all tie, three lower indices first -> position 3
        ]
    )
    text, image = np.eye(4), scores.T
    assert own_positions(text, image).tolist() == [0, 1, 0, 3]
    recall = report_to_volume_recall(text, image, ks=(1, 2, 3, 4, 10))
    # K=1: texts 0, 2; K=2, 3: + text 1; K=4: all; K=10 > N uses all 4 volumes
    assert recall == {1: 0.5, 2: 0.75, 3: 0.75, 4: 1.0, 10: 1.0}
    assert recall == {k: _reference_recall(text, image, k) for k in (1, 2, 3, 4)} | {10: 1.0}


def test_report_to_volume_recall_equals_the_loop(monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(7)
    # small integer vectors: many exactly equal dot products
    text = rng.integers(-1, 2, (60, 4)).astype(np.float32)
    image = text + rng.integers(-1, 2, (60, 4)) * (rng.random((60, 1)) < 0.5)
    expected = {k: _reference_recall(text, image, k) for k in (1, 5, 10, 30)}
    assert report_to_volume_recall(text, image, ks=(1, 5, 10, 30)) == pytest.approx(expected, abs=0)
    monkeypatch.setattr(ctclip_retrieval, "_CHUNK", 7)  # chunk boundaries inside the matrix
    chunked = report_to_volume_recall(torch.from_numpy(text), torch.from_numpy(image), ks=(1, 5, 10, 30))
    assert chunked == pytest.approx(expected, abs=0)
    assert 0 < expected[1] < expected[5] < expected[30] < 1
    with pytest.raises(ValueError, match="at least 1"):
        report_to_volume_recall(text, image, ks=(0,))


def _probe_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Feature 0 separates label 0 with a gap of 2; label 1 is a coin flip."""
    features = rng.normal(size=(n, 8))
    separable = features[:, 0] > 0
    features[:, 0] += np.where(separable, 1.0, -1.0)
    labels = np.column_stack([separable, rng.integers(0, 2, n), rng.integers(0, 2, n), rng.integers(0, 2, n)])
    return features, labels.astype(int)


def test_linear_probe_separates_planted_label_and_not_noise():
    rng = np.random.default_rng(0)
    (x_train, y_train), (x_test, y_test) = _probe_data(300, rng), _probe_data(400, rng)
    y_train[:, 2] = 0  # one class in train
    y_test[:, 3] = 1  # one class in test
    names = ("separable", "noise", "train_constant", "test_constant")
    result = linear_probe(x_train, y_train, x_test, y_test, names)
    assert result["auroc"]["separable"] == 1.0
    assert abs(result["auroc"]["noise"] - 0.5) < 0.1
    assert set(result["skipped"]) == {"train_constant", "test_constant"}
    assert "train" in result["skipped"]["train_constant"] and "test" in result["skipped"]["test_constant"]
    assert result["mean_auroc"] == pytest.approx((1.0 + result["auroc"]["noise"]) / 2)
    assert linear_probe(x_train, y_train, x_test, y_test, names) == result


def _noise_auroc(x_train, y_train, x_test, y_test, scaler_data: np.ndarray) -> float:
    scaler = StandardScaler().fit(scaler_data)
    probe = LogisticRegression(max_iter=1000, random_state=0).fit(scaler.transform(x_train), y_train[:, 1])
    return float(roc_auc_score(y_test[:, 1], probe.predict_proba(scaler.transform(x_test))[:, 1]))


def test_linear_probe_scaler_is_fit_on_train_only():
    rng = np.random.default_rng(1)
    (x_train, y_train), (x_test, y_test) = _probe_data(200, rng), _probe_data(200, rng)
    x_test = x_test * np.arange(1, 9) + 3.0  # test statistics unlike train's, per feature
    result = linear_probe(x_train, y_train, x_test, y_test, ("separable", "noise", "a", "b"))
    on_train = _noise_auroc(x_train, y_train, x_test, y_test, x_train)
    on_test = _noise_auroc(x_train, y_train, x_test, y_test, x_test)
    assert on_train != on_test  # the choice shows in the result
    assert result["auroc"]["noise"] == on_train
