"""Malformed-input corpus (suites in YAML and TOML, CLI flags): one line, exit 2, in seconds, nothing touched.

Every case goes through `harness.cli.main`, as a user would, against a results directory that already
holds records; each must be refused before any run starts with exactly one stderr line that starts with
`topk-bench: error:` and names the key (or flag), in little CPU time, leaving the results directory
byte-for-byte as it was. Feature-file cases live in their own corpus.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.docload import MAX_DOCUMENT_BYTES

GOOD = """\
suite: s
seeds: [0]
dataset: {name: synthetic, params: {classes: 8, superclasses: 2, train_size: 64, val_size: 32, test_size: 32}}
model: {name: mlp, params: {hidden: 8}}
train: {epochs: 1, batch_size: 32}
eval: {k: [1, 2]}
losses: [softmax]
resources: {device: cpu}
"""

GOOD_TOML = """\
suite = "s"
seeds = [0]
losses = ["softmax"]
[dataset]
name = "synthetic"
params = {classes = 8, superclasses = 2, train_size = 64, val_size = 32, test_size = 32}
[model]
name = "mlp"
params = {hidden = 8}
[train]
epochs = 1
batch_size = 32
[eval]
k = [1, 2]
[resources]
device = "cpu"
"""

CPU_SECONDS = 5.0  # per case: refusals are checks, not work (CPU time: robust to a busy machine)


def sub(old: str, new: str, text: str = GOOD) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def loss(entry: str) -> str:
    return sub("losses: [softmax]", f"losses: [{entry}]")


def laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + f"\ndescription: *a{levels}\n"


# name -> (file name, content (str or bytes), fragments the one line must contain)
SUITES: dict[str, tuple[str, str | bytes, list[str]]] = {
    # encoding, size, nesting, aliases
    "non-UTF-8 byte": ("suite.yaml", GOOD.encode() + b"description: caf\xe9\n", ["not UTF-8", "line 9"]),
    "UTF-16 file": ("suite.yaml", GOOD.encode("utf-16"), ["not UTF-8"]),
    "NUL byte": ("suite.yaml", GOOD + "description: a\x00b\n", ["invalid YAML"]),
    "20,000 nested brackets": ("suite.yaml", GOOD + "description: " + "[" * 20000 + "]" * 20000 + "\n",
                               ["invalid YAML", "nested more than"]),
    "deep nested mappings": ("suite.yaml", GOOD + "description: " + "{a: " * 200 + "1" + "}" * 200 + "\n",
                             ["nested more than"]),
    "billion laughs": ("suite.yaml", GOOD + laughs(), ["expands to more than", "aliases"]),
    "recursive alias": ("suite.yaml", GOOD + "description: &r [1, *r]\n", ["recursive"]),
    "document over the size cap": ("suite.yaml", GOOD + "#" * MAX_DOCUMENT_BYTES + "\n", ["larger than", "limit"]),
    "empty document": ("suite.yaml", "", ["expected a mapping", "NoneType"]),
    "python object tag": ("suite.yaml", GOOD + "description: !!python/object/apply:os.system ['true']\n",
                          ["invalid YAML", "line 9", "could not determine a constructor"]),
    "5000-digit integer": ("suite.yaml", sub("epochs: 1", "epochs: " + "1" * 5000), ["invalid YAML", "4300 digits"]),
    "TOML 5000-digit integer": ("suite.toml", GOOD_TOML.replace("epochs = 1", "epochs = " + "1" * 5000),
                                ["invalid TOML"]),
    # non-finite floats, anywhere
    "lr .inf": ("suite.yaml", sub("batch_size: 32}", "batch_size: 32, optimizer: {lr: .inf}}"),
                ["train.optimizer.lr", "not a finite number"]),
    "lr .nan": ("suite.yaml", sub("batch_size: 32}", "batch_size: 32, optimizer: {lr: .nan}}"),
                ["train.optimizer.lr", "finite"]),
    "lr 1e400 overflows": ("suite.yaml", sub("batch_size: 32}", "batch_size: 32, optimizer: {lr: 1e400}}"),
                           ["train.optimizer.lr", "finite"]),
    "alpha .inf": ("suite.yaml", loss("{name: berrada_smooth, params: {k: 2, alpha: .inf}}"),
                   ["losses[0].params.alpha", "finite"]),
    "tau -.inf": ("suite.yaml", loss("{name: berrada_smooth, params: {k: 2, tau: -.inf}}"),
                  ["losses[0].params.tau", "finite"]),
    "art_lambda .inf": ("suite.yaml", loss("{name: difftopk, params: {p_k: [0.5, 0.5], art_lambda: .inf}}"),
                        ["losses[0].params.art_lambda", "finite"]),
    "NaN inside p_k": ("suite.yaml", loss("{name: difftopk, params: {p_k: [0.5, .nan]}}"),
                       ["losses[0].params.p_k[1]", "finite"]),
    "NaN in a grid axis": ("suite.yaml", loss("{name: softmax, params: {label_smoothing: [0.1, .nan]}}"),
                           ["losses[0].params.label_smoothing[1]", "finite"]),
    "dataset noise .nan": ("suite.yaml", sub("test_size: 32}", "test_size: 32, noise: .nan}"),
                           ["dataset.params.noise", "finite"]),
    "timeout .inf": ("suite.yaml", sub("{device: cpu}", "{device: cpu, timeout_min: .inf}"),
                     ["resources.timeout_min", "finite"]),
    "grad_clip .nan": ("suite.yaml", sub("batch_size: 32}", "batch_size: 32, grad_clip: .nan}"),
                       ["train.grad_clip", "finite"]),
    # resources
    "device bogus": ("suite.yaml", sub("{device: cpu}", "{device: bogus}"),
                     ["resources.device", "'bogus'", "auto, cpu, cuda, cuda:N"]),
    "device cuda:x": ("suite.yaml", sub("{device: cpu}", "{device: 'cuda:x'}"), ["resources.device"]),
    "workers 0 in the suite": ("suite.yaml", sub("{device: cpu}", "{device: cpu, workers: 0}"), ["resources.workers"]),
    "unknown Slurm parameter": ("suite.yaml", sub("{device: cpu}", "{device: cpu, slurm: {slurm_partitoin: gpu}}"),
                                ["resources.slurm.slurm_partitoin", "unknown Slurm parameter",
                                 "did you mean 'slurm_partition'"]),
    "Slurm parameter without prefix": ("suite.yaml", sub("{device: cpu}", "{device: cpu, slurm: {partition: gpu}}"),
                                       ["resources.slurm.partition", "slurm_partition"]),
    "Slurm timeout_min": ("suite.yaml", sub("{device: cpu}", "{device: cpu, slurm: {timeout_min: 5}}"),
                          ["resources.slurm.timeout_min", "resources.timeout_min"]),
    "Slurm mem_gb not a number": ("suite.yaml", sub("{device: cpu}", "{device: cpu, slurm: {mem_gb: lots}}"),
                                  ["resources.slurm.mem_gb", "expected float"]),
    "Slurm unknown cluster": ("suite.yaml", sub("{device: cpu}", "{device: cpu, slurm: {cluster: moon}}"),
                              ["resources.slurm.cluster", "debug", "local", "slurm"]),
    # seeds
    "seed 2**70": ("suite.yaml", sub("seeds: [0]", f"seeds: [{2**70}]"), ["seeds[0]", "less than"]),
    "negative seed": ("suite.yaml", sub("seeds: [0]", "seeds: [0, -1]"), ["seeds[1]", "greater than or equal to 0"]),
    "fractional seed": ("suite.yaml", sub("seeds: [0]", "seeds: [1.5]"), ["seeds[0]"]),
    "duplicate seeds": ("suite.yaml", sub("seeds: [0]", "seeds: [0, 1, 0]"), ["seeds", "0 listed twice"]),
    # eval.k
    "k 0": ("suite.yaml", sub("k: [1, 2]", "k: [0]"), ["eval.k[0]", "greater than or equal to 1"]),
    "k negative": ("suite.yaml", sub("k: [1, 2]", "k: [-3, 1]"), ["eval.k[0]", "(got -3)"]),
    "k twice": ("suite.yaml", sub("k: [1, 2]", "k: [1, 2, 1]"), ["eval.k", "1 listed twice"]),
    "k above classes in one grid point": (
        "suite.yaml", sub("classes: 8,", "classes: [8, 4],", sub("k: [1, 2]", "k: [1, 5]")),
        ["eval.k", "exceeds the 4 classes", "1 ≤ k ≤ 4"]),
    # models and datasets checked at load, nothing built
    "misspelt torchvision arch": ("suite.yaml", sub("{name: mlp, params: {hidden: 8}}",
                                                    "{name: torchvision, params: {arch: resnt18}}"),
                                  ["model.params.arch", "did you mean 'resnet18'"]),
    "superclasses > classes": ("suite.yaml", sub("superclasses: 2", "superclasses: 9"),
                               ["dataset.params.superclasses", "≤ classes (8)"]),
    "superclasses > classes in a grid": ("suite.yaml", sub("superclasses: 2", "superclasses: [2, 9]"),
                                         ["dataset.params.superclasses", "9"]),
    "model too large for memory": ("suite.yaml", sub("params: {hidden: 8}", "params: {hidden: 1000000, depth: 8}"),
                                   ["model: mlp[", "parameters", "GiB"]),
    # bounded work
    "a 10^6-run grid": ("suite.yaml", sub("superclasses: 2,", f"superclasses: 2, data_seed: {list(range(100))},", sub(
        "hidden: 8", f"hidden: {list(range(1, 101))}", sub("seeds: [0]", f"seeds: {list(range(100))}"))),
        ["expands to 1,000,000 runs", "100 seeds", "--max-runs"]),
    "huge value is cut in the message": ("suite.yaml", sub("k: [1, 2]}", "k: [1, 2], primary: " + "x" * 5000 + "}"),
                                         ["eval.primary", "…"]),
    "huge unknown key is cut": ("suite.yaml", GOOD + "y" * 1000 + ": 1\n", ["unknown key", "…"]),
    # TOML
    "TOML non-UTF-8": ("suite.toml", GOOD_TOML.encode() + b'description = "\xff"\n', ["not UTF-8"]),
    "TOML 20,000 nested arrays": ("suite.toml", GOOD_TOML.replace(
        'suite = "s"', 'suite = "s"\ndescription = ' + "[" * 20000 + "]" * 20000), ["invalid TOML", "nested"]),
    "TOML lr inf": ("suite.toml", GOOD_TOML.replace("batch_size = 32", "batch_size = 32\noptimizer = {lr = inf}"),
                    ["train.optimizer.lr", "finite"]),
    "TOML alpha nan": ("suite.toml", GOOD_TOML.replace(
        'losses = ["softmax"]', 'losses = [{name = "berrada_smooth", params = {k = 2, alpha = nan}}]'),
        ["losses[0].params.alpha", "finite"]),
    "TOML negative seed": ("suite.toml", GOOD_TOML.replace("seeds = [0]", "seeds = [-1]"), ["seeds[0]"]),
    "TOML k 0": ("suite.toml", GOOD_TOML.replace("k = [1, 2]", "k = [0, 1]"), ["eval.k[0]"]),
    "TOML device bogus": ("suite.toml", GOOD_TOML.replace('device = "cpu"', 'device = "gpu"'),
                          ["resources.device", "auto, cpu, cuda, cuda:N"]),
    "TOML unknown Slurm parameter": ("suite.toml", GOOD_TOML.replace(
        'device = "cpu"', 'device = "cpu"\nslurm = {slurm_gpus = 1}'), ["resources.slurm.slurm_gpus"]),
    "TOML superclasses > classes": ("suite.toml", GOOD_TOML.replace("superclasses = 2", "superclasses = 20"),
                                    ["dataset.params.superclasses"]),
}

# name -> (command-line arguments after the suite path, suite text, fragments)
FLAGS: dict[str, tuple[list[str], str, list[str]]] = {
    "--workers -1": (["--workers", "-1"], GOOD, ["--workers", "≥ 1"]),
    "--workers 0": (["--workers", "0"], GOOD, ["--workers", "≥ 1", "got 0"]),
    "--workers abc": (["--workers", "abc"], GOOD, ["--workers", "'abc'"]),
    "--device bogus": (["--device", "bogus"], GOOD, ["--device", "'bogus'", "auto, cpu, cuda, cuda:N"]),
    "--device cuda without CUDA": (["--device", "cuda"], GOOD, ["--device", "CUDA is not available"]),
    "--device cuda:1 without CUDA": (["--device", "cuda:1"], GOOD, ["--device", "CUDA is not available"]),
    "suite device cuda without CUDA": ([], sub("{device: cpu}", "{device: cuda}"),
                                       ["resources.device", "CUDA is not available"]),
    "--executor bogus": (["--executor", "bogus"], GOOD, ["--executor", "invalid choice"]),
    "unknown flag": (["--frobnicate"], GOOD, ["unrecognized arguments", "--frobnicate"]),
    "--max-runs 0": (["--max-runs", "0"], GOOD, ["--max-runs", "≥ 1"]),
    "--max-runs below the grid": (["--max-runs", "2"], sub("seeds: [0]", "seeds: [0, 1, 2]"),
                                  ["expands to 3 runs", "limit of 2", "--max-runs"]),
}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under root with its size, mode and modification time."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        out[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A results root that already holds a record of suite `s` and a report."""
    root = tmp_path / "results"
    for runs in (root / "runs", root / "s" / "runs"):  # the run pool, and a per-suite layout of old
        runs.mkdir(parents=True)
        (runs / "0123456789abcdef.json").write_text(json.dumps({"run_id": "0123456789abcdef", "status": "done"}))
    stale = root / "runs" / ".stale-write.partial"  # a run would sweep this killed writer's leftover
    stale.write_text("")
    os.utime(stale, (time.time() - 7 * 86400, time.time() - 7 * 86400))
    (root / "s" / "report.md").write_text("# an earlier report\n")
    return root


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    """The CUDA cases behave the same on a GPU machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture(scope="module", autouse=True)
def warm_imports(tmp_path_factory):
    """Pay the one-off imports (torch, plugins) outside the timed cases."""
    path = tmp_path_factory.mktemp("warm") / "suite.yaml"
    path.write_text(GOOD)
    assert main(["status", str(path), "--results-dir", str(path.parent / "r")]) == 0


def refuse(argv: list[str], results: Path, capsys) -> str:
    """Run the CLI, check exit 2, one line, quick, results untouched; return the line."""
    before = snapshot(results)
    capsys.readouterr()
    start = time.process_time()
    code = main(argv)
    spent = time.process_time() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err[:2000]
    assert err.startswith("topk-bench: error: "), err[:2000]
    assert "Traceback" not in err and len(err) <= 600, err[:2000]
    assert spent < CPU_SECONDS, f"{spent:.1f} s CPU"
    assert snapshot(results) == before
    return err


@pytest.mark.parametrize("case", sorted(SUITES))
def test_bad_suite(case, tmp_path, results, capsys):
    name, content, fragments = SUITES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = refuse(["run", str(path), "--results-dir", str(results)], results, capsys)
    assert err.startswith(f"topk-bench: error: {path}: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize("case", sorted(FLAGS))
def test_bad_flag(case, tmp_path, results, capsys):
    args, text, fragments = FLAGS[case]
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    err = refuse(["run", str(path), "--results-dir", str(results), *args], results, capsys)
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize("command", ["status", "report", "collect"])
def test_grid_bound_on_every_command(command, tmp_path, results, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text(SUITES["a 10^6-run grid"][1])
    err = refuse([command, str(path), "--results-dir", str(results)], results, capsys)
    assert "expands to 1,000,000 runs" in err


def test_max_runs_raises_the_bound(tmp_path, results, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text(sub("seeds: [0]", "seeds: [0, 1, 2]"))
    refuse(["status", str(path), "--results-dir", str(results), "--max-runs", "2"], results, capsys)
    assert main(["status", str(path), "--results-dir", str(results), "--max-runs", "3"]) == 0
    assert "3 missing" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["billion laughs", "20,000 nested brackets"])
def test_bad_suite_in_a_fresh_process(case, tmp_path, results):
    """The real entry point: one line on stderr, exit 2, nothing on stdout, results untouched."""
    path = tmp_path / "suite.yaml"
    path.write_text(SUITES[case][1])
    before = snapshot(results)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(path), "--results-dir", str(results)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("topk-bench: error: "), proc.stderr[-2000:]
    assert proc.stdout == ""
    assert snapshot(results) == before
