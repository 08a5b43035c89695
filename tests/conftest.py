"""Shared fixtures: tiny suites that train in well under a second per run."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

TINY_SUITE = """
suite: tiny
seeds: [0, 1]
dataset: {name: synthetic, params: {classes: 8, superclasses: 2, modes: 2, dim: 4,
                                     train_size: 256, val_size: 128, test_size: 128}}
model: {name: mlp, params: {hidden: 16}}
train: {epochs: 2, batch_size: 64}
eval: {k: [1, 2, 5]}
losses:
  - softmax
  - {name: softmax, params: {label_smoothing: [0.1, 0.2]}}
resources: {device: cpu, timeout_min: 5}
"""


@pytest.fixture
def write_suite(tmp_path: Path):
    """Write a suite file (YAML text) into tmp_path and return its path."""

    def write(text: str = TINY_SUITE, name: str = "suite.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _private_hash_cache(tmp_path_factory, monkeypatch):
    """Content hashes of data files are cached under XDG_CACHE_HOME: keep tests out of the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
