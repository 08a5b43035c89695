"""Data files enter run ids by content: same bytes, same id; different bytes, different ids."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from harness import content_hash
from harness.errors import DataError
from harness.suite import load_suite

SUITE = """suite: ident
seeds: [0]
dataset: {{name: features, params: {{path: {path}}}}}
model: {{name: linear}}
train: {{epochs: 1, batch_size: 16}}
eval: {{k: [1]}}
losses: [softmax]
"""


def write_npz(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, train_features=rng.standard_normal((40, 3)).astype(np.float32),
             train_labels=np.arange(40) % 4, val_features=rng.standard_normal((8, 3)).astype(np.float32),
             val_labels=np.arange(8) % 4)
    return path


def run_id(tmp_path: Path, data: Path) -> str:
    suite = tmp_path / f"suite-{abs(hash(str(data)))}.yaml"
    suite.write_text(SUITE.format(path=json.dumps(str(data))))
    (spec,) = load_suite(suite).runs
    return spec.run_id


@pytest.fixture(autouse=True)
def fresh_memory(monkeypatch):
    monkeypatch.setattr(content_hash, "_memory", {})


def test_same_name_different_data_gives_different_runs(tmp_path):
    a = write_npz(tmp_path / "A" / "f.npz", seed=0)
    b = write_npz(tmp_path / "B" / "f.npz", seed=1)
    assert run_id(tmp_path, a) != run_id(tmp_path, b)


def test_same_content_anywhere_and_touched_gives_the_same_run(tmp_path):
    a = write_npz(tmp_path / "A" / "f.npz", seed=0)
    c = tmp_path / "C" / "other-name.npz"
    c.parent.mkdir()
    shutil.copyfile(a, c)
    first = run_id(tmp_path, a)
    assert run_id(tmp_path, c) == first
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert run_id(tmp_path, a) == first


def test_digest_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    a = write_npz(tmp_path / "f.npz", seed=0)
    calls = []
    real = content_hash.hash_file
    monkeypatch.setattr(content_hash, "hash_file", lambda p: calls.append(p) or real(p))
    d1 = content_hash.content_digest(str(a))
    assert d1.startswith("sha256:") and len(calls) == 1
    assert content_hash.content_digest(str(a)) == d1 and len(calls) == 1  # memory
    monkeypatch.setattr(content_hash, "_memory", {})
    assert content_hash.content_digest(str(a)) == d1 and len(calls) == 1  # disk cache
    assert content_hash.cache_file() == Path(os.environ["XDG_CACHE_HOME"]) / "topk-bench" / "hashes.json"
    assert content_hash.cache_file().is_file()
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert content_hash.content_digest(str(a)) == d1 and len(calls) == 2  # touched: re-hashed, same digest
    write_npz(a, seed=3)
    assert content_hash.content_digest(str(a)) != d1 and len(calls) == 3


def test_digest_matches_a_plain_hash_and_survives_a_corrupt_cache(tmp_path):
    import hashlib

    a = write_npz(tmp_path / "f.npz", seed=0)
    content_hash.cache_file().parent.mkdir(parents=True, exist_ok=True)
    content_hash.cache_file().write_text("[not, a, dict")
    expected = hashlib.sha256(a.read_bytes()).hexdigest()
    assert content_hash.content_digest(str(a)) == f"sha256:{expected}"
    assert json.loads(content_hash.cache_file().read_text())  # rewritten as a valid cache


def test_folder_digest_covers_names_and_contents(tmp_path):
    folder = tmp_path / "feats"
    folder.mkdir()
    for name, value in (("train_features.npy", 1.0), ("train_labels.npy", 2.0)):
        np.save(folder / name, np.full(4, value))
    d = content_hash.content_digest(str(folder))
    (folder / ".hidden").write_text("editor swap file")
    assert content_hash.content_digest(str(folder)) == d
    np.save(folder / "train_labels.npy", np.full(4, 3.0))
    assert content_hash.content_digest(str(folder)) != d
    np.save(folder / "train_labels.npy", np.full(4, 2.0))
    assert content_hash.content_digest(str(folder)) == d
    (folder / "train_labels.npy").rename(folder / "val_labels.npy")  # same bytes, another role
    assert content_hash.content_digest(str(folder)) != d


def test_missing_data_is_a_one_line_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        content_hash.content_digest(str(tmp_path / "absent.npz"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty folder"):
        content_hash.content_digest(str(tmp_path / "empty"))
