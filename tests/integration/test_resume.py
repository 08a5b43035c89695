"""A killed run resumes from its last epoch checkpoint and ends with the same numbers."""
from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.train import Trainer

SUITE = """
suite: resume
seeds: [3]
dataset: {name: synthetic, params: {classes: 8, superclasses: 2, train_size: 256, val_size: 64, test_size: 64}}
model: {name: mlp, params: {hidden: 16, dropout: 0.2}}
train: {epochs: 4, batch_size: 32, checkpoint: true, schedule: {name: cosine}}
eval: {k: [1, 2]}
losses: [softmax]
resources: {device: cpu}
"""


def only_record(root):
    (path,) = list((root / "runs").glob("*.json"))
    return json.loads(path.read_text())


def test_killed_run_resumes_to_identical_record(write_suite, tmp_path, monkeypatch):
    suite = write_suite(SUITE)
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "a")]) == 0
    uninterrupted = only_record(tmp_path / "a")

    original = Trainer._save_checkpoint

    def save_then_die(self, epoch):
        original(self, epoch)
        if epoch == 1:
            raise KeyboardInterrupt  # stands in for SIGKILL after the epoch-1 checkpoint

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        from harness.store import RunStore
        from harness.suite import load_suite
        from harness.train import run_one

        run_one(load_suite(suite).runs[0], RunStore(tmp_path / "b", "resume"), "cpu")
    assert not (tmp_path / "b" / "runs").exists()  # no record for the killed run
    assert list((tmp_path / "b" / "checkpoints").glob("*.pt"))
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)

    assert main(["run", str(suite), "--results-dir", str(tmp_path / "b")]) == 0
    resumed = only_record(tmp_path / "b")
    assert resumed["resumed_from_epoch"] == 2
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert [e["train_loss"] for e in resumed["curves"]] == [e["train_loss"] for e in uninterrupted["curves"]]
    assert not list((tmp_path / "b" / "checkpoints").glob("*.pt"))  # removed once done
