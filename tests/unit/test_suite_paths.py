"""Paths in a suite (`Param(path=True)`: features `path`, cifar100 `root`) resolve against the suite file."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from harness.suite import load_suite

SUITE = """
suite: paths
seeds: [0]
dataset: {{name: features, params: {{path: {path}}}}}
model: {{name: linear}}
train: {{epochs: 1, batch_size: 8}}
eval: {{k: [1, 2]}}
losses: [softmax]
"""


def _features(path: Path) -> None:
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, train_features=rng.standard_normal((40, 3)).astype(np.float32),
             train_labels=np.arange(40) % 4, val_features=rng.standard_normal((12, 3)).astype(np.float32),
             val_labels=np.arange(12) % 4)


def _suite(where: Path, path: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    suite = where / "s.yaml"
    suite.write_text(textwrap.dedent(SUITE.format(path=path)))
    return suite


def test_relative_path_resolves_against_the_suite_file_not_the_cwd(tmp_path, monkeypatch):
    _features(tmp_path / "data" / "f.npz")
    suite = _suite(tmp_path / "project" / "suites", "../../data/f.npz")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (run,) = load_suite(suite).runs
    assert run.dataset.params["path"] == str((tmp_path / "data" / "f.npz").resolve())
    absolute = _suite(tmp_path / "other", str(tmp_path / "data" / "f.npz"))
    (same,) = load_suite(absolute).runs
    assert same.dataset.params["path"] == str(tmp_path / "data" / "f.npz")
    assert same.run_id == run.run_id  # where the file is named from does not change the run


def test_home_relative_and_default_paths_are_left_alone(tmp_path):
    suite = tmp_path / "s.yaml"
    suite.write_text(textwrap.dedent("""
        suite: c
        seeds: [0]
        dataset: {name: cifar100, params: {root: ~/somewhere, download: false}}
        model: {name: small_cnn}
        train: {epochs: 1, batch_size: 8}
        losses: [softmax]
    """))
    (run,) = load_suite(suite).runs
    assert run.dataset.params["root"] == "~/somewhere"
