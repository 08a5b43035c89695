"""Paired / Welch comparisons and Holm's correction against R's published output and statsmodels."""
from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from harness import stats

# R's `sleep` data (Student 1908): extra sleep of 10 patients under two drugs.
DRUG1 = np.array([0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0])
DRUG2 = np.array([1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4])


def test_paired_matches_r_and_statsmodels():
    c = stats.paired(DRUG1, DRUG2)
    # R: t.test(extra ~ group, data = sleep, paired = TRUE): t = -4.0621, df = 9, p = 0.002833,
    # 95 % CI -2.4598858 -0.7001142, mean difference -1.58
    assert c.test == "paired t" and c.diff == pytest.approx(-1.58)
    assert c.p == pytest.approx(0.002833, abs=5e-7)
    assert (c.ci_low, c.ci_high) == pytest.approx((-2.4598858, -0.7001142), abs=1e-7)
    d = DescrStatsW(DRUG1 - DRUG2)
    assert c.p == pytest.approx(d.ttest_mean(0)[1], rel=1e-10)
    assert (c.ci_low, c.ci_high) == pytest.approx(d.tconfint_mean(0.05), rel=1e-10)


def test_welch_matches_r_and_statsmodels():
    c = stats.welch(DRUG1, DRUG2)
    # R: t.test(extra ~ group, data = sleep): t = -1.8608, df = 17.776, p = 0.07939, CI -3.3654832 0.2054832
    assert c.test == "Welch t" and c.diff == pytest.approx(0.75 - 2.33)
    assert c.p == pytest.approx(0.07939, abs=5e-6)
    assert (c.ci_low, c.ci_high) == pytest.approx((-3.3654832, 0.2054832), abs=1e-7)
    cm = CompareMeans(DescrStatsW(DRUG1), DescrStatsW(DRUG2))
    assert c.p == pytest.approx(cm.ttest_ind(usevar="unequal")[1], rel=1e-10)
    assert (c.ci_low, c.ci_high) == pytest.approx(cm.tconfint_diff(0.05, usevar="unequal"), rel=1e-10)


def test_compare_pairs_by_seed_and_falls_back_to_welch():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=5), rng.normal(size=5)
    perm = np.array([3, 0, 4, 1, 2])
    shuffled = stats.compare(a[perm], list(perm), b, [0, 1, 2, 3, 4])  # values listed in another seed order
    assert shuffled == stats.paired(a, b)
    other = stats.compare(a, [0, 1, 2, 3, 4], b, [5, 6, 7, 8, 9])
    assert other == stats.welch(a, b) and other.test == "Welch t"


def test_no_spread_is_said_plainly_never_p_zero():
    base = np.array([0.60, 0.61, 0.59])
    same = stats.paired(base + 0.1, base)  # +0.1 on every seed: t is undefined
    assert same.note == "the same difference on every seed" and same.test == "sign test"
    assert same.diff == pytest.approx(0.1) and same.ci_low == same.ci_high == same.diff
    assert same.p == pytest.approx(0.25) and same.p > 0  # exact two-sided sign test, 3 of 3 positive
    equal = stats.paired(base, base)
    assert equal.note == "identical on every seed" and equal.p == 1.0
    constant = stats.welch(np.array([7.0, 7.0, 7.0]), np.array([6.0, 6.0, 6.0]))
    assert constant.p == pytest.approx(0.1) and constant.note  # exact Mann-Whitney: 2 / C(6, 3)
    assert stats.format_p(1e-12) == "<1e-4" and stats.format_p(0.0123) == "0.012"


def test_below_min_seeds_no_claim():
    c = stats.paired(np.array([0.5, 0.7]), np.array([0.1, 0.2]), min_seeds=3)
    assert c.p is None and not c.claim_allowed and c.test == "none"
    assert c.ci_low < c.diff < c.ci_high  # the interval is still reported
    assert stats.welch(np.array([0.5, 0.7]), np.array([0.1, 0.2, 0.3]), min_seeds=3).p is None
    assert stats.paired(np.array([0.5, 0.7]), np.array([0.1, 0.2]), min_seeds=2).p is not None


def test_holm_matches_hand_computation_and_statsmodels():
    ps = [0.01, 0.04, 0.03, 0.005]
    comps = [stats.Comparison("paired t", 3, 3, 0.0, 0.0, 0.0, p) for p in ps]
    comps.insert(2, stats.Comparison("none", 2, 2, 0.0, 0.0, 0.0, None))  # no claim: left out of the family
    adjusted = [c.p_adj for c in stats.holm(comps)]
    # sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1 -> 0.02, 0.03, 0.06, max(0.06, 0.04)
    assert adjusted == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    expected = multipletests(ps, method="holm")[1]
    assert [q for q in adjusted if q is not None] == pytest.approx(expected, rel=1e-12)


def test_differences_equal_up_to_rounding_have_no_spread():
    # top-10 of the tuned synthetic table: one more correct test sample (of 5000) on every seed; the
    # per-seed percentages, means of 0/1 outcomes ×100, differ from 0.02 by ~1e-14 only
    a = np.array([4995, 4996, 4997]) / 5000 * 100
    b = np.array([4994, 4995, 4996]) / 5000 * 100
    assert np.ptp(a - b) > 0  # the rounding noise the old test missed
    c = stats.paired(a, b)
    assert c.test == "sign test" and c.note == "the same difference on every seed"
    assert c.diff == pytest.approx(0.02) and c.p == pytest.approx(0.25)  # never the spurious p < 1e-4
    noisy = np.array([7.0, 7.0 + 1e-13, 7.0 - 1e-13])
    w = stats.welch(noisy, np.array([6.0, 6.0, 6.0 + 1e-13]))
    assert w.test == "Mann-Whitney U" and w.diff == 1.0 and w.p == pytest.approx(0.1)
