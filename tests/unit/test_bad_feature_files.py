"""Malformed feature files, written in the real on-disk formats: each one is refused up front.

Every case goes through `topk-bench run` and must end with exit 2, exactly one stderr line naming
the file, and a results directory left exactly as it was (no run started).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from safetensors.numpy import save_file

from harness.cli import main

C, D = 5, 6


def arrays(n_train: int = 60, n_val: int = 20, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        out[f"{split}_features"] = rng.standard_normal((n, D)).astype(dtype)
        out[f"{split}_labels"] = (np.arange(n) % C).astype(np.int64)
    return out


def npz(**change) -> Callable[[Path], Path]:
    """A .npz with `change` applied to the good arrays (value None drops the key)."""

    def write(d: Path) -> Path:
        a = {**arrays(), **change}
        np.savez(d / "f.npz", **{k: v for k, v in a.items() if v is not None})
        return d / "f.npz"

    return write


def with_nan(key: str, value: float, row: int = 7) -> np.ndarray:
    x = arrays()[key].copy()
    x[row, 2] = value
    return x


def st_header(edit: Callable[[dict], object]) -> Callable[[Path], Path]:
    """A genuine .safetensors file whose JSON header is replaced by `edit(header)`."""

    def write(d: Path) -> Path:
        path = d / "f.safetensors"
        save_file(arrays(), str(path))
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.dumps(edit(json.loads(raw[8:8 + n]))).encode()
        header += b" " * (-len(header) % 8)
        path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
        return path

    return write


def st_raw(header: bytes) -> Callable[[Path], Path]:
    def write(d: Path) -> Path:
        (d / "f.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
        return d / "f.safetensors"

    return write


def npy_dir(edit: Callable[[Path], None] | None = None, **change) -> Callable[[Path], Path]:
    """A folder of .npy files (`change` replaces arrays, None drops one), then `edit(folder)`."""

    def write(d: Path) -> Path:
        folder = d / "feats"
        folder.mkdir()
        for k, v in {**arrays(), **change}.items():
            if v is not None:
                np.save(folder / f"{k}.npy", v)
        if edit:
            edit(folder)
        return folder

    return write


def _shards_of_different_dims(folder: Path) -> None:
    (folder / "train_features.npy").unlink()
    x = arrays()["train_features"]
    np.save(folder / "train_features-00000.npy", x[:30])
    np.save(folder / "train_features-00001.npy", np.zeros((30, D + 1), np.float32))


def _nan_in_second_shard(folder: Path) -> None:
    (folder / "train_features.npy").unlink()
    x = arrays()["train_features"]
    bad = x[30:].copy()
    bad[3, 0] = np.nan
    np.save(folder / "train_features-00000.npy", x[:30])
    np.save(folder / "train_features-00001.npy", bad)


class Payload:
    def __reduce__(self):
        return (print, ("pickle payload ran",))


def _pickled_npy(folder: Path) -> None:
    (folder / "train_labels.npy").write_bytes(pickle.dumps(np.array([Payload()], dtype=object)))


CASES: dict[str, tuple[Callable[[Path], Path], str, dict]] = {
    # name: (writer, expected fragment of the message, extra dataset params)
    "npz length mismatch": (npz(train_labels=arrays()["train_labels"][:-3]), "60 features but 57 labels", {}),
    "npz negative label": (npz(val_labels=arrays()["val_labels"] - 1), "negative label -1", {}),
    "npz label beyond class_names": (npz(class_names=np.array(["a", "b", "c"])), "out of range for 3 class_names", {}),
    "npz NaN in train features": (npz(train_features=with_nan("train_features", np.nan)), "NaN or infinite", {}),
    "npz inf in val features": (npz(val_features=with_nan("val_features", np.inf, 3)), "first in row 3", {}),
    "npz float16 inf": (npz(train_features=with_nan("train_features", np.inf).astype(np.float16)), "infinite", {}),
    "npz 1-D features": (npz(train_features=np.zeros(60, np.float32)), "must be a float array [N, ...]", {}),
    "npz missing key": (npz(val_labels=None), "missing 'val_labels'", {}),
    "npz label 10**6": (npz(train_labels=np.r_[arrays()["train_labels"][:-1], 10**6]), "classes would be empty", {}),
    "npz uint64 label 2**63": (npz(val_labels=np.r_[arrays()["val_labels"][:-1].astype(np.uint64), np.uint64(2**63 + 5)]),
                               "far beyond any class count", {}),
    "npz float labels": (npz(train_labels=arrays()["train_labels"].astype(np.float64)), "1-D integer array", {}),
    "npz empty train": (npz(train_features=np.zeros((0, D), np.float32), train_labels=np.zeros(0, np.int64)),
                        "train split is empty", {}),
    "npz one class": (npz(train_labels=np.zeros(60, np.int64), val_labels=np.zeros(20, np.int64)),
                      "at least 2 classes", {}),
    "npz no values per sample": (npz(train_features=np.zeros((60, 0), np.float32),
                                     val_features=np.zeros((20, 0), np.float32)), "no values per sample", {}),
    "npz pickled class_names": (npz(class_names=np.array(["a", Payload()], dtype=object)), "not a readable .npz", {}),
    "npz not a zip": (lambda d: (d / "f.npz").write_bytes(b"PK\x03\x04 garbage") and d / "f.npz",
                      "not a readable .npz", {}),
    "npz holdout leaves too little": (npz(), "leaving fewer than 50%", {"val_holdout": 31}),
    "safetensors header is a list": (st_header(lambda h: [h]), "header is a JSON list", {}),
    "safetensors without data_offsets": (st_header(lambda h: {**h, "train_labels": {
        k: v for k, v in h["train_labels"].items() if k != "data_offsets"}}), "data_offsets must be", {}),
    "safetensors negative shape": (st_header(lambda h: {**h, "val_features": {**h["val_features"], "shape": [-20, -6]}}),
                                   "shape must be a list of non-negative integers", {}),
    "safetensors fractional shape": (st_header(lambda h: {**h, "val_features": {**h["val_features"], "shape": [2.5, 6]}}),
                                     "shape must be a list of non-negative integers", {}),
    "safetensors entry not an object": (st_header(lambda h: {**h, "val_labels": [1, 2]}), "not a JSON object", {}),
    "safetensors class_names not a list": (st_header(lambda h: {**h, "__metadata__": {"class_names": "{}"}}),
                                           "class_names must be a JSON list of strings", {}),
    "safetensors header not UTF-8": (st_raw(b"{\"\xff\xfe\": 1}   "), "not a readable safetensors", {}),
    "safetensors deeply nested header": (st_raw(b"[" * 100000 + b"]" * 100000), "not a readable safetensors", {}),
    "safetensors header longer than file": (lambda d: (d / "f.safetensors").write_bytes(
        (10**9).to_bytes(8, "little") + b"{}") and d / "f.safetensors", "does not fit", {}),
    "npy class_names.txt not UTF-8": (npy_dir(lambda f: (f / "class_names.txt").write_bytes(b"cat\n\xe9l\xe9phant\n")),
                                      "not UTF-8 text", {}),
    "npy shards of different dims": (npy_dir(_shards_of_different_dims), "shards differ", {}),
    "npy NaN in a shard": (npy_dir(_nan_in_second_shard), "first in row 33", {}),
    "npy missing train_labels": (npy_dir(train_labels=None), "missing 'train_labels'", {}),
    "npy pickled labels": (npy_dir(_pickled_npy), "pickled objects, which are refused", {}),
    "npy wrong per-sample shape": (npy_dir(val_features=np.zeros((20, D, 2), np.float32)), "per sample", {}),
    "no such file": (lambda d: d / "absent.npz", "no such file", {}),
}

SUITE = """suite: bad-features
seeds: [0]
dataset: {{name: features, params: {params}}}
model: {{name: linear}}
train: {{epochs: 1, batch_size: 16}}
eval: {{k: [1, 2]}}
losses: [softmax]
resources: {{device: cpu}}
"""


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else b"<dir>" for p in root.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_feature_file_is_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    writer, fragment, extra = CASES[case]
    (tmp_path / "data").mkdir()
    path = writer(tmp_path / "data")
    params = json.dumps({"path": str(path), **extra})
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE.format(params=params))
    results = tmp_path / "results"
    results.mkdir()
    (results / "keep.txt").write_text("untouched")
    before = tree(results)
    capsys.readouterr()

    code = main(["run", str(suite), "--results-dir", str(results)])

    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert fragment in lines[0] and path.name in lines[0], lines[0]
    assert "Payload" not in err and "pickle payload ran" not in capsys.readouterr().out
    assert tree(results) == before


def test_corpus_is_large_enough():
    assert len(CASES) >= 15
    formats = {name.split()[0] for name in CASES}
    assert {"npz", "safetensors", "npy"} <= formats
