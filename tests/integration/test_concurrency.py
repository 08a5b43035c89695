"""Concurrent runners split a suite (claims); killed claimants' runs are recomputed; workers never
outlive their front end; budgets are enforced inside epochs and by a hard limit per executor."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_SUITE
from plugin_fixture import install_plugin, uninstall_plugin

from harness.claims import Claims
from harness.cli import main
from harness.suite import load_suite

REPO = Path(__file__).parents[2]


def _cmd(suite: Path, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", "run", str(suite), "--results-dir", str(results), *extra]


def _pool(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (results / "runs").glob("*.json")}


def _done_count(output: str) -> int:
    return int(re.search(r": (\d+) done,", output).group(1))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    site = install_plugin(tmp_path / "site")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]))
    yield site
    uninstall_plugin(site)


def test_two_runners_split_one_suite(write_suite, tmp_path):
    suite = write_suite(TINY_SUITE.replace("seeds: [0, 1]", "seeds: [0, 1, 2, 3]").replace("epochs: 2", "epochs: 4"))
    results = tmp_path / "results"
    procs = [subprocess.Popen(_cmd(suite, results), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    computed = [_done_count(o[0]) for o in outs]
    assert sum(computed) == 12, (computed, [o[0] for o in outs])  # every run computed exactly once
    pool = _pool(results)
    assert len(pool) == 12 and all(r["status"] == "done" for r in pool.values())
    assert not list((results / "claims").glob("*.claim"))  # every claim released


def test_live_claim_is_skipped_and_dead_claim_is_taken_over(write_suite, tmp_path, capsys):
    suite = write_suite()
    results = tmp_path / "results"
    live, dead = [s.run_id for s in load_suite(suite).runs[:2]]
    claims = Claims(results / "claims")
    assert claims.try_claim(live)  # held by this (live) process
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    claims.path(dead).write_text(json.dumps({"owner": "x", "host": os.uname().nodename, "pid": gone.pid}))
    assert main(["run", str(suite), "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "5 done" in out and "1 being computed by another runner" in out
    pool = _pool(results)
    assert live not in pool and pool[dead]["status"] == "done"
    assert main(["status", str(suite), "--results-dir", str(results)]) == 0
    assert "running" in capsys.readouterr().out


def test_killed_runner_leaves_a_claim_that_is_taken_over(write_suite, tmp_path):
    suite = write_suite(TINY_SUITE.replace("epochs: 2", "epochs: 40"))
    results = tmp_path / "results"
    proc = subprocess.Popen(_cmd(suite, results), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((results / "claims").glob("*.claim")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    orphans = list((results / "claims").glob("*.claim"))
    assert orphans, "the runner was killed before it claimed anything"
    result = subprocess.run(_cmd(suite, results), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    pool = _pool(results)
    assert len(pool) == 6 and all(r["status"] == "done" for r in pool.values())
    assert all(p.stem in pool for p in orphans)


@pytest.mark.slow
def test_local_workers_die_with_their_front_end(write_suite, tmp_path):
    suite = write_suite(TINY_SUITE.replace("epochs: 2", "epochs: 400"))
    results = tmp_path / "results"
    proc = subprocess.Popen(_cmd(suite, results, "--executor", "local", "--workers", "2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((results / "claims").glob("*.claim"))) < 2:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert workers, "no worker processes found"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
    assert not _pool(results)  # no record raced in after the front end died


@pytest.mark.slow
def test_ctrl_c_stops_local_workers_and_records_nothing_for_interrupted_runs(write_suite, tmp_path):
    suite = write_suite(TINY_SUITE.replace("epochs: 2", "epochs: 400"))
    results = tmp_path / "results"
    proc = subprocess.Popen(_cmd(suite, results, "--executor", "local", "--workers", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((results / "claims").glob("*.claim"))) < 2:
        time.sleep(0.05)
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not _pool(results)  # interrupted runs are left unrecorded, to be recomputed
    assert not list((results / "claims").glob("*.claim"))
    time.sleep(1)
    assert not any(_alive(w) for w in workers)


def test_budget_is_enforced_inside_the_only_epoch(write_suite, tmp_path):
    suite = write_suite(TINY_SUITE.replace("epochs: 2", "epochs: 1").replace("train_size: 256", "train_size: 20000")
                        .replace("timeout_min: 5", "timeout_min: 0.0005").replace("seeds: [0, 1]", "seeds: [0]")
                        .replace("  - {name: softmax, params: {label_smoothing: [0.1, 0.2]}}\n", ""))
    results = tmp_path / "results"
    assert main(["run", str(suite), "--results-dir", str(results)]) == 1
    (record,) = _pool(results).values()
    assert record["status"] == "timeout" and "budget" in record["error"]


HANG_SUITE = TINY_SUITE.replace("seeds: [0, 1]", "seeds: [0]").replace(
    "  - {name: softmax, params: {label_smoothing: [0.1, 0.2]}}\n", "").replace("  - softmax\n", "  - test_hang\n")


@pytest.mark.parametrize("executor", ["inline", "local"])
def test_hard_limit_stops_a_hung_run(write_suite, tmp_path, plugin, executor):
    suite = write_suite(HANG_SUITE.replace("timeout_min: 5", "timeout_min: 0.01"))  # 0.6 s budget, 5.6 s hard
    results = tmp_path / "results"
    start = time.monotonic()
    result = subprocess.run(_cmd(suite, results, "--executor", executor), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert time.monotonic() - start < 60
    (record,) = _pool(results).values()
    assert record["status"] == "timeout" and "hard time limit" in record["error"]


def test_cpu_allocation_failure_is_recorded_as_oom(write_suite, tmp_path, plugin):
    suite = write_suite(HANG_SUITE.replace("test_hang", "test_cpu_oom"))
    results = tmp_path / "results"
    assert main(["run", str(suite), "--results-dir", str(results)]) == 1
    (record,) = _pool(results).values()
    assert record["status"] == "oom" and "allocate" in record["error"]


@pytest.mark.slow
@pytest.mark.parametrize("kill_seed", [0, 1, 2])
def test_sigkill_at_random_points_loses_tears_and_rewrites_nothing(write_suite, tmp_path, kill_seed):
    import random

    from harness.record import validate_record

    suite = write_suite(TINY_SUITE.replace("seeds: [0, 1]", "seeds: [0, 1, 2]").replace("epochs: 2", "epochs: 6"))
    results = tmp_path / "results"
    executor = ["--executor", "local", "--workers", "2"] if kill_seed % 2 else []
    proc = subprocess.Popen(_cmd(suite, results, *executor), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill somewhere between start-up and the middle of the suite
    time.sleep(random.Random(kill_seed).uniform(1.0, 6.0))
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (results / "runs").glob("*.json")}
    for name, (content, _) in before.items():  # whatever is visible is whole and valid
        validate_record(json.loads(content), name[:-5])
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
    result = subprocess.run(_cmd(suite, results), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (results / "runs").glob("*.json")}
    assert len(after) == 9
    assert all(after[name] == value for name, value in before.items())  # nothing lost or rewritten
