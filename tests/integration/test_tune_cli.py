"""A tuned suite end to end through the CLI: dry run, trials, selection, report, re-run computes nothing."""
from __future__ import annotations

from harness.cli import main
from harness.store import RunStore
from harness.suite import load_suite
from harness.tune import replay

TUNED = """
suite: tiny-tuned
seeds: [0, 1]
dataset: {name: synthetic, params: {classes: 8, superclasses: 2, modes: 2, dim: 4,
                                     train_size: 128, val_size: 64, test_size: 64}}
model: {name: mlp, params: {hidden: 8}}
train: {epochs: 1, batch_size: 64}
eval: {k: [1, 2], min_seeds: 2}
tune: {budget: 2, sampler: random, seeds: [0], metric: top2, space: {lr: {log: [1.0e-3, 1.0e-1]}}}
losses:
  - {name: softmax, tune: {space: {label_smoothing: null}}}
  - {name: berrada_smooth, params: {k: 2, alpha: 1.0}}
resources: {device: cpu, timeout_min: 5}
"""


def test_tuned_suite_end_to_end(write_suite, tmp_path, capsys):
    path = write_suite(TUNED)
    results = tmp_path / "results"
    assert main(["run", str(path), "--results-dir", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 trials each" in out and "next: missing" in out and "to propose: 1" in out
    assert "to select after 2 more trials" in out
    assert not (results / "tiny-tuned" / "runs").exists()  # a dry run computes nothing

    assert main(["run", str(path), "--results-dir", str(results)]) == 0
    capsys.readouterr()
    suite = load_suite(path)
    store = RunStore(results, suite.name)
    tuners = replay(suite.tune, store.load)
    assert [len(t.trials) for t in tuners] == [2, 2]
    finals = [s for t in tuners for s in t.finals()]
    assert len(finals) == 4 and all(store.status(s.run_id) == "done" for s in finals)
    trial_ids = {s.run_id for t in tuners for trial in t.trials for s in trial.specs}
    assert len({r["run_id"] for r in store.records()} - trial_ids) == 2  # seed 0 of a selection is its trial

    report = (results / "tiny-tuned" / "report.md").read_text()
    assert "budget 2 trials per row" in report and "chosen (validation)" in report
    for tuner in tuners:
        assert f"lr={tuner.best().values['lr']:.4g}" in report
    assert (results / "tiny-tuned" / "trials.csv").is_file()
    assert (results / "tiny-tuned" / "plots" / "tune-history-synthetic-mlp.png").is_file()
    assert (results / "tiny-tuned" / "plots" / "tune-sensitivity-synthetic-mlp.png").is_file()

    assert main(["run", str(path), "--results-dir", str(results), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "next:" not in listing and "to propose" not in listing and "8 done" in listing  # 4 trial rows + 4 final rows
    assert main(["run", str(path), "--results-dir", str(results)]) == 0
    assert "0 runs computed" in capsys.readouterr().out  # everything is read back from the records
