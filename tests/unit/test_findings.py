"""Generated findings: best per metric, differences from softmax beyond seed noise, trade-offs."""
from __future__ import annotations


import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from harness import findings, leaderboard
from harness.findings import board_findings
from harness.spec import Component, RunSpec

EVAL = {"k": [1, 5], "primary": "top1", "select": "best_val"}


def _spec(loss: str, seed: int) -> RunSpec:
    return RunSpec(Component(loss, 1, {}), Component("synthetic", 1, {}), Component("mlp", 1, {}),
                   {"epochs": 1}, EVAL, seed)


def _record(spec: RunSpec, top1: float, top5: float, status: str = "done") -> dict:
    test = {"top1": top1, "top5": top5, "k99": 7}
    return {"run_id": spec.run_id, "status": status, "spec": spec.to_dict(),
            "metrics": {"test": {"best_val": test, "last": test}}, "timings": {}}


def _board(rows: dict[str, list[tuple[float, float]]], failed: str | None = None):
    specs, records = [], {}
    for loss, values in rows.items():
        for seed, (top1, top5) in enumerate(values):
            spec = _spec(loss, seed)
            specs.append(spec)
            status = "nan" if loss == failed and seed == 0 else "done"
            records[spec.run_id] = _record(spec, top1, top5, status)
    (board,) = leaderboard.build(specs, records, EVAL)
    return board


NOISE = [0.004, -0.006, 0.001, 0.007, -0.003, -0.003]  # per-seed jitter so paired differences vary


def _rows(top1: float, top5: float, jitter: float = 1.0) -> list[tuple[float, float]]:
    return [(top1 + jitter * e, top5 + jitter * e * 0.5) for e in NOISE]


def test_better_worse_and_trade_off_against_softmax():
    board = _board({
        "softmax": _rows(0.60, 0.90),
        "topk_loss": _rows(0.50, 0.95, jitter=-1.3),  # trades top-1 for top-5
        "same": [(0.60 + e, 0.90 + e) for e in reversed(NOISE)],  # same means, independent noise
    })
    lines = board_findings(board)
    text = "\n".join(lines)
    assert "**top-1 % ↑**: best `softmax`" in text and "worse: `topk_loss` -10.00 [" in text
    assert "**top-5 % ↑**: best `topk_loss`" in text and "better than `softmax`: `topk_loss` +5.00 [" in text
    assert "paired t, Holm p=" in text
    assert "`same`" not in text  # within seed noise: never listed
    assert "**trade-off**" in text and "`topk_loss`" in text.split("**trade-off**")[1]
    assert "p=0 " not in text and "p=0)" not in text
    assert "**k@99 % ↓**" in text and "no difference from `softmax` survives Holm's correction" in text
    assert "Holm–Bonferroni" in lines[-1] and "6 comparisons" in lines[-1]  # 2 rows x (top1, top5, k99)


def test_findings_use_paired_tests_and_holm_over_the_table():
    board = _board({"softmax": _rows(0.60, 0.90), "topk_loss": _rows(0.50, 0.95, jitter=-1.3)})
    comps = findings.comparisons(board, findings.Settings())
    c = comps[("top1", "topk_loss")]
    a, b = board.values["topk_loss"]["top1"], board.values["softmax"]["top1"]
    raw = [stats.ttest_rel(board.values["topk_loss"][k], board.values["softmax"][k]).pvalue for k in ("top1", "top5")]
    assert c.test == "paired t" and c.p == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)
    holm = multipletests(raw + [1.0], method="holm")[1]  # k99 is identical on every seed: p = 1
    assert c.p_adj == pytest.approx(holm[0], rel=1e-12)
    assert comps[("k99", "topk_loss")].note == "identical on every seed"


def test_baseline_is_a_setting_and_min_seeds_blocks_claims():
    board = _board({"softmax": _rows(0.60, 0.90), "topk_loss": _rows(0.50, 0.95, jitter=-1.3)})
    text = "\n".join(board_findings(board, findings.Settings(baseline="topk_loss")))
    assert "better than `topk_loss`: `softmax` +10.00" in text
    few = _board({"softmax": _rows(0.60, 0.90)[:2], "topk_loss": _rows(0.50, 0.95, jitter=-1.3)[:2]})
    text = "\n".join(board_findings(few, findings.Settings(min_seeds=3)))
    assert "fewer than 3 seeds: no significance claim" in text and "worse" not in text
    table = findings.comparison_table(few, findings.Settings(min_seeds=3), "top1")
    assert list(table["p (Holm)"]) == ["—"] and table["Δ top-1 % ↑"][0] == "-9.77"  # seeds 0, 1 only
    absent = "\n".join(board_findings(board, findings.Settings(baseline="nope")))
    assert "no complete `nope` row" in absent


def test_unpaired_rows_use_welch():
    specs, records = [], {}
    for loss, seeds in (("softmax", range(6)), ("topk_loss", range(10, 16))):
        for i, seed in enumerate(seeds):
            spec = _spec(loss, seed)
            specs.append(spec)
            base = 0.6 if loss == "softmax" else 0.5
            records[spec.run_id] = _record(spec, base + NOISE[i], 0.9 + NOISE[i] / 2)
    (board,) = leaderboard.build(specs, records, EVAL)
    c = findings.comparisons(board, findings.Settings())[("top1", "topk_loss")]
    a, b = board.values["topk_loss"]["top1"], board.values["softmax"]["top1"]
    assert c.test == "Welch t" and c.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)


def test_incomplete_rows_are_not_compared():
    board = _board({"softmax": [(0.6, 0.9), (0.61, 0.91)], "broken": [(0.9, 0.99), (0.91, 0.99)]}, failed="broken")
    text = "\n".join(board_findings(board))
    assert "broken" not in text and "no other complete row to compare with" in text


def test_gap_to_the_reference_and_the_share_the_best_row_closes():
    import dataclasses

    board = _board({"softmax": _rows(0.60, 0.80), "topk_loss": _rows(0.50, 0.85)})
    assert not any("gap to the" in line for line in board_findings(board))  # no reference: no line
    ref = {"label": "Bayes optimum", "curve": [0.70, 0.8, 0.85, 0.88, 0.90], "exact": True}
    lines = board_findings(dataclasses.replace(board, reference=ref))
    (gap,) = [line for line in lines if "gap to the Bayes optimum" in line]
    # top-1: softmax is 10 points below 70 % and is the best row; top-5: 10 points below 90 %, and
    # topk_loss (85 %) closes half of it
    assert "top-1 10.00 points, no row beats it" in gap
    assert "top-5 10.00 points, best `topk_loss` closes 50 % of it" in gap
