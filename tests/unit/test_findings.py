"""Generated findings: best per metric, differences from softmax beyond seed noise, trade-offs."""
from __future__ import annotations

import numpy as np

from harness import leaderboard
from harness.findings import board_findings, welch_p
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


def test_welch_p_edge_cases():
    assert welch_p(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 1.0
    assert welch_p(np.array([2.0, 2.0]), np.array([1.0, 1.0])) == 0.0
    assert welch_p(np.array([1.0]), np.array([5.0, 6.0])) == 1.0  # one seed: no claim
    assert welch_p(np.array([0.50, 0.51, 0.49]), np.array([0.70, 0.71, 0.69])) < 0.01


def test_better_worse_and_trade_off_against_softmax():
    board = _board({
        "softmax": [(0.60, 0.90), (0.61, 0.91), (0.59, 0.89)],
        "topk_loss": [(0.50, 0.95), (0.51, 0.96), (0.49, 0.94)],  # trades top-1 for top-5
        "same": [(0.605, 0.905), (0.595, 0.895), (0.60, 0.90)],
    })
    text = "\n".join(board_findings(board))
    assert "**top-1 % ↑**: best `softmax`" in text and "worse: `topk_loss` -10.00" in text
    assert "**top-5 % ↑**: best `topk_loss`" in text and "better than `softmax`: `topk_loss` +5.00" in text
    assert "`same`" not in text  # within seed noise: never listed
    assert "**trade-off**" in text and "`topk_loss`" in text.split("**trade-off**")[1]


def test_incomplete_rows_are_not_compared():
    board = _board({"softmax": [(0.6, 0.9), (0.61, 0.91)], "broken": [(0.9, 0.99), (0.91, 0.99)]}, failed="broken")
    text = "\n".join(board_findings(board))
    assert "broken" not in text and "no loss differs from `softmax`" in text
