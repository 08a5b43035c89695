"""The committed suites: every one validates; the quickstart covers every family and runs end to end."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from harness.lossbench import load_bench_file
from harness.registry import LOSSES
from harness.suite import load_suite

SUITES = Path(__file__).resolve().parents[2] / "suites"
BENCH_FILES = sorted(SUITES.glob("lossbench*.yaml"))
RUN_SUITES = sorted(set(SUITES.glob("*.yaml")) - set(BENCH_FILES))


@pytest.mark.parametrize("path", RUN_SUITES, ids=lambda p: p.name)
def test_run_suite_validates(path, tmp_path, monkeypatch):
    if path.name == "imagenet-features.yaml":  # validation reads the class count from the user's file,
        (tmp_path / "suites").mkdir()     # found relative to the suite file: ../data/imagenet-features.npz
        path = Path(shutil.copy(path, tmp_path / "suites"))
        (tmp_path / "data").mkdir()
        labels = np.arange(100_000) % 1000  # the suite holds out 50 000: it needs at least twice that
        np.savez(tmp_path / "data" / "imagenet-features.npz", train_features=np.zeros((100_000, 4), np.float16),
                 train_labels=labels, val_features=np.zeros((1000, 4), np.float16), val_labels=labels[:1000])
    suite = load_suite(path)
    assert suite.runs and suite.name == path.stem


@pytest.mark.parametrize("path", BENCH_FILES, ids=lambda p: p.name)
def test_bench_file_validates(path):
    _bench, configs = load_bench_file(path)
    assert configs


def test_quickstart_covers_every_family_with_at_least_two_seeds():
    suite = load_suite(SUITES / "quickstart.yaml")
    families = {entry.family for entry in LOSSES.entries() if entry.available}
    assert {LOSSES.get(spec.loss.name).family for spec in suite.runs} == families
    assert len(suite.model.seeds) >= 2


def test_synthetic_has_every_loss_and_the_papers_difftopk_grid():
    suite = load_suite(SUITES / "synthetic.yaml")
    assert {spec.loss.name for spec in suite.runs} == {e.name for e in LOSSES.entries() if e.available}
    grid = {(s.loss.params["sorter"], tuple(s.loss.params["p_k"])) for s in suite.runs if s.loss.name == "difftopk"}
    sorters = {"neuralsort", "softsort", "sinkhorn", "odd_even", "bitonic", "splitter_selection"}
    p_ks = {(1, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0.5, 0, 0, 0, 0.5), (0.25, 0, 0, 0, 0.75), (0.2,) * 5}
    assert grid == {(s, p) for s in sorters for p in p_ks}
    assert len(suite.model.seeds) >= 3


def test_quickstart_end_to_end(tmp_path, capsys):
    """The README's first command, into a scratch results folder: every run done, a report written."""
    assert main(["run", str(SUITES / "quickstart.yaml"), "--results-dir", str(tmp_path)]) == 0
    report = (tmp_path / "quickstart" / "report.md").read_text()
    assert "0 missing" in report and "What this table shows" in report
    assert "not done (none)" in capsys.readouterr().out


def test_synthetic_tuned_tunes_every_loss_and_every_sorter_on_one_budget():
    suite = load_suite(SUITES / "synthetic-tuned.yaml")
    plan = suite.tune
    assert plan is not None and plan.budget >= 12 and len(plan.final_seeds) == 3
    names = {g.base.loss.name for g in plan.groups}
    assert names == {e.name for e in LOSSES.entries() if e.available}
    sorters = {g.base.loss.params["sorter"] for g in plan.groups if g.base.loss.name == "difftopk"}
    assert sorters == {"neuralsort", "softsort", "sinkhorn", "odd_even", "bitonic", "splitter_selection"}
    assert all("lr" in {d.name for d in g.dims} for g in plan.groups)  # losses scale gradients differently
    assert len({g.label for g in plan.groups}) == len(plan.groups)
