"""Leaderboard aggregation: mean ± std over seeds, ranks, missing cells stay missing."""
from __future__ import annotations

import numpy as np

from harness import leaderboard
from harness.spec import Component, RunSpec

EVAL = {"k": [1, 5], "primary": "top1", "select": "best_val"}


def spec(loss: str, seed: int, **params) -> RunSpec:
    return RunSpec(Component(loss, 1, params), Component("synthetic", 1, {}), Component("mlp", 1, {}),
                   {"epochs": 1}, EVAL, seed)


def record(s: RunSpec, top1: float, status: str = "done") -> dict:
    test = {"top1": top1, "top5": 0.9, "k99": 7}
    return {"run_id": s.run_id, "status": status, "spec": s.to_dict(),
            "metrics": {"test": {"best_val": test, "last": test}, "curve_test_last": [top1, 0.9]},
            "timings": {"median_step_ms": 1.0, "loss_vs_ce": 2.0}}


def test_mean_std_rank_and_missing():
    a = [spec("softmax", s) for s in range(3)]
    b = [spec("softmax", s, label_smoothing=0.1) for s in range(3)]
    c = [spec("crammer_singer", s) for s in range(3)]
    recs = {s.run_id: record(s, v) for s, v in zip(a, [0.5, 0.6, 0.7])}
    recs.update({s.run_id: record(s, v) for s, v in zip(b, [0.8, 0.8, 0.8])})
    recs[c[0].run_id] = record(c[0], 0.99)
    recs[c[1].run_id] = record(c[1], 0.99, status="nan")  # c[2] missing
    (board,) = leaderboard.build(a + b + c, recs, EVAL)
    table = board.table.set_index("loss")
    assert list(board.table["loss"])[:2] == ["softmax[label_smoothing=0.1]", "softmax"]
    assert table.loc["softmax", "top-1 % ↑"] == f"60.00 ± {np.std([50, 60, 70], ddof=1):.2f}"
    assert table.loc["softmax", "rank"] == "2" and table.loc["softmax[label_smoothing=0.1]", "rank"] == "1"
    # a best-looking but incomplete row is not averaged over the seeds it has
    assert table.loc["crammer_singer", "top-1 % ↑"] == "—" and table.loc["crammer_singer", "rank"] == "—"
    assert table.loc["crammer_singer", "n"] == "1/3"
    assert any("1 missing, 1 nan of 3 seeds" in note for note in board.footnotes)
    assert set(board.curves) == {"softmax", "softmax[label_smoothing=0.1]"}


def test_reference_row_gap_columns_and_macro_for_long_tails():
    eval_cfg = {"k": [1, 5], "primary": "top1", "select": "best_val"}
    ref = {"label": "Bayes optimum", "curve": [0.8, 0.9, 0.95, 0.97, 0.99], "macro_curve": [0.7] * 5}

    def make(loss, seed, long_tail):
        return RunSpec(Component(loss, 1, {}), Component("synthetic", 1, {"long_tail": long_tail}),
                       Component("mlp", 1, {}), {"epochs": 1}, eval_cfg, seed)

    for long_tail in (1.0, 10.0):
        specs = [make("softmax", s, long_tail) for s in range(2)]
        recs = {}
        for s, top1 in zip(specs, [0.5, 0.7]):
            r = record(s, top1)
            r["metrics"]["test"]["best_val"].update(macro_top1=top1 - 0.1, macro_top5=0.8)
            r["data_info"] = {"reference": ref}
            recs[s.run_id] = r
        (board,) = leaderboard.build(specs, recs, eval_cfg, info={"softmax": {"chosen (validation)": "lr=0.01"}})
        table = board.table.set_index("loss")
        assert list(board.table["loss"]) == ["softmax", "*Bayes optimum*"]  # reference last, unranked
        assert table.loc["*Bayes optimum*", "rank"] == "ref"
        assert table.loc["*Bayes optimum*", "top-1 % ↑"] == "80.00"
        assert table.loc["*Bayes optimum*", "top-5 % ↑"] == "99.00"
        assert table.loc["softmax", "Δ ref top-1"] == "-20.00" and table.loc["softmax", "Δ ref top-5"] == "-9.00"
        assert set(board.values) == {"softmax"}  # the reference is no loss: findings never see it
        assert not board.table.isna().any().any()  # every cell of the reference row is filled
        assert table.loc["*Bayes optimum*", "chosen (validation)"] == "—"
        has_macro = "macro top-1 % ↑" in board.table.columns
        assert has_macro == (long_tail > 1)
        if has_macro:
            assert table.loc["softmax", "macro top-1 % ↑"].startswith("50.00")
            assert table.loc["*Bayes optimum*", "macro top-1 % ↑"] == "70.00"
    # no reference in the records: the fallback supplies it, or there is no row
    (board,) = leaderboard.build(specs[:1], {specs[0].run_id: record(specs[0], 0.5)}, eval_cfg)
    assert "*Bayes optimum*" not in list(board.table["loss"])
    (board,) = leaderboard.build(specs[:1], {specs[0].run_id: record(specs[0], 0.5)}, eval_cfg,
                                 reference_fallback=lambda ds: ref)
    assert list(board.table["loss"])[-1] == "*Bayes optimum*"
