"""Bayes-optimal top-k accuracy of the synthetic generator (equal-weight isotropic Gaussian modes).

Test labels are clean and uniform over the C classes, and class c's density is the equal mixture
p(x | c) = (1/m) Σ_j N(x; μ_cj, σ²I). The clean-label posterior is therefore

    p(c | x) = softmax_c( logsumexp_j( −‖x − μ_cj‖² / (2σ²) ) )

(the shared normalising constants cancel; computed in float64). The top-k rule that maximises
expected top-k accuracy predicts the k classes of largest posterior, and its expected accuracy
*given the test inputs* is

    bayes_topk[k] = (1/N) Σ_i Σ_{c ∈ top-k of p(·|x_i)} p(c | x_i),

exact for the test split's inputs: no classifier of x has a higher expected top-k accuracy on them
(the expectation is over the test labels given the inputs). `realised` is the same rule scored on the
split's actual labels, and `se` its binomial standard error √(a(1−a)/N) — the sampling error with
which any model's test accuracy estimates its own expected accuracy. The input normalisation the
dataset applies afterwards is an invertible per-coordinate affine map, so it changes no posterior.
"""
from __future__ import annotations

import math

import torch

CHUNK = 8192
MAX_LISTED_K = 20


def posterior(x: torch.Tensor, centres: torch.Tensor, sigma: float) -> torch.Tensor:
    """p(c | x) [N, C] (float64) for uniform classes, equal-weight modes `centres` [C, m, d], std `sigma`."""
    c, m, d = centres.shape
    mu = centres.reshape(c * m, d).double()
    out = []
    for start in range(0, len(x), CHUNK):
        xb = x[start : start + CHUNK].double()
        d2 = (xb.pow(2).sum(1, keepdim=True) - 2 * xb @ mu.T + mu.pow(2).sum(1)).clamp_min(0)
        if sigma > 0:
            loglik = -d2 / (2 * sigma**2)
        else:  # σ = 0: each class is a set of points; the posterior is uniform over the classes hit
            loglik = torch.where(d2 <= 1e-18, 0.0, -math.inf).double()
        per_class = torch.logsumexp(loglik.view(-1, c, m), dim=2)
        out.append(torch.softmax(per_class, dim=1))
    return torch.cat(out)


def topk_rule(post: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(expected, realised) top-k accuracy curves, k = 1..C, of predicting the k most probable classes."""
    ordered, order = post.sort(dim=1, descending=True)
    expected = ordered.cumsum(1).mean(0)
    rank = (order == labels.view(-1, 1)).double().argmax(1)  # 0-based position of the true label
    realised = torch.bincount(rank, minlength=post.shape[1]).cumsum(0).double() / len(labels)
    return expected, realised


def macro_realised(post: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Bayes rule's class-averaged top-k curve on the split's labels (a guide: the rule maximises
    micro accuracy; with the test classes balanced in expectation the two nearly coincide)."""
    c = post.shape[1]
    rank = (post.argsort(1, descending=True) == labels.view(-1, 1)).double().argmax(1)
    hits = (rank.view(-1, 1) <= torch.arange(c).view(1, -1)).double()  # [N, C]: hit at k = col + 1
    per_class = torch.zeros(c, c, dtype=torch.float64).index_add_(0, labels, hits)
    seen = torch.bincount(labels, minlength=c).double()
    present = seen > 0
    return (per_class[present] / seen[present].view(-1, 1)).mean(0)


def bayes_reference(x: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, sigma: float) -> dict:
    """The `reference` info entry: Bayes-optimal test curves (expected, realised, macro) and their error."""
    post = posterior(x, centres, sigma)
    expected, realised = topk_rule(post, labels)
    macro = macro_realised(post, labels)
    n = len(labels)
    se = (realised * (1 - realised) / n).sqrt()
    r6 = lambda t: [round(float(v), 6) for v in t]  # noqa: E731
    k_max = min(MAX_LISTED_K, post.shape[1])
    return {
        "label": "Bayes optimum",
        "exact": True,
        "curve": r6(expected),
        "macro_curve": r6(macro),
        "realised_curve": r6(realised),
        "se": r6(se),
        "topk": {str(k): round(float(expected[k - 1]), 6) for k in range(1, k_max + 1)},
        "note": "expected top-k accuracy of the Bayes rule given the test inputs; see harness/data/bayes.py",
    }
