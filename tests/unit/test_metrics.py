"""Top-k metrics against a plain numpy reference, ties included."""
import numpy as np
import torch

from harness.metrics import k_for_accuracy, per_class_topk, summarize, topk_curve, true_label_rank


def numpy_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Pessimistic rank: 1 + number of other classes scoring >= the true class."""
    ranks = []
    for s, y in zip(scores, labels):
        ranks.append(1 + sum(1 for j in range(len(s)) if j != y and s[j] >= s[y]))
    return np.array(ranks)


def test_rank_matches_numpy_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(300, 7)).astype(np.float32)  # many ties
    labels = rng.integers(0, 7, size=300)
    got = true_label_rank(torch.from_numpy(scores), torch.from_numpy(labels)).numpy()
    np.testing.assert_array_equal(got, numpy_rank(scores, labels))


def test_constant_scores_rank_last():
    scores = torch.zeros(4, 5)
    assert true_label_rank(scores, torch.tensor([0, 1, 2, 4])).tolist() == [5, 5, 5, 5]


def test_curve_k99_and_macro_against_reference():
    rng = np.random.default_rng(1)
    n = 10
    scores = rng.normal(size=(500, n))
    labels = rng.integers(0, n, size=500)
    ranks = numpy_rank(scores, labels)
    curve = topk_curve(ranks, n)
    for k in range(1, n + 1):
        assert curve[k - 1] == np.mean(ranks <= k)
    assert curve[-1] == 1.0
    expected_k99 = min(k for k in range(1, n + 1) if np.mean(ranks <= k) >= 0.99)
    assert k_for_accuracy(curve) == expected_k99
    macro = np.mean([np.mean(ranks[labels == c] <= 3) for c in range(n) if (labels == c).any()])
    assert abs(per_class_topk(ranks, labels, 3, n) - macro) < 1e-12
    summary = summarize(ranks, labels, n, [1, 3])
    assert summary["top1"] == np.mean(ranks == 1) and summary["k99"] == expected_k99
    assert len(summary["curve"]) == n


def test_k99_when_never_reached_is_num_classes():
    assert k_for_accuracy(np.array([0.1, 0.5, 0.98])) == 3
