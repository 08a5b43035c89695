"""The local process pool and the submitit (Slurm) path produce the same records as inline."""
from __future__ import annotations

import json

from harness.cli import main

SUITE = """
suite: ex
seeds: [0, 1]
dataset: {name: synthetic, params: {classes: 6, superclasses: 2, train_size: 128, val_size: 64, test_size: 64}}
model: {name: linear}
train: {epochs: 1, batch_size: 64}
eval: {k: [1, 2]}
losses: [softmax]
resources: {device: cpu, executor: EXECUTOR, workers: 2, slurm: {cluster: debug}}
"""


def metrics(root):
    return {p.stem: json.loads(p.read_text())["metrics"]["test"] for p in (root / "runs").glob("*.json")}


def test_local_pool_and_submitit_match_inline(write_suite, tmp_path):
    results = {}
    for executor in ("inline", "local", "slurm"):
        suite = write_suite(SUITE.replace("EXECUTOR", executor), name=f"{executor}.yaml")
        assert main(["run", str(suite), "--results-dir", str(tmp_path / executor)]) == 0
        results[executor] = metrics(tmp_path / executor)
    assert len(results["inline"]) == 2
    assert results["local"] == results["inline"] == results["slurm"]
