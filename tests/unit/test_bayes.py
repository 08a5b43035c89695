"""Synthetic data's Bayes optimum: exact posterior, Monte-Carlo agreement, no model beats it; presets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from harness.data import synthetic
from harness.data.bayes import posterior, topk_rule
from harness.errors import DataError
from harness.registry import DATASETS

# Ambiguous enough that the Bayes top-1 is far from 1 (top-1 ≈ 0.5), small enough to be quick.
AMBIGUOUS = {"classes": 12, "superclass_sizes": [2, 4, 6], "modes": 3, "dim": 4, "superclass_spread": 3.0,
             "class_spread": 0.6, "sample_noise": 0.6, "overlap": 0.3, "noise": 0.0,
             "train_size": 6000, "val_size": 1000, "test_size": 3000}


def params(name: str = "synthetic", **kw) -> dict:
    return DATASETS.get(name).validate_params(kw)


def test_posterior_matches_scipy_mixture_densities():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 3, 2, generator=g)
    x = torch.randn(50, 2, generator=g) * 1.5
    sigma = 0.8
    post = posterior(x, centres, sigma).numpy()
    logpdf = np.array([[[multivariate_normal(mean=centres[c, j].numpy(), cov=sigma**2 * np.eye(2)).logpdf(xi)
                         for j in range(3)] for c in range(5)] for xi in x.numpy()])  # [N, C, m]
    log_class = logsumexp(logpdf, axis=2) - math.log(3)
    expected = np.exp(log_class - logsumexp(log_class, axis=1, keepdims=True))
    np.testing.assert_allclose(post, expected, rtol=1e-10, atol=1e-12)


def test_topk_rule_against_brute_force():
    post = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    expected, realised = topk_rule(post, labels)
    torch.testing.assert_close(expected, torch.tensor([0.6, 0.85, 1.0], dtype=torch.float64))
    torch.testing.assert_close(realised, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))


def test_bayes_topk_equals_a_monte_carlo_estimate_within_its_standard_error():
    p = params(**AMBIGUOUS)
    ref = DATASETS.get("synthetic").obj(seed=0, **p).info["reference"]
    centres, _ = synthetic._centres(p)
    g = torch.Generator().manual_seed(123)  # an independent, much larger sample from the same generator
    n, c, m = 200_000, p["classes"], p["modes"]
    y = torch.randint(c, (n,), generator=g)
    x = centres[y, torch.randint(m, (n,), generator=g)] + torch.randn(n, p["dim"], generator=g) * p["sample_noise"]
    _, mc = topk_rule(posterior(x, centres, p["sample_noise"]), y)
    assert 0.3 < ref["curve"][0] < 0.8  # the case is ambiguous, so the check has teeth
    for k in (1, 2, 3, 5):
        a = ref["curve"][k - 1]
        # the split's expected accuracy varies with its inputs by at most the binomial error of N = 3000
        se = math.sqrt(a * (1 - a) / p["test_size"] + a * (1 - a) / n)
        assert abs(a - float(mc[k - 1])) < 4 * se, (k, a, float(mc[k - 1]), se)
        assert abs(ref["realised_curve"][k - 1] - a) < 4 * math.sqrt(a * (1 - a) / p["test_size"]) + 1e-9


def test_a_trained_model_does_not_beat_the_bayes_optimum():
    p = params(**AMBIGUOUS)
    data = DATASETS.get("synthetic").obj(seed=0, **p)
    ref = data.info["reference"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(p["dim"], 64), torch.nn.ReLU(), torch.nn.Linear(64, p["classes"]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only waits (and spins on a loaded machine)
    try:
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(data.train.x), data.train.y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        scores = model(data.test.x)
    rank = (scores >= scores.gather(1, data.test.y.view(-1, 1))).sum(1)
    n = len(data.test)
    for k in (1, 2, 3, 5):
        acc, bayes = float((rank <= k).double().mean()), ref["curve"][k - 1]
        assert acc <= bayes + 3 * math.sqrt(bayes * (1 - bayes) / n) + 1e-9, (k, acc, bayes)
        assert acc > bayes - 0.15  # it did learn: the bound is close, not vacuous
    assert ref["se"][0] == pytest.approx(math.sqrt(ref["realised_curve"][0] * (1 - ref["realised_curve"][0]) / n),
                                         abs=1e-6)


def test_new_parameters_keep_the_original_data_and_run_ids():
    base = params(classes=8, superclasses=2)
    old_entry = {k: v for k, v in base.items() if k not in ("superclass_sizes", "overlap", "long_tail")}
    identity = DATASETS.get("synthetic").identity_params(base)
    assert identity == old_entry  # defaults of added parameters stay out of the run id
    assert DATASETS.get("synthetic").identity_params({**base, "overlap": 0.5})["overlap"] == 0.5
    a = DATASETS.get("synthetic").obj(seed=0, **base)
    g = torch.Generator().manual_seed(0)  # the generator's original recipe, step by step
    sup = torch.arange(8) * 2 // 8
    sc = torch.randn(2, 16, generator=g) * 4.0
    centres = sc[sup].unsqueeze(1) + torch.randn(8, 3, 16, generator=g)
    y = torch.randint(8, (4000,), generator=g)
    mode = torch.randint(3, (4000,), generator=g)
    x = centres[y, mode] + torch.randn(4000, 16, generator=g) * 0.7
    assert torch.equal(a.train.y, y)
    torch.testing.assert_close(a.train.x, (x - x.mean(0)) / x.std(0))


def test_hard_preset_has_mixed_overlapping_groups_larger_than_k():
    p = params("synthetic_hard")
    sizes = p["superclass_sizes"]
    assert sum(sizes) == p["classes"] and len(set(sizes)) > 3 and sum(s > 5 for s in sizes) >= len(sizes) // 2
    assert p["overlap"] > 0
    centres, _ = synthetic._centres(p)
    assert centres.shape == (p["classes"], p["modes"], p["dim"])


def test_long_tail_synthetic_and_too_little_data():
    p = params(classes=10, superclasses=2, train_size=5000, long_tail=10.0)
    data = DATASETS.get("synthetic").obj(seed=0, **p)
    counts = torch.bincount(data.train.y, minlength=10)
    assert counts[0] == 500 and counts[-1] == 50 and data.class_counts == counts.tolist()
    assert (counts[:-1] >= counts[1:]).all()
    assert len(data.test) == 2000 and torch.bincount(data.test.y).min() > 150  # test stays balanced
    with pytest.raises(DataError, match="empty"):
        synthetic.validate(params(classes=10, superclasses=2, train_size=50, long_tail=10.0))
    with pytest.raises(DataError, match="summing to classes"):
        synthetic.validate(params(classes=10, superclass_sizes=[3, 3]))
