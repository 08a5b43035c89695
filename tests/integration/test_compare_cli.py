"""`topk-bench compare` on suite files: the committed synthetic results, and suites with missing runs."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd

from harness.cli import main
from harness.store import RunStore
from harness.suite import load_suite

REPO = Path(__file__).parents[2]
SECOND = """
suite: tiny-b
seeds: [0, 1]
dataset: {name: synthetic, params: {classes: 10, superclasses: 2, modes: 2, dim: 4,
                                     train_size: 256, val_size: 128, test_size: 128}}
model: {name: mlp, params: {hidden: 16}}
train: {epochs: 2, batch_size: 64}
eval: {k: [1, 2, 5]}
losses:
  - softmax
  - {name: softmax, params: {label_smoothing: [0.1, 0.2]}}
resources: {device: cpu, timeout_min: 5}
"""


def test_compare_on_the_committed_synthetic_results(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(REPO / "suites" / "synthetic.yaml"), "--results-dir", str(REPO / "results"),
                 "--metric", "top1", "--metric", "top5", "--metric", "k99", "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    suite = load_suite(REPO / "suites" / "synthetic.yaml")  # every run of the suite is committed
    store = RunStore(REPO / "results", suite.name)
    done = [s for s in suite.runs if store.status(s.run_id) == "done"]
    assert len(done) == len(suite.runs) - 3  # soft_topk's three seeds ended `nan`
    assert f"{len(done)} records used; 0 left out" in md
    cells = pd.read_csv(out / "cells.csv")  # (runs / 3 seeds) rows × 3 metrics; the nan row is empty
    assert len(cells) == len(suite.runs) and cells["n"].isin([0, 3]).all() and (cells["n"] == 0).sum() == 3
    board = pd.read_csv(REPO / "results" / "synthetic" / "leaderboard-synthetic-mlp.csv")
    top1 = board.set_index("loss")["top1_mean"].round(2).dropna()  # the leaderboard CSV holds numbers
    ours = cells[cells["metric"] == "top1"].set_index("loss")["mean"].round(2)
    assert (ours.loc[top1.index] == top1).all()  # the same numbers as the suite's own leaderboard
    assert "needs at least 2 problems" in md  # one problem: no rank test, and it says so


def _softmax_record() -> dict:
    for path in sorted((REPO / "tests" / "fixtures" / "compare" / "grid" / "runs").glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:  # the fixture's torn file
            continue
        if isinstance(rec, dict) and rec.get("spec", {}).get("loss", {}).get("name") == "softmax":
            return rec
    raise AssertionError("no softmax record in the fixture")


def _fake_records(suite_path: Path, results: Path, skip: int = -1) -> None:
    template = _softmax_record()
    suite = load_suite(suite_path)
    store = RunStore(results, suite.name)
    for i, spec in enumerate(suite.runs):
        if i == skip:
            continue
        rec = copy.deepcopy(template)
        rec.update(run_id=spec.run_id, spec=spec.to_dict())
        rec["metrics"]["test"]["best_val"]["top1"] = 0.5 + 0.01 * i
        store.write(rec)


def test_compare_two_suites_with_a_missing_run_and_shared_runs(write_suite, tmp_path):
    a, b = write_suite(), write_suite(SECOND, "second.yaml")
    c = write_suite(a.read_text().replace("suite: tiny", "suite: tiny-c").split("losses:")[0]
                    + "losses: [softmax]\nresources: {device: cpu}\n", "third.yaml")
    results = tmp_path / "results"
    _fake_records(a, results, skip=3)
    _fake_records(b, results)
    _fake_records(c, results)  # the same runs as tiny's softmax row
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), str(c), str(a), "--results-dir", str(results), "--out", str(out)]) == 0
    md = (out / "compare.md").read_text()
    assert "2 problem(s); 10 records used" in md  # 6 + 4: the incomplete row's record is not used
    assert "row `softmax[label_smoothing=0.1]` left out: 1 missing of 2 seeds" in md
    assert "(the same runs also reached through tiny-c: counted once)" in md
    assert f"`{a}` was given more than once: read once" in md
    cells = pd.read_csv(out / "cells.csv")
    missing = cells[(cells["loss"] == "softmax[label_smoothing=0.1]") & cells["problem"].str.startswith("tiny ·")]
    assert missing["mean"].isna().all() and (missing["missing"] == "1 missing of 2 seeds").all()
    assert set(cells["problem"]) == {"tiny · synthetic · mlp", "tiny-b · synthetic · mlp"}


TUNED = """
suite: SUITE
seeds: [0, 1, 2]
dataset: {name: synthetic, params: {classes: 10, superclasses: 2, modes: 2, dim: 4,
                                     train_size: 256, val_size: 128, test_size: 128, noise: NOISE}}
model: {name: mlp, params: {hidden: 16}}
train: {epochs: 2, batch_size: 64, optimizer: {name: adam, lr: 1.0e-3}}
eval: {k: [1, 2]}
tune: {budget: 3, sampler: random, metric: top2, space: {lr: {log: [1.0e-4, 1.0e-1]}}}
losses:
  - softmax
  - {name: berrada_smooth, params: {k: 2}}
resources: {device: cpu, timeout_min: 5}
"""


def _tune_with_fake_records(suite_path: Path, results: Path) -> list:
    """Run the suite's tune with an executor that writes fixture-based records (validation and test
    scores that depend on the learning rate), and return its tuners."""
    from harness.tune import tune

    template = _softmax_record()
    suite = load_suite(suite_path)
    store = RunStore(results, suite.name)

    def execute(specs):
        for spec in specs:
            rec = copy.deepcopy(template)
            rec.update(run_id=spec.run_id, spec=spec.to_dict())
            score = 0.9 - 0.01 * abs(math.log10(spec.train["optimizer"]["lr"]) + 2) + 0.001 * spec.seed
            val = {"top1": score - 0.2, "top2": score, "k99": 3}
            rec["metrics"]["val"] = {"best": val, "last": val}
            rec["metrics"]["test"]["best_val"].update(top1=score - 0.25, top2=score - 0.05)
            store.write(rec)

    return tune(suite.tune, store.load, execute, poll_s=0.0)


def test_compare_tuned_suites_uses_the_selected_runs_one_cell_per_row(write_suite, tmp_path):
    results = tmp_path / "results"
    paths = [write_suite(TUNED.replace("SUITE", f"tuned-{i}").replace("NOISE", str(noise)), f"t{i}.yaml")
             for i, noise in enumerate([0.0, 0.2])]
    finals = {}
    for path in paths:
        for tuner in _tune_with_fake_records(path, results):
            finals[(path.name, tuner.group.label)] = [s.run_id for s in tuner.finals()]
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, paths), "--results-dir", str(results), "--metric", "top1",
                 "--out", str(out)]) == 0
    cells = pd.read_csv(out / "cells.csv")
    # one cell per tuned row and problem (not one per chosen learning rate), each from its 3 selected runs
    assert sorted(cells["loss"].unique()) == ["berrada_smooth[k=2]", "softmax"]
    assert len(cells) == 4 and (cells["n"] == 3).all()
    md = (out / "compare.md").read_text()
    assert "12 records used; 0 left out" in md  # 2 suites × 2 rows × 3 seeds; trials are not used
    assert len({rid for ids in finals.values() for rid in ids}) == 12
    assert main(["report", str(paths[0]), "--results-dir", str(results)]) == 0  # report reads the tune's records
    report = (results / "tuned-0" / "report.md").read_text()
    assert "budget 3 trials per row" in report and "| berrada_smooth[k=2]" in report
