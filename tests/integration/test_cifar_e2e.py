"""End to end: a tiny CIFAR-100 archive in the real format -> `topk-bench run` -> a done record."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

cli = pytest.importorskip("harness.cli")


def write_tiny_cifar(root: Path, per_class: int = 2, test: int = 50) -> None:
    """`root/cifar-100-python/{train,test,meta}` as torchvision reads them (pickle, encoding latin1)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, fine in (("train", np.repeat(np.arange(100), per_class)), ("test", np.arange(test) % 100)):
        entry = {"batch_label": name, "data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8),
                 "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                 "filenames": [f"{i}.png" for i in range(len(fine))]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def test_cifar100_small_cnn_one_epoch(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar.CIFAR100, "_check_integrity", lambda self: True)  # checksums only
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    write_tiny_cifar(tmp_path / "cifar")
    suite = tmp_path / "cifar-tiny.yaml"
    suite.write_text(f"""
suite: cifar-tiny
seeds: [0]
dataset: {{name: cifar100, params: {{root: "{tmp_path / 'cifar'}", download: false, val_fraction: 0.5, noise: 0.2}}}}
model: {{name: small_cnn, params: {{width: 4}}}}
train: {{epochs: 1, batch_size: 50, eval_batch_size: 100, optimizer: {{name: adam, lr: 1.0e-3}}}}
eval: {{k: [1, 5]}}
losses: [softmax]
resources: {{device: cpu, timeout_min: 5}}
""")
    results = tmp_path / "results"
    assert cli.main(["run", str(suite), "--results-dir", str(results), "--device", "cpu"]) == 0
    records = [json.loads(p.read_text()) for p in (results / "runs").glob("[!.]*.json")]
    assert len(records) == 1 and records[0]["status"] == "done", records
