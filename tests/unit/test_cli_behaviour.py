"""The command line as a user meets it: pipes, bare command, --version, -v/-q anywhere, fast --help,
Ctrl-C during start-up, results location, short status rows, progress lines."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main, project_root, results_root

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main())"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300, **kw)


def test_closed_pipe_ends_quietly():
    """`topk-bench list | head`: the reader is gone before the first write; no traceback."""
    proc = subprocess.Popen([*CLI, "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV)
    proc.stdout.close()  # the reader leaves at once
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert err == "", err


def test_list_piped_into_head_has_no_traceback():
    proc = subprocess.run(f"{' '.join(map(repr, CLI))} list | head -1", shell=True, capture_output=True,
                          text=True, cwd=ROOT, env=ENV, timeout=300)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_bare_command_prints_help_exit_2():
    proc = _cli()
    assert proc.returncode == 2
    assert "usage: topk-bench" in proc.stdout and "bench-loss" in proc.stdout and "check-loss" in proc.stdout


def test_version():
    import harness

    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"topk-bench {harness.__version__}"


def test_help_imports_no_heavy_module_and_is_fast():
    code = ("import sys, time; t = time.perf_counter(); from harness.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'pandas', 'matplotlib', 'numpy', 'pydantic') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert "HEAVY []" in proc.stdout, proc.stdout[-300:]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "harness", "--help"], capture_output=True, cwd=ROOT, env=ENV)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0
    assert elapsed < 2.0, f"--help took {elapsed:.2f} s"  # ~0.2 s on an idle 2-core machine


def test_verbosity_flags_after_the_subcommand(write_suite, tmp_path):
    suite = write_suite()
    loud = _cli("run", str(suite), "--dry-run", "--results-dir", str(tmp_path / "r"))
    quiet = _cli("run", str(suite), "--dry-run", "--results-dir", str(tmp_path / "r"), "-q")
    assert loud.returncode == 0 and quiet.returncode == 0, quiet.stderr
    assert "results:" in loud.stderr and "results:" not in quiet.stderr
    assert "run_id" in quiet.stdout
    assert _cli("list", "-v").returncode == 0


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])
def test_ctrl_c_during_start_up_is_one_line(write_suite, tmp_path, delay):
    proc = subprocess.Popen([*CLI, "run", str(write_suite()), "--results-dir", str(tmp_path / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=ENV, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    if proc.returncode != -signal.SIGINT:  # (a signal before Python's handler is installed kills silently)
        assert proc.returncode in (130, 0, 1), (proc.returncode, err[-500:])


def test_results_dir_rule(tmp_path, monkeypatch):
    project = tmp_path / "proj"
    (project / "suites" / "deep").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")
    suite = project / "suites" / "deep" / "s.yaml"
    monkeypatch.delenv("TOPK_BENCH_RESULTS", raising=False)
    assert project_root(suite) == project.resolve()
    assert results_root(suite) == project.resolve() / "results"
    monkeypatch.setenv("TOPK_BENCH_RESULTS", str(tmp_path / "env"))
    assert results_root(suite) == tmp_path / "env"
    assert results_root(suite, str(tmp_path / "flag")) == tmp_path / "flag"
    monkeypatch.delenv("TOPK_BENCH_RESULTS")
    loose = tmp_path / "loose" / "s.yaml"  # no project above (tmp has no pyproject.toml / .git)
    loose.parent.mkdir()
    if project_root(loose) == loose.parent.resolve():
        assert results_root(loose) == loose.parent.resolve() / "results"


def test_run_prints_results_dir_next_to_the_suites_project(write_suite, tmp_path, monkeypatch, caplog):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "suites").mkdir()
    suite = write_suite(name="suites/s.yaml")
    monkeypatch.delenv("TOPK_BENCH_RESULTS", raising=False)
    monkeypatch.chdir(tmp_path / "suites")
    with caplog.at_level(logging.INFO, logger="topk_bench"):
        assert main(["run", str(suite), "--dry-run"]) == 0
    assert f"results: {tmp_path.resolve() / 'results'} (suite view: tiny/)" in caplog.text


def test_status_and_dry_run_show_only_varying_parameters(write_suite, tmp_path, capsys):
    suite = write_suite("""
        suite: wide
        seeds: [0]
        dataset: {name: synthetic, params: {classes: 12, superclasses: 3, dim: 4, train_size: 64,
                                             val_size: 32, test_size: 32, noise: [0.0, 0.2]}}
        model: {name: mlp, params: {hidden: 8}}
        train: {epochs: 1, batch_size: 32}
        eval: {k: [1, 2]}
        losses:
          - {name: difftopk, params: {sorter: [odd_even, bitonic], p_k: [[0.5, 0.5]]}}
        resources: {device: cpu}
    """)
    for command in (["status"], ["run", "--dry-run"]):
        assert main([*command, str(suite), "--results-dir", str(tmp_path / "r")]) == 0
        out = capsys.readouterr().out
        assert "difftopk[sorter=bitonic]" in out and "synthetic[noise=0.2]" in out
        assert "art_lambda" not in out and "superclasses" not in out and "hidden" not in out
        assert max(len(line) for line in out.splitlines()) < 120


def test_progress_lines_name_loss_seed_metric_and_eta(write_suite, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        assert main(["run", str(write_suite()), "--results-dir", str(tmp_path / "r")]) == 0
    epoch_lines = [r.getMessage() for r in caplog.records if hasattr(r, "epoch_progress")]
    assert any(line.startswith("softmax seed 0: epoch 1/2") and "val top1" in line and "ETA 0:" in line
               for line in epoch_lines), epoch_lines[:3]
    assert any("softmax[label_smoothing=0.1] seed 1: epoch 2/2" in line for line in epoch_lines)
    run_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
    assert len(run_lines) == 6 and run_lines[-1].startswith("[6/6] ")
    assert all(" done, test top1 " in line and "suite ETA" in line for line in run_lines), run_lines


def test_terminal_progress_bars(monkeypatch, capsys):
    """On a terminal: a bar over runs and one over the current run's epochs; epoch lines are hidden."""
    from harness.progress import EpochProgress, SuiteProgress

    root, handler = logging.getLogger(), logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    monkeypatch.setattr(root, "level", logging.INFO)
    info = EpochProgress("abc", "softmax", 3, 2, 5, 1.5, "top1", 0.4567, 2.0)
    try:
        with SuiteProgress(2, {"abc": ("softmax", 3)}, "top1", tty=True) as progress:
            logging.getLogger("harness.train").info("%s", info.describe(), extra={"epoch_progress": info})
            assert progress._epochs.n == 2 and progress._epochs.total == 5
            assert "softmax seed 3" in progress._epochs.desc
            progress.finished("abc", "done", 0.5)
            assert progress._bar.n == 1
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "val top1 45.67 %" in err and "epoch 2/5" not in err


def test_a_command_whose_module_fails_to_import_stays_listed_and_says_why(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "harness.lossbench", None)  # `import harness.lossbench` raises ImportError
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "bench-loss" in capsys.readouterr().out
    assert main(["bench-loss", "--loss", "softmax"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("topk-bench: error: bench-loss is unavailable: importing harness.lossbench failed")
    assert err.count("\n") == 1
