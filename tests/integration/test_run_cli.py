"""End to end through the CLI: records, resume-by-record, SIGKILL safety, statuses, report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.registry import LOSSES, Param
from harness.suite import load_suite


def run_cli(*args: str) -> int:
    return main(list(args))


def records(root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (root.parent / "runs").glob("[!.]*.json")}


def test_run_rerun_delete_force(write_suite, tmp_path, capsys):
    suite = write_suite()
    results = tmp_path / "results"
    assert run_cli("run", str(suite), "--results-dir", str(results)) == 0
    root = results / "tiny"
    first = records(root)
    assert len(first) == 6 and all(r["status"] == "done" for r in first.values())
    rec = next(iter(first.values()))
    assert rec["environment"]["torch"] == torch.__version__ and "git_sha" in rec["environment"]
    assert set(rec["metrics"]["test"]["last"]) >= {"top1", "top2", "top5", "k99"}
    assert rec["timings"]["median_step_ms"] > 0 and rec["timings"]["loss_vs_ce"] > 0
    assert len(rec["metrics"]["curve_test_last"]) == 8 and len(rec["curves"]) == 2
    report = (root / "report.md").read_text()
    assert "| softmax" in report and "6 done" in report and "0 missing" in report

    # second run: trains nothing, records untouched, same report body
    mtimes = {p: p.stat().st_mtime_ns for p in (root.parent / "runs").glob("*.json")}
    assert run_cli("run", str(suite), "--results-dir", str(results)) == 0
    assert "0 done, 0 not done (none), 6 skipped" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in (root.parent / "runs").glob("*.json")}
    strip = lambda text: [line for line in text.splitlines() if not line.startswith("- generated")]  # noqa: E731
    assert strip((root / "report.md").read_text()) == strip(report)

    # deleting two records recomputes exactly those two
    deleted = sorted(first)[:2]
    for run_id in deleted:
        (root.parent / "runs" / f"{run_id}.json").unlink()
    assert run_cli("report", str(suite), "--results-dir", str(results)) == 0
    partial = (root / "report.md").read_text()
    assert "2 missing" in partial and "—" in partial and "not averaged" in partial
    assert run_cli("run", str(suite), "--results-dir", str(results)) == 0
    after = records(root)
    changed = {i for i in after if after[i]["started"] != first[i]["started"]}
    assert changed == set(deleted)
    for run_id in deleted:  # same numbers as the first time
        assert after[run_id]["metrics"]["test"] == first[run_id]["metrics"]["test"]

    assert run_cli("run", str(suite), "--results-dir", str(results), "--force") == 0
    assert all(records(root)[i]["started"] != after[i]["started"] for i in after)


def test_dry_run_and_env_results_dir(write_suite, tmp_path, monkeypatch, capsys):
    suite = write_suite()
    monkeypatch.setenv("TOPK_BENCH_RESULTS", str(tmp_path / "env-results"))
    assert run_cli("run", str(suite), "--dry-run") == 0
    out = capsys.readouterr().out
    assert out.count("missing") >= 6 and not (tmp_path / "env-results").exists()
    for spec in load_suite(suite).runs:
        assert spec.run_id in out


def test_sigkill_midway_loses_nothing(write_suite, tmp_path):
    text = (Path(__file__).parents[1] / "conftest.py").read_text()
    suite = write_suite(text.split('TINY_SUITE = """')[1].split('"""')[0].replace(
        "seeds: [0, 1]", "seeds: [0, 1, 2, 3, 4]").replace("epochs: 2", "epochs: 6"))
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "harness.cli", "run", str(suite), "--results-dir", str(results)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = results / "runs"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(runs.glob("[!.]*.json"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = records(results / "tiny")
    assert 2 <= len(done) < 15
    assert all(r["status"] == "done" for r in done.values())  # every visible record is whole
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{15 - len(done)} done" in result.stdout and f"{len(done)} skipped" in result.stdout
    assert len(records(results / "tiny")) == 15


@pytest.fixture
def broken_losses():
    """Temporarily register a loss that returns NaN, one that raises, one with a missing dependency."""
    from torch import nn

    class NanLoss(nn.Module):
        def __init__(self, num_classes: int) -> None:
            super().__init__()

        def forward(self, scores, labels):
            return scores.sum() * float("nan")

    class BoomLoss(NanLoss):
        def forward(self, scores, labels):
            raise RuntimeError("boom")

    LOSSES.register("test_nan")(NanLoss)
    LOSSES.register("test_boom")(BoomLoss)
    LOSSES.register("test_needs_dep", requires=("surely_not_installed_pkg",),
                    params={"k": Param(int, 1, ge=1)})(NanLoss)
    yield
    for name in ("test_nan", "test_boom", "test_needs_dep"):
        LOSSES._entries.pop(name)


def test_nan_and_failed_runs_are_recorded_and_suite_goes_on(write_suite, tmp_path, broken_losses):
    suite = write_suite(open(Path(__file__).parents[1] / "conftest.py").read().split('TINY_SUITE = """')[1]
                        .split('"""')[0].replace("  - {name: softmax, params: {label_smoothing: [0.1, 0.2]}}",
                                                 "  - test_nan\n  - test_boom"))
    results = tmp_path / "results"
    assert run_cli("run", str(suite), "--results-dir", str(results)) == 1
    statuses = sorted(r["status"] for r in records(results / "tiny").values())
    assert statuses == ["done", "done", "failed", "failed", "nan", "nan"]
    report = (results / "tiny" / "report.md").read_text()
    assert "**nan**" in report and "RuntimeError: boom" in report
    # a not-done record is retried next time (and fails the same way)
    assert run_cli("run", str(suite), "--results-dir", str(results)) == 1


def test_unavailable_plugin_fails_only_when_selected(write_suite, tmp_path, broken_losses, capsys):
    assert run_cli("list") == 0
    listing = capsys.readouterr().out
    assert "test_needs_dep" in listing and "unavailable: needs surely_not_installed_pkg" in listing
    suite = write_suite("""
suite: s
seeds: [0]
dataset: {name: synthetic, params: {classes: 8, superclasses: 2}}
model: {name: linear}
train: {epochs: 1, batch_size: 32}
losses: [test_needs_dep]
""")
    assert run_cli("run", str(suite), "--results-dir", str(tmp_path)) == 2
    assert "losses[0].name: loss 'test_needs_dep' is unavailable: needs surely_not_installed_pkg" \
        in capsys.readouterr().err
