"""`compare`: ranks, Friedman, Nemenyi and CD against a hand-worked example on committed records;
differences to the baseline against the t-interval formulas; profiles, Pareto fronts, record checks."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as ss

from harness.cli import main
from harness.compare import analysis, records, stats, tables
from harness.compare.records import Metric, load
from harness.errors import UserError

GRID = Path(__file__).parents[1] / "fixtures" / "compare" / "grid"
TOP1 = Metric("top1")
# tests/fixtures/compare/make_records.py: top-1 means (%) per problem (data_seed 0..3) and loss
A, B, C, D = "softmax", "berrada_smooth", "crammer_singer", "lapin_svm_beta"
# worked by hand (1 = best, ties share): P0 80,82,78,82 -> 3,1.5,4,1.5; P1 70,75,71,72 -> 4,1,3,2;
# P2 60,61,59,65 -> 3,2,4,1; P3 90,91,92,93 -> 4,3,2,1
HAND_RANKS = {A: [3, 4, 3, 4], B: [1.5, 1, 2, 3], C: [4, 3, 4, 2], D: [1.5, 2, 1, 1]}
HAND_AVG = {A: 3.5, B: 1.875, C: 3.25, D: 1.375}
# Friedman: 12N/(k(k+1)) (ΣR² − k(k+1)²/4) = 2.4 · (12.25 + 3.515625 + 10.5625 + 1.890625 − 25) = 7.725,
# tie-corrected (one pair of ties: 1 − (2³−2)/(N k (k²−1)) = 1 − 6/240) -> 7.725 / 0.975
HAND_CHI2 = 7.725 / 0.975
HAND_F = 3 * HAND_CHI2 / (4 * 3 - HAND_CHI2)  # Iman–Davenport: (N−1)χ² / (N(k−1) − χ²)
HAND_CD = 2.569 * math.sqrt(4 * 5 / (6 * 4))  # Demšar 2006, Table 5a: q_0.05 = 2.569 for k = 4


def softmax_record(runs: Path = GRID / "runs") -> dict:
    """A valid record of the fixture (the first softmax one by file name)."""
    for path in sorted(runs.glob("[0-9a-f]*.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:  # the fixture's torn file
            continue
        if isinstance(rec, dict) and rec.get("spec", {}).get("loss", {}).get("name") == "softmax":
            return rec
    raise AssertionError("no softmax record in the fixture")


@pytest.fixture(scope="module")
def sel():
    return load([str(GRID)], [TOP1, Metric("top5")])


@pytest.fixture(scope="module")
def cells(sel):
    return tables.cells_table(sel)


def test_ranks_friedman_and_nemenyi_equal_the_hand_worked_example(cells):
    mat, left_out = analysis.rank_inputs(cells, TOP1)
    assert set(left_out) == {"calibrated_hinge", "lapin_entropy", "difftopk[m=16]"}
    assert list(mat.index) == [f"grid · synthetic[data_seed={p}] · linear" for p in range(4)]
    ranks, avg = stats.average_ranks(mat, higher_is_better=True)
    for loss, expected in HAND_RANKS.items():
        assert ranks[loss].tolist() == expected
    assert avg.to_dict() == pytest.approx(HAND_AVG, abs=1e-12)
    assert list(avg.index) == [D, B, C, A]
    test = stats.rank_test(mat)
    assert test.chi2 == pytest.approx(HAND_CHI2, rel=1e-12)
    assert test.p_value == pytest.approx(ss.chi2.sf(HAND_CHI2, 3), rel=1e-9)
    assert test.iman_davenport_f == pytest.approx(HAND_F, rel=1e-12)
    assert test.cd == pytest.approx(HAND_CD, abs=1e-3)
    se = math.sqrt(4 * 5 / (6 * 4))
    for x, y in itertools.combinations(HAND_AVG, 2):
        diff = abs(HAND_AVG[x] - HAND_AVG[y])
        p = ss.studentized_range.sf(diff / se * math.sqrt(2), 4, np.inf)
        assert test.nemenyi.loc[x, y] == pytest.approx(p, rel=1e-6)
        assert (test.nemenyi.loc[x, y] < stats.ALPHA) == (diff > test.cd)


def test_rank_test_needs_two_problems_and_three_losses():
    one = pd.DataFrame([[1.0, 2.0, 3.0]], columns=list("abc"))
    assert "2 problems" in stats.rank_test(one)
    assert "3 losses" in stats.rank_test(pd.DataFrame([[1.0, 2.0], [2.0, 1.0]], columns=list("ab")))


def test_lower_is_better_metric_ranks_reversed():
    mat = pd.DataFrame({"a": [3.0, 5.0], "b": [4.0, 4.0]})
    _, avg = stats.average_ranks(mat, higher_is_better=False)
    assert avg.to_dict() == {"a": 1.5, "b": 1.5}
    _, avg = stats.average_ranks(pd.DataFrame({"a": [3.0, 3.0], "b": [4.0, 4.0]}), higher_is_better=False)
    assert avg.to_dict() == {"a": 1.0, "b": 2.0}


def test_paired_difference_is_the_t_interval_of_the_seed_differences():
    a, b = {0: 81.0, 1: 84.0, 2: 86.0}, {0: 80.0, 1: 82.0, 2: 82.0}  # differences 1, 2, 4
    d = stats.difference(a, b)
    diffs = np.array([1.0, 2.0, 4.0])
    half = ss.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
    assert d.method == "paired" and d.n == 3
    assert (d.diff, d.low, d.high) == pytest.approx((7 / 3, 7 / 3 - half, 7 / 3 + half), rel=1e-12)
    assert d.low < 0 and not d.significant  # 3 seeds this noisy: the CI still covers 0
    assert stats.difference({s: v + 5 for s, v in b.items()}, b).significant  # constant +5: a point CI


def test_welch_difference_when_seeds_are_not_shared():
    a, b = {0: 1.0, 1: 2.0, 2: 4.0}, {5: 0.0, 6: 3.0}
    d = stats.difference(a, b)
    va, vb = np.var([1, 2, 4], ddof=1) / 3, np.var([0, 3], ddof=1) / 2
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1)  # Welch–Satterthwaite
    half = ss.t.ppf(0.975, df) * math.sqrt(va + vb)
    delta = 7 / 3 - 1.5
    assert d.method == "welch"
    assert (d.low, d.high) == pytest.approx((delta - half, delta + half), rel=1e-10)
    assert not d.significant
    assert stats.difference({0: 1.0}, {0: 0.5}).method == "none"


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    acc, cost = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 30).astype(float)
    cost[3] = np.nan
    front = analysis.pareto(acc, cost)
    for i in range(30):
        beaten = any(acc[j] >= acc[i] and cost[j] <= cost[i] and (acc[j] > acc[i] or cost[j] < cost[i])
                     for j in range(30) if j != 3)
        assert front[i] == (not beaten and i != 3)


def test_performance_profile_counts_problems_within_tau(cells):
    prof = analysis.profiles(tables.wide(cells, TOP1), TOP1, taus=np.array([0.0, 1.0, 4.0, 100.0]))
    at = prof.set_index(["loss", "tau"])["fraction"]
    # best per problem: 82 (B, D), 75 (B), 65 (D), 93 (D)
    assert at[(D, 0.0)] == 0.75 and at[(B, 0.0)] == 0.5 and at[(A, 0.0)] == 0.0
    assert at[(B, 1.0)] == 0.5 and at[(B, 4.0)] == 1.0 and at[(A, 4.0)] == 0.5
    assert at[("difftopk[m=16]", 100.0)] == 0.25  # present on 1 of 4 problems: never more
    assert "calibrated_hinge" not in set(prof["loss"])  # no value anywhere


def test_cost_shows_a_loss_only_on_the_device_it_ran_on(cells):
    cost = analysis.cost_table(cells, TOP1)
    assert set(cost[cost["loss"] == "difftopk[m=16]"]["device"]) == {"GPU-B"}
    cpu = cost[cost["device"] == "CPU-A"].set_index("loss")
    assert set(cpu.index) == {A, B, C, D} and (cpu["problems"] == 3).all()
    assert cpu.loc[D, "mean"] == pytest.approx((82 + 72 + 65) / 3)
    # CPU-A, top-1 vs loss/CE: softmax (70.0, 1.0), crammer (69.3, 1.5), lapin_svm_beta (73.0, 2.0), berrada (72.7, 3)
    assert cpu["pareto_loss_vs_ce"].to_dict() == {A: True, B: False, C: False, D: True}


def test_records_left_out_are_listed_with_their_reason(sel):
    reasons = {Path(e.where).name if e.where.endswith(".json") else e.where: e.reason for e in sel.excluded}
    assert reasons["00000000000000aa.json"] == "not a JSON object (a list)"
    assert "unreadable JSON" in reasons["00000000000000bb.json"]
    assert any("is outside [0, 1]" in r for r in reasons.values())  # the pool's validation (harness.record)
    assert any("no metrics" in r for r in reasons.values())
    assert any("differs from the row's other seeds" in r for r in reasons.values())
    p1 = sel.problems[next(k for k, p in sel.problems.items() if "data_seed=1" in p.dataset)]
    assert not p1.cells["lapin_entropy"].complete
    p2 = sel.problems[next(k for k, p in sel.problems.items() if "data_seed=2" in p.dataset)]
    assert p2.cells["lapin_entropy"].why_missing() == "1 failed of 2 seeds"
    used = {r.run_id for _, _, r in sel.used_runs()}
    assert len(used) == 4 * 4 * 2 + 2  # the complete grid and the GPU-only difftopk row


def test_validate_rejects_bad_records():
    good = softmax_record()
    rid = good["run_id"]
    assert isinstance(records.validate(good, rid, [TOP1], None), records.Run)
    assert "does not match" in records.validate(good, "0" * 16, [TOP1], None)
    assert records.validate({**good, "status": "oom"}, rid, [TOP1], None) == "oom"
    assert "unknown status" in records.validate({**good, "status": "weird"}, rid, [TOP1], None)
    assert "invalid spec" in records.validate({**good, "spec": {"seed": 1}}, rid, [TOP1], None)
    nan = json.loads(json.dumps(good))
    nan["metrics"]["test"]["best_val"]["top1"] = float("nan")
    assert "lacks a finite" in records.validate(nan, rid, [TOP1], None)
    run = records.validate(good, rid, [Metric("k99")], "last")
    assert run.values == {"k99": 8.0}


def test_metric_names_are_checked():
    assert records.parse_metric("macro_top5").title == "macro top-5"
    with pytest.raises(UserError, match="not a metric"):
        records.parse_metric("top-5")


def test_cli_writes_the_report_from_the_committed_fixture(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(GRID), "--metric", "top1", "--metric", "top5", "--out", str(out)]) == 0
    for name in ("compare.md", "compare.html", "cells.csv", "runs.csv", "ranks.csv", "rank-tests.csv",
                 "nemenyi.csv", "profiles.csv", "cost.csv", "baseline.csv", "excluded.csv"):
        assert (out / name).stat().st_size > 0, name
    cells = pd.read_csv(out / "cells.csv")
    assert cells["mean"].dtype == float and cells["std"].dtype == float
    tests = pd.read_csv(out / "rank-tests.csv").set_index("metric")
    assert tests.loc["top1", "friedman_chi2"] == pytest.approx(HAND_CHI2)
    assert len(pd.read_csv(out / "excluded.csv")) == 5
    md = (out / "compare.md").read_text()
    assert "Best average rank at top-1: `lapin_svm_beta` (1.38 over 4 problem(s))" in md
    assert "**82.00 ± " in md  # best of a column in bold
    assert "| — |" in md  # missing cells shown as missing
    assert "`00000000000000aa.json`" in md or "00000000000000aa.json" in md
    html = (out / "compare.html").read_text()
    assert "data:image/png;base64," in html and "<script>" in html
    assert "http://" not in html and "https://" not in html and 'src="figures' not in html
    for fig in ("cd-top1", "profile-top1", "cost-top1-CPU-A", "cost-top1-GPU-B", "forest-top1"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 5000, fig


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "no such suite file or results folder" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2
    assert "no runs/ folder" in capsys.readouterr().err
    assert main(["compare", str(GRID), "--metric", "acc"]) == 2
    assert "not a metric" in capsys.readouterr().err


def test_plot_styles_are_distinct_and_curves_are_cut_where_every_row_saturates():
    from harness.compare.figures import distinct_styles
    from harness.report import saturation_k

    styles = distinct_styles(60)
    assert len({(s["color"], s["marker"], s["linestyle"]) for s in styles}) == 60
    curves = [np.array([0.5, 0.9, 0.996, 1.0, 1.0, 1.0]), np.array([0.2, 0.6, 0.9, 0.995, 1.0, 1.0])]
    assert saturation_k(curves, max_k=6) == 4
    assert saturation_k(curves, max_k=3) == 3
    assert saturation_k([np.array([0.5, 0.7])], max_k=20) == 2  # never saturates: the whole curve


def test_ties_everywhere_and_unusable_metrics_are_reported_not_computed(tmp_path, capsys):
    out = tmp_path / "k99"
    assert main(["compare", str(GRID), "--metric", "k99", "--metric", "top1", "--select", "last",
                 "--baseline", "nope", "--out", str(out)]) == 0  # k99 is 8 on every last-epoch record
    md = (out / "compare.md").read_text()
    assert "All 4 ranked losses tie at k@99 (average rank 2.50)" in md
    assert "(tied)" in md and "not computed: finds every loss tied on every problem" in md
    assert "No complete `nope` row to compare with at top-1." in md
    assert "model selection: `last`" in md and "mean over problems · top-1”: 77.00" in md
    assert main(["compare", str(GRID), "--metric", "top10", "--out", str(tmp_path / "x")]) == 2
    assert "most common reason: lacks a finite metrics.test.best_val.top10" in capsys.readouterr().err


def test_two_folders_of_the_same_name_are_told_apart_and_shared_runs_counted_once(tmp_path):
    import shutil

    for parent in ("a", "b"):
        shutil.copytree(GRID, tmp_path / parent / "grid")
    sel = load([str(tmp_path / "a" / "grid"), str(tmp_path / "b" / "grid")], [TOP1])
    assert sel.sources == ["grid", "b/grid"]
    assert len(sel.problems) == 4 and all(p.also_in == ["b/grid"] for p in sel.problems.values())
    assert len(sel.used_runs()) == 34


def test_a_second_run_of_the_same_loss_problem_and_seed_is_not_a_second_seed(tmp_path):
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(GRID, pool)
    rec = softmax_record(pool / "runs")
    twin = dict(rec, run_id="1234567890abcdef", spec=dict(rec["spec"], eval={"k": [1, 5, 10]}))
    (pool / "runs" / "1234567890abcdef.json").write_text(json.dumps(twin))
    sel = load([str(pool)], [TOP1])
    assert len(sel.used_runs()) == 34
    assert any("the same loss, problem and seed as run" in e.reason for e in sel.excluded)
