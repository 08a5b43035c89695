"""Rank statistics across problems (Demšar 2006) and the difference to a baseline with its CI.

Friedman's test is scipy's (`friedmanchisquare`, with its correction for ties); the Nemenyi post-hoc
test is scikit-posthocs' `posthoc_nemenyi_friedman` (two losses differ when their average ranks differ
by more than the critical difference CD = q_α/√2 · √(k(k+1)/(6N))). Confidence intervals of a difference
to the baseline are `harness.stats`' Student-t intervals: paired over the seeds both rows share when
there are at least two, Welch's otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scikit_posthocs as sp
from scipy import stats

from harness import stats as core_stats

ALPHA = 0.05
TIE_DECIMALS = 9  # means equal to this many decimals tie (seed means of equal accuracies differ by float noise)


def average_ranks(matrix: pd.DataFrame, higher_is_better: bool) -> tuple[pd.DataFrame, pd.Series]:
    """Per-problem ranks (1 = best, ties share the average rank) and their mean per loss, best first."""
    oriented = (-matrix if higher_is_better else matrix).round(TIE_DECIMALS)
    ranks = oriented.apply(lambda row: pd.Series(stats.rankdata(row.to_numpy()), index=row.index), axis=1)
    return ranks, ranks.mean(axis=0).sort_values(kind="stable")


@dataclass
class RankTest:
    """Friedman's test over N problems and k losses, Iman–Davenport's F, Nemenyi p-values and the CD."""

    n_problems: int
    n_losses: int
    chi2: float
    p_value: float
    iman_davenport_f: float
    iman_davenport_p: float
    nemenyi: pd.DataFrame  # loss × loss p-values
    cd: float


def critical_difference(k: int, n: int, alpha: float = ALPHA) -> float:
    """Nemenyi's critical difference for k losses over n problems (Demšar 2006, eq. in §3.2.2)."""
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(k * (k + 1) / (6 * n)))


def rank_test(matrix: pd.DataFrame) -> RankTest | str:
    """The tests on a complete problems × losses matrix, or why they cannot be run."""
    n, k = matrix.shape
    matrix = matrix.round(TIE_DECIMALS)
    if k < 3:
        return f"needs at least 3 losses present on every problem (have {k})"
    if n < 2:
        return f"needs at least 2 problems (have {n})"
    if (matrix.nunique(axis=1) == 1).all():
        return "finds every loss tied on every problem"
    chi2, p = stats.friedmanchisquare(*[matrix[c].to_numpy() for c in matrix.columns])
    chi2, p = float(chi2), float(p)
    denom = n * (k - 1) - chi2
    f = (n - 1) * chi2 / denom if denom > 0 else math.inf
    f_p = float(stats.f.sf(f, k - 1, (k - 1) * (n - 1))) if math.isfinite(f) else 0.0
    nemenyi = sp.posthoc_nemenyi_friedman(matrix.to_numpy())
    nemenyi.index = nemenyi.columns = list(matrix.columns)
    return RankTest(n, k, chi2, p, float(f), f_p, nemenyi, critical_difference(k, n))


@dataclass
class Difference:
    """mean(loss) − mean(baseline) with its 95 % CI; `method` says how it was computed."""

    diff: float
    low: float
    high: float
    method: str  # "paired", "welch" or "none" (fewer than 2 seeds)
    n: int

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0


def difference(values: dict[int, float], base: dict[int, float], confidence: float = 0.95) -> Difference:
    """Difference of a row to the baseline row, seeds given as {seed: value}: paired on the shared seeds
    when there are two or more, Welch otherwise (the intervals of ``harness.stats``)."""
    shared = sorted(set(values) & set(base))
    if len(shared) >= 2:
        c = core_stats.paired(np.array([values[s] for s in shared]), np.array([base[s] for s in shared]),
                              confidence=confidence)
        return Difference(c.diff, c.ci_low, c.ci_high, "paired", len(shared))
    a, b = np.array(list(values.values())), np.array(list(base.values()))
    if len(a) < 2 or len(b) < 2:
        delta = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
        return Difference(delta, math.nan, math.nan, "none", min(len(a), len(b)))
    c = core_stats.welch(a, b, confidence=confidence)
    return Difference(c.diff, c.ci_low, c.ci_high, "welch", min(len(a), len(b)))
