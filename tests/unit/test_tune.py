"""Tuning: equal budgets, selection on validation only, resumable ask/tell replayed from the records."""
from __future__ import annotations

import math

import numpy as np
import pytest

from harness.suite import load_suite
from harness.tune import replay, tune, validation_score

SUITE = """
suite: tuned
seeds: [0, 1, 2]
dataset: {name: synthetic, params: {classes: 8, superclasses: 2, train_size: 64, val_size: 32, test_size: 32}}
model: {name: mlp, params: {hidden: 8}}
train: {epochs: 1, batch_size: 32}
eval: {k: [1, 2]}
tune: {budget: 6, sampler: SAMPLER, seeds: [0, 1], metric: top2, space: {lr: {log: [1.0e-4, 1.0e-1]}}}
losses:
  - softmax
  - {name: berrada_smooth, params: {k: 2}}
  - {name: lapin_svm_alpha, params: {k: 2}, tune: {space: {gamma: {choice: [0.0, 0.5, 1.0]}}}}
"""


def _plan(write_suite, sampler: str = "tpe", **replace):
    text = SUITE.replace("SAMPLER", sampler)
    for old, new in replace.items():
        text = text.replace(old, new)
    return load_suite(write_suite(text)).tune


def _val(spec) -> float:
    """A smooth validation score of the hyperparameters (peak at lr = 1e-2), plus a seed effect."""
    lr = spec.train["optimizer"]["lr"]
    return 0.8 - 0.1 * (math.log10(lr) + 2) ** 2 + 0.01 * spec.seed + 0.05 * spec.loss.params.get("gamma", 0.0)


class FakeRuns:
    """An in-memory run pool: `execute` writes records whose test numbers are what `test` says."""

    def __init__(self, test=lambda spec, val: 1.0 - val, status=lambda spec: "done", stop_after: int | None = None):
        self.records: dict[str, dict] = {}
        self.executed: list[str] = []
        self.batches = 0
        self.test, self.status, self.stop_after = test, status, stop_after

    def load(self, run_id: str) -> dict | None:
        return self.records.get(run_id)

    def execute(self, specs) -> None:
        if self.stop_after is not None and self.batches >= self.stop_after:
            raise KeyboardInterrupt  # the tune is killed here
        self.batches += 1
        for spec in specs:
            self.executed.append(spec.run_id)
            val = _val(spec)
            test = self.test(spec, val)
            metrics = {"val": {"best": {"top1": val - 0.2, "top2": val}, "last": {"top1": 0.0, "top2": 0.0}},
                       "test": {"best_val": {"top1": test - 0.2, "top2": test}, "last": {"top1": test, "top2": test}}}
            self.records[spec.run_id] = {"run_id": spec.run_id, "status": self.status(spec), "spec": spec.to_dict(),
                                         "metrics": metrics}


def _summary(tuners):
    return ([[(t.values, t.value) for t in tuner.trials] for tuner in tuners],
            [tuner.best().values for tuner in tuners], [[s.run_id for s in tuner.finals()] for tuner in tuners])


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid"])
def test_every_row_gets_exactly_the_budget_and_the_same_trials_every_time(write_suite, sampler):
    plan = _plan(write_suite, sampler)
    runs = FakeRuns()
    tuners = tune(plan, runs.load, runs.execute)
    assert [len(t.trials) for t in tuners] == [6, 6, 6]  # the baseline included
    dims = [[d.name for d in t.group.dims] for t in tuners]
    assert dims == [["label_smoothing", "lr"], ["alpha", "tau", "lr"], ["gamma", "lr"]]
    for tuner in tuners:
        for trial in tuner.trials:
            assert [s.seed for s in trial.specs] == [0, 1]  # trials run on tune.seeds only
            assert trial.specs[0].train["optimizer"]["lr"] == trial.values["lr"]
            assert trial.value == pytest.approx(np.mean([_val(s) for s in trial.specs]))
        assert [s.seed for s in tuner.finals()] == [0, 1, 2]  # the selection runs on every suite seed
    again = FakeRuns()
    assert _summary(tune(_plan(write_suite, sampler), again.load, again.execute)) == _summary(tuners)
    other = FakeRuns()
    reseeded = tune(_plan(write_suite, sampler, **{"seeds: [0, 1], metric": "seed: 7, seeds: [0, 1], metric"}),
                    other.load, other.execute)
    assert _summary(reseeded)[0] != _summary(tuners)[0]


def test_selection_reads_validation_only(write_suite):
    plan = _plan(write_suite)
    adversarial = FakeRuns(test=lambda spec, val: 1.0 - val)  # the best on test is the worst on validation
    tuners = tune(plan, adversarial.load, adversarial.execute)
    for tuner in tuners:
        best = max(tuner.trials, key=lambda t: (t.value, -t.number))
        assert tuner.best() is best
    rng = np.random.default_rng(0)
    noisy = FakeRuns(test=lambda spec, val: float(rng.uniform()))  # other test numbers, same validation
    assert _summary(tune(_plan(write_suite), noisy.load, noisy.execute)) == _summary(tuners)
    record = {"status": "done", "metrics": {"val": {"best": {"top2": 0.5}}, "test": {"best_val": {"top2": 0.9}}}}
    assert validation_score(record, "top2", "best") == 0.5
    assert validation_score({"status": "done", "metrics": {"test": {"best_val": {"top2": 0.9}}}}, "top2", "best") is None
    assert validation_score({**record, "status": "nan"}, "top2", "best") is None


def test_kill_half_way_then_resume_proposes_the_same_trials_and_selection(write_suite):
    full = FakeRuns()
    expected = _summary(tune(_plan(write_suite), full.load, full.execute))
    killed = FakeRuns(stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        tune(_plan(write_suite), killed.load, killed.execute)
    done_before = set(killed.records)
    assert 0 < len(done_before) < len(full.records)
    partial = replay(_plan(write_suite), killed.load)
    assert [len(t.trials) for t in partial] == [3, 3, 3] and all(t.best() is None for t in partial)
    killed.stop_after, killed.executed = None, []
    resumed = tune(_plan(write_suite), killed.load, killed.execute)
    assert _summary(resumed) == expected
    assert not done_before & set(killed.executed)  # finished trials are read back, never recomputed
    assert set(killed.records) == set(full.records)


def test_failed_trials_count_against_the_budget_and_are_never_selected(write_suite):
    plan = _plan(write_suite, "random")
    runs = FakeRuns(status=lambda spec: "nan" if spec.train["optimizer"]["lr"] > 3e-3 else "done")
    tuners = tune(plan, runs.load, runs.execute)
    for tuner in tuners:
        assert len(tuner.trials) == 6
        failed = [t for t in tuner.trials if t.values["lr"] > 3e-3]
        assert failed and all(t.value is None for t in failed)
        assert tuner.best().values["lr"] <= 3e-3
    # a dry run stops at the first failed trial (run would retry it); a report takes records as they are
    assert any(len(t.trials) < 6 for t in replay(plan, runs.load, retry=True))
    assert [len(t.trials) for t in replay(plan, runs.load, retry=False)] == [6, 6, 6]


def test_suite_space_overrides_and_when(write_suite):
    plan = _plan(write_suite, **{"{name: berrada_smooth, params: {k: 2}}":
                                 "{name: berrada_smooth, params: {k: 2, alpha: 1.0}, tune: {space: {tau: {log: [0.01, 0.1]}}}}"})
    dims = {d.name: d for d in plan.groups[1].dims}
    assert list(dims) == ["tau", "lr"] and (dims["tau"].space.low, dims["tau"].space.high) == (0.01, 0.1)
    transition = load_suite(write_suite(SUITE.replace("SAMPLER", "tpe").replace(
        "  - softmax\n", "  - {name: topk_transition, params: {k: 2, schedule: [linear, constant, adaptive]}}\n"),
        name="t.yaml")).tune
    names = [[d.name for d in g.dims] for g in transition.groups[:3]]
    assert names == [["start", "end", "lr"], ["lambda_value", "lr"], ["adaptive_target", "lr"]]


def test_tuned_leaderboard_one_row_per_loss_at_its_selection(write_suite, tmp_path):
    from harness import tune_report

    plan = _plan(write_suite)
    runs = FakeRuns()
    tuners = tune(plan, runs.load, runs.execute)
    eval_cfg = tuners[0].group.base.eval
    (board,), notes = tune_report.boards(plan, tuners, runs.records, eval_cfg)
    assert notes == [] and len(board.table) == 3
    table = board.table.set_index("loss")
    for tuner in tuners:
        row = table.loc[tuner.group.label]
        assert row["chosen (validation)"] == tune_report.format_values(tuner.best().values)
        assert row["trials"] == "6" and row["n"] == "3/3"
        tests = [runs.records[s.run_id]["metrics"]["test"]["best_val"]["top2"] * 100 for s in tuner.finals()]
        assert row["top-2 % ↑"] == f"{np.mean(tests):.2f} ± {np.std(tests, ddof=1):.2f}"
        assert board.seeds[tuner.group.label] == [0, 1, 2]  # paired comparisons downstream
    history = tmp_path / "h.png"
    assert tune_report.plot_history(tuners, plan, history, "t") and history.stat().st_size > 0
    partial = FakeRuns(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        tune(plan, partial.load, partial.execute)
    boards, notes = tune_report.boards(plan, replay(plan, partial.load, retry=False), partial.records, eval_cfg)
    assert boards == [] and len(notes) == 3 and "2/6 trials done" in notes[0]


def test_runs_claimed_by_another_runner_are_waited_for_not_failed(write_suite):
    full = FakeRuns()
    expected = _summary(tune(_plan(write_suite), full.load, full.execute))
    runs, held = FakeRuns(), {}

    def execute(specs):
        """The first time a run is asked for, another runner holds it (no record yet)."""
        mine = [s for s in specs if s.run_id in held]
        for s in specs:
            held.setdefault(s.run_id, True)
        runs.execute(mine)
        return {s.run_id for s in specs if s not in mine}

    assert _summary(tune(_plan(write_suite), runs.load, execute, poll_s=0.0)) == expected


def test_sampled_values_are_typed_like_the_parameter(write_suite):
    plan = _plan(write_suite, **{"gamma: {choice: [0.0, 0.5, 1.0]}": "gamma: {choice: [0, 1]}",
                                 "lr: {log: [1.0e-4, 1.0e-1]}": "lr: {choice: [1, 2]}"})
    spec = plan.groups[2].spec({"gamma": 1, "lr": 1}, seed=0)
    assert isinstance(spec.loss.params["gamma"], float) and isinstance(spec.train["optimizer"]["lr"], float)
    assert spec.run_id == plan.groups[2].spec({"gamma": 1.0, "lr": 1.0}, seed=0).run_id
