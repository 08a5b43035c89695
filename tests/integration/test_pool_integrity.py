"""The run pool: one per results root, suites as views; bad files never block or falsify anything."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from harness.cli import main
from harness.store import RunStore
from harness.suite import load_suite


def _run(*args: str) -> int:
    return main(list(args))


def _pool(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (results / "runs").glob("*.json")}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def _computed(tmp_path_factory):
    from conftest import TINY_SUITE

    base = tmp_path_factory.mktemp("computed")
    suite = base / "suite.yaml"
    suite.write_text(TINY_SUITE)
    assert _run("run", str(suite), "--results-dir", str(base / "results")) == 0
    return suite, base / "results"


@pytest.fixture
def done_suite(_computed, tmp_path):
    """The tiny suite, computed once per module, in a fresh copy of its results root."""
    suite, results = _computed
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    return suite, copy


def test_the_same_suite_in_yaml_and_toml_shares_one_pool(done_suite, tmp_path, capsys):
    suite, results = done_suite
    toml = tmp_path / "copy.toml"
    toml.write_text("""
suite = "tiny-toml"
seeds = [0, 1]
losses = ["softmax", {name = "softmax", params = {label_smoothing = [0.1, 0.2]}}]
[dataset]
name = "synthetic"
params = {classes = 8, superclasses = 2, modes = 2, dim = 4, train_size = 256, val_size = 128, test_size = 128}
[model]
name = "mlp"
params = {hidden = 16}
[train]
epochs = 2
batch_size = 64
[eval]
k = [1, 2, 5]
[resources]
device = "cpu"
timeout_min = 5
""")
    capsys.readouterr()
    assert _run("run", str(toml), "--results-dir", str(results)) == 0
    assert "0 done, 0 not done (none), 6 skipped" in capsys.readouterr().out
    assert (results / "tiny-toml" / "report.md").is_file() and len(_pool(results)) == 6


BAD_FILES = {
    "no status": lambda r: json.dumps({k: v for k, v in r.items() if k != "status"}),
    "no run_id": lambda r: json.dumps({k: v for k, v in r.items() if k != "run_id"}),
    "binary garbage": lambda r: b"\x00\xff\xfe garbage \x80",
    "a JSON list": lambda r: "[1, 2, 3]",
    "a JSON string": lambda r: '"done"',
    "truncated": lambda r: json.dumps(r)[:100],
    "accuracy out of range": lambda r: json.dumps({**r, "metrics": {**r["metrics"], "test": {
        **r["metrics"]["test"], "best_val": {**r["metrics"]["test"]["best_val"], "top1": 7.0}}}}),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES) + ["a directory"])
def test_a_bad_record_file_is_skipped_reported_and_recomputed(done_suite, kind, capsys):
    suite, results = done_suite
    victim = sorted(_pool(results))[0]
    path = results / "runs" / f"{victim}.json"
    record = json.loads(path.read_text())
    path.unlink()
    if kind == "a directory":
        path.mkdir()
    else:
        content = BAD_FILES[kind](record)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert _run("status", str(suite), "--results-dir", str(results)) == 0
    assert "invalid" in capsys.readouterr().out
    assert _run("report", str(suite), "--results-dir", str(results)) == 0
    report = (results / "tiny" / "report.md").read_text()
    assert "Record files ignored" in report and victim in report and "1 with an invalid record file" in report
    assert _run("collect", str(suite), "--results-dir", str(results)) == 0
    if kind == "a directory":
        path.rmdir()  # a folder in the way is the user's to remove; the run then recomputes
    assert _run("run", str(suite), "--results-dir", str(results)) == 0
    assert "1 done" in capsys.readouterr().out
    assert json.loads(path.read_text())["metrics"]["test"] == record["metrics"]["test"]


def test_a_record_saved_under_another_name_is_ignored(done_suite):
    suite, results = done_suite
    pool = _pool(results)
    a, b = sorted(pool)[:2]
    (results / "runs" / f"{b}.json").write_text(json.dumps(pool[a]))
    store = RunStore(results, "tiny")
    assert store.status(b) == "invalid" and "does not match" in store.problems()[b]


def test_a_forged_copy_does_not_change_the_report(done_suite):
    suite, results = done_suite
    assert _run("report", str(suite), "--results-dir", str(results)) == 0
    report = (results / "tiny" / "report.md").read_text()
    pool = _pool(results)
    forged = json.loads(json.dumps(pool[sorted(pool)[0]]))
    forged["metrics"]["test"]["best_val"]["top1"] = 0.99
    (results / "runs" / "0123456789abcdef.json").write_text(json.dumps(forged))  # another name, same run_id
    assert _run("report", str(suite), "--results-dir", str(results)) == 0
    strip = lambda text: [x for x in text.splitlines() if not x.startswith("- generated")]  # noqa: E731
    assert strip((results / "tiny" / "report.md").read_text()) == strip(report)


def test_temp_files_are_not_json_and_stale_ones_are_swept(done_suite):
    suite, results = done_suite
    store = RunStore(results, "tiny")
    stale = results / "runs" / f".{'a' * 16}.json.host.123.partial"
    stale.write_text("{half")
    os.utime(stale, (0, 0))
    fresh = results / "runs" / f".{'b' * 16}.json.host.124.partial"
    fresh.write_text("{half")
    assert store.sweep_temp_files() == 1 and not stale.exists() and fresh.exists()
    assert not list((results / "runs").glob(".*.json"))
    assert all(r["run_id"] for r in store.records())


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_records_respect_the_umask(write_suite, tmp_path, umask, mode):
    suite = write_suite()
    old = os.umask(umask)
    try:
        spec = load_suite(suite).runs[0]
        store = RunStore(tmp_path / "r", "tiny")
        from harness.train import new_record

        path = store.write(new_record(spec))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


@pytest.mark.parametrize("name", ["..", ".", "runs", "claims"])
def test_suite_names_that_escape_or_collide_are_refused(write_suite, tmp_path, capsys, name):
    from conftest import TINY_SUITE

    suite = write_suite(TINY_SUITE.replace("suite: tiny", f'suite: "{name}"'))
    results = tmp_path / "sub" / "results"
    results.mkdir(parents=True)
    before = _snapshot(tmp_path)
    for command in ("run", "status", "report"):
        assert _run(command, str(suite), "--results-dir", str(results)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "suite" in err[0], err
    assert _snapshot(tmp_path) == before and not list(tmp_path.rglob("report.md"))


def test_unusable_results_dir_is_refused_before_any_run(write_suite, tmp_path, capsys):
    suite = write_suite()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert _run("run", str(suite), "--results-dir", str(blocker)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0] and blocker.read_text() == "not a folder"
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert _run("run", str(suite), "--results-dir", str(ro)) == 2


def test_report_without_records_creates_nothing(write_suite, tmp_path, capsys):
    suite = write_suite()
    results = tmp_path / "empty"
    assert _run("report", str(suite), "--results-dir", str(results)) == 2
    assert "no records" in capsys.readouterr().err and not results.exists()


def test_records_carry_sizes_and_provenance_and_the_report_states_the_sizes(done_suite):
    suite, results = done_suite
    record = next(iter(_pool(results).values()))
    info = record["data_info"]
    assert (info["train_size"], info["val_size"], info["test_size"], info["classes"]) == (256, 128, 128, 8)
    assert record["provenance"]["loss"]["name"] == "softmax" and record["provenance"]["loss"]["distribution"]
    assert record["schema_version"] == 2 and record["computed_by"]["pid"] > 0
    assert _run("report", str(suite), "--results-dir", str(results)) == 0
    assert "- splits: train 256, val 128, test 128 samples; 8 classes" in (results / "tiny" / "report.md").read_text()
