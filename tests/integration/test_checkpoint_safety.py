"""A checkpoint path holds untrusted bytes: nothing in it runs, and a bad one only costs a restart.

Each test plants a file at the checkpoint path the Trainer is given, re-runs the suite and checks
that the run completes `done` with exactly the numbers of an uninterrupted run (a half-applied
checkpoint would change them) and that no code in the file ran.
"""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.train import Trainer

SUITE = """
suite: ckpt
seeds: [{seed}]
dataset: {{name: synthetic, params: {{classes: 6, superclasses: 2, train_size: 128, val_size: 32, test_size: 32}}}}
model: {{name: mlp, params: {{hidden: {hidden}}}}}
train: {{epochs: 3, batch_size: 32, checkpoint: true, schedule: {{name: cosine}}}}
eval: {{k: [1, 2]}}
losses: [softmax]
resources: {{device: cpu}}
"""


def suite(tmp_path: Path, seed: int = 0, hidden: int = 8) -> Path:
    path = tmp_path / f"suite-{seed}-{hidden}.yaml"
    path.write_text(SUITE.format(seed=seed, hidden=hidden))
    return path


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in root.rglob("runs/*.json")]


def interrupted(tmp_path: Path, suite_path: Path, root: Path, monkeypatch, after_epoch: int = 0) -> Path:
    """Run until the checkpoint of `after_epoch` is written, then stop; return the checkpoint path."""
    seen: list[Path] = []
    original = Trainer._save_checkpoint

    def save_then_stop(self, epoch):
        original(self, epoch)
        seen.append(self.checkpoint_path)
        if epoch == after_epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_stop)
    assert main(["run", str(suite_path), "--results-dir", str(root)]) == 130
    monkeypatch.setattr(Trainer, "_save_checkpoint", original)
    assert seen and seen[-1].is_file() and not records(root)
    return seen[-1]


@pytest.fixture
def reference(tmp_path) -> dict:
    """The record of the run computed in one go."""
    assert main(["run", str(suite(tmp_path)), "--results-dir", str(tmp_path / "ref")]) == 0
    (rec,) = records(tmp_path / "ref")
    return rec


class WritesMarker:
    """Unpickling this creates the marker file (a stand-in for any code an attacker might run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant(kind: str, path: Path, marker: Path, tmp_path: Path, monkeypatch) -> None:
    genuine = torch.load(path, weights_only=True)
    if kind == "raw pickle":
        path.write_bytes(pickle.dumps({"model": WritesMarker(marker)}))
    elif kind == "torch zip with payload":
        torch.save({**genuine, "history": WritesMarker(marker)}, path)
    elif kind == "corrupt bytes":
        path.write_bytes(b"\x00garbage" * 100)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "not a dict":
        torch.save([1, 2, 3], path)
    elif kind == "missing field":
        torch.save({k: v for k, v in genuine.items() if k != "optimizer"}, path)
    elif kind == "other run's checkpoint":
        other = interrupted(tmp_path, suite(tmp_path, seed=1), tmp_path / "other", monkeypatch)
        path.write_bytes(other.read_bytes())
    elif kind == "forged stamp, other model":  # claims to be this run, holds a wider model: must not half-apply
        other = interrupted(tmp_path, suite(tmp_path, hidden=12), tmp_path / "wide", monkeypatch)
        forged = torch.load(other, weights_only=True)
        torch.save({**forged, **{k: genuine[k] for k in ("format", "run_id", "spec_sha256")}}, path)
    elif kind == "a folder":
        path.unlink()
        path.mkdir()
        (path / "data").write_text("not ours to delete")
    elif kind == "epoch out of range":
        torch.save({**genuine, "epoch": 7}, path)
    else:
        raise AssertionError(kind)


KINDS = ["raw pickle", "torch zip with payload", "corrupt bytes", "truncated", "not a dict", "missing field",
         "other run's checkpoint", "forged stamp, other model", "epoch out of range", "a folder"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_checkpoint_is_ignored_and_the_run_starts_over(tmp_path, monkeypatch, caplog, reference, kind):
    root = tmp_path / "results"
    ckpt = interrupted(tmp_path, suite(tmp_path), root, monkeypatch)
    marker = tmp_path / "MARKER"
    _plant(kind, ckpt, marker, tmp_path, monkeypatch)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["run", str(suite(tmp_path)), "--results-dir", str(root)]) == 0
    assert not marker.exists()
    (rec,) = records(root)
    assert rec["status"] == "done" and rec["resumed_from_epoch"] is None
    assert rec["metrics"] == reference["metrics"]
    assert [e["train_loss"] for e in rec["curves"]] == [e["train_loss"] for e in reference["curves"]]
    if kind == "a folder":  # cannot be replaced: the run goes on without checkpoints and leaves it alone
        assert (ckpt / "data").read_text() == "not ours to delete"
        assert any("cannot write checkpoint" in r.getMessage() for r in caplog.records)
        return
    assert any("ignoring checkpoint" in r.getMessage() and str(ckpt) in r.getMessage() for r in caplog.records)
    assert not ckpt.exists()  # replaced by the restarted run's own checkpoints, removed once done


def test_genuine_checkpoint_resumes_and_loads_without_pickled_code(tmp_path, monkeypatch, reference):
    root = tmp_path / "results"
    ckpt = interrupted(tmp_path, suite(tmp_path), root, monkeypatch, after_epoch=1)
    state = torch.load(ckpt, weights_only=True)  # plain tensors and values only
    assert state["run_id"] == reference["run_id"] and state["epoch"] == 1
    assert json.loads(state["history"])["epochs"][1]["epoch"] == 1
    assert main(["run", str(suite(tmp_path)), "--results-dir", str(root)]) == 0
    (rec,) = records(root)
    assert rec["status"] == "done" and rec["resumed_from_epoch"] == 2
    assert rec["metrics"] == reference["metrics"]
