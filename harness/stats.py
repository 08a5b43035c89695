"""Two-sample comparisons of per-seed scores, with confidence intervals and Holm's correction.

- Rows that ran on the same seeds (same initialisation and data order) are compared with a
  **paired** t-test on the per-seed differences; the 95 % CI is the t-interval of those differences.
- Rows without a common seed list are compared with **Welch's** t-test; the CI is the
  Welch–Satterthwaite interval of the difference of means.
- When the t statistic is undefined because there is no spread (the same difference on every seed,
  or both rows constant), the difference is reported as such and the p-value comes from the exact
  rank test that is still defined (sign test when paired, Mann–Whitney U otherwise) — never `p=0`.
- Below `min_seeds` no p-value is computed at all: the comparison makes no significance claim.
- p-values of one table are adjusted together with Holm–Bonferroni (statsmodels).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

CONFIDENCE = 0.95
SPREAD_TOLERANCE = 1e-9  # relative: a sample whose range is below this is constant


@dataclass(frozen=True)
class Comparison:
    """`a - b` for one metric: the difference of means, its CI and (when a claim is allowed) its p-value."""

    test: str  # "paired t" | "Welch t" | "sign test" | "Mann-Whitney U" | "none"
    n_a: int
    n_b: int
    diff: float
    ci_low: float
    ci_high: float
    p: float | None = None  # None: too few seeds, no claim
    p_adj: float | None = None  # Holm-adjusted, filled by holm()
    note: str = ""  # plain words for the degenerate cases ("the same difference on every seed")

    @property
    def claim_allowed(self) -> bool:
        return self.p is not None


def _quiet_t(fn, *args, **kwargs):
    with warnings.catch_warnings():  # nearly constant samples: scipy warns, the result is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


def _no_spread(x: np.ndarray) -> bool:
    """Constant up to float rounding: accuracies averaged from integer counts differ by ~1e-15 where
    they are equal, and a t-test on such a sample would report a spurious p < 1e-4."""
    return bool(np.ptp(x) <= SPREAD_TOLERANCE * max(1.0, float(np.abs(x).max())))


def paired(a: np.ndarray, b: np.ndarray, min_seeds: int = 3, confidence: float = CONFIDENCE) -> Comparison:
    """Paired comparison of `a - b`; `a[i]` and `b[i]` come from the same seed."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired samples need equal 1-d shapes, got {a.shape} and {b.shape}")
    d = a - b
    n, mean = len(d), float(d.mean())
    if n < 2 or _no_spread(d):
        # no spread: the t-interval degenerates to the point itself
        mean = float(np.median(d)) if abs(mean) > SPREAD_TOLERANCE else 0.0  # drop the rounding noise
        same = "identical on every seed" if mean == 0 else "the same difference on every seed"
        p = None
        if n >= min_seeds:
            p = 1.0 if mean == 0 else float(stats.binomtest(n, n, 0.5).pvalue)
        return Comparison("sign test" if p is not None else "none", n, n, mean, mean, mean, p, note=same)
    res = _quiet_t(stats.ttest_rel, a, b)
    ci = res.confidence_interval(confidence)
    p = float(res.pvalue) if n >= min_seeds else None
    return Comparison("paired t" if p is not None else "none", n, n, mean, float(ci.low), float(ci.high), p)


def welch(a: np.ndarray, b: np.ndarray, min_seeds: int = 3, confidence: float = CONFIDENCE) -> Comparison:
    """Welch comparison of `mean(a) - mean(b)` for samples that share no seeds."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 1 or b.ndim != 1 or len(a) == 0 or len(b) == 0:
        raise ValueError("Welch's test needs two non-empty 1-d samples")
    diff = float(a.mean() - b.mean())
    allowed = min(len(a), len(b)) >= min_seeds
    if len(a) < 2 or len(b) < 2:
        return Comparison("none", len(a), len(b), diff, math.nan, math.nan, None)
    if _no_spread(a) and _no_spread(b):
        a, b = np.full(len(a), np.median(a)), np.full(len(b), np.median(b))  # without the rounding noise
        diff = float(a[0] - b[0])
        note = "identical on every seed" if diff == 0 else "constant on every seed in both rows"
        p = None
        if allowed:
            p = 1.0 if diff == 0 else float(stats.mannwhitneyu(a, b, method="exact").pvalue)
        return Comparison("Mann-Whitney U" if p is not None else "none", len(a), len(b), diff, diff, diff, p,
                          note=note)
    res = _quiet_t(stats.ttest_ind, a, b, equal_var=False)
    ci = res.confidence_interval(confidence)
    p = float(res.pvalue) if allowed else None
    return Comparison("Welch t" if p is not None else "none", len(a), len(b), diff, float(ci.low), float(ci.high), p)


def compare(a: np.ndarray, seeds_a: list[int], b: np.ndarray, seeds_b: list[int],
            min_seeds: int = 3) -> Comparison:
    """Paired when both rows ran on the same seed list (values aligned by seed), Welch otherwise."""
    if len(seeds_a) == len(a) and len(seeds_b) == len(b) and sorted(seeds_a) == sorted(seeds_b) \
            and len(set(seeds_a)) == len(seeds_a):
        order_a, order_b = np.argsort(seeds_a), np.argsort(seeds_b)
        return paired(np.asarray(a)[order_a], np.asarray(b)[order_b], min_seeds)
    return welch(a, b, min_seeds)


def holm(comparisons: list[Comparison]) -> list[Comparison]:
    """Holm–Bonferroni over the comparisons that make a claim; the others are returned unchanged."""
    idx = [i for i, c in enumerate(comparisons) if c.p is not None]
    out = list(comparisons)
    if not idx:
        return out
    _, p_adj, _, _ = multipletests([comparisons[i].p for i in idx], method="holm")
    for i, q in zip(idx, p_adj):
        out[i] = replace(comparisons[i], p_adj=float(q))
    return out


def format_p(p: float) -> str:
    """A p-value as text; never `0` (values below 1e-4 print as `<1e-4`)."""
    return "<1e-4" if p < 1e-4 else f"{p:.2g}"
