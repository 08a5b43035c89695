"""Features dataset: every supported file format loads; broken files give one clear line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from harness.data.features import FeatureFileError, ShardedArray
from harness.registry import DATASETS

C, D = 7, 12


def arrays(seed: int = 0, n_train: int = 120, n_val: int = 40, test: bool = False, dtype=np.float32) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("val", n_val)) + ((("test", 30),) if test else ()):
        out[f"{split}_features"] = rng.standard_normal((n, D)).astype(dtype)
        out[f"{split}_labels"] = (np.arange(n) % C).astype(np.int64)
    return out


def load(path, **params):
    entry = DATASETS.get("features")
    p = entry.validate_params({"path": str(path), **params})
    return entry.obj(seed=0, **p), entry.extra["num_classes"](p)


def all_x(split) -> np.ndarray:
    return np.concatenate([xb.numpy() for xb, _ in split.batches(50, torch.device("cpu"))])


def test_npz_without_test_holds_out_val(tmp_path):
    a = arrays()
    np.savez(tmp_path / "f.npz", **a, class_names=np.array([f"c{i}" for i in range(C)]))
    b, n = load(tmp_path / "f.npz", val_holdout=20)
    assert n == C and b.num_classes == C and b.input_shape == (D,)
    assert (len(b.train), len(b.val), len(b.test)) == (100, 20, 40)
    np.testing.assert_array_equal(all_x(b.test), a["val_features"])  # the file's val is the test split
    both = np.concatenate([all_x(b.train), all_x(b.val)])
    np.testing.assert_array_equal(np.sort(both, axis=0), np.sort(a["train_features"], axis=0))
    assert b.info["val_holdout_used"] == 20
    b2, _ = load(tmp_path / "f.npz")  # default 50 000 ≥ 120 samples: 10 % held out
    assert len(b2.val) == 12 and b2.info["val_holdout_used"] == 12


def test_npz_with_test_and_float16(tmp_path):
    a = arrays(test=True, dtype=np.float16)
    np.savez(tmp_path / "f.npz", **a)
    b, n = load(tmp_path / "f.npz")
    assert n == C and (len(b.train), len(b.val), len(b.test)) == (120, 40, 30)
    xb, yb = next(b.train.batches(16, torch.device("cpu"), torch.Generator().manual_seed(0)))
    assert xb.dtype == torch.float32 and xb.shape == (16, D) and yb.dtype == torch.long
    assert b.info["storage_dtype"] == "float16"
    np.testing.assert_array_equal(all_x(b.val), a["val_features"].astype(np.float32))


def test_npy_directory_memmapped(tmp_path):
    a = arrays()
    for k, v in a.items():
        np.save(tmp_path / f"{k}.npy", v)
    (tmp_path / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(C + 2)))
    b, n = load(tmp_path, val_holdout=30)
    assert n == C + 2 and b.num_classes == C + 2
    assert isinstance(b.test.x, np.memmap)
    np.testing.assert_array_equal(all_x(b.test), a["val_features"])
    assert len(b.train) == 90


def test_sharded_npy(tmp_path):
    a = arrays(dtype=np.float16)
    for k, v in a.items():
        for i, part in enumerate(np.array_split(v, 3 if k.startswith("train") else 1)):
            np.save(tmp_path / f"{k}-{i:05d}.npy", part)
    b, n = load(tmp_path, val_holdout=20)
    assert n == C and len(b.train) + len(b.val) == 120
    x = ShardedArray([np.load(tmp_path / f"train_features-{i:05d}.npy", mmap_mode="r") for i in range(3)])
    assert x.shape == (120, D) and len(x) == 120
    idx = np.array([0, 39, 40, 41, 80, 119])
    np.testing.assert_array_equal(x[idx], a["train_features"][idx])
    np.testing.assert_array_equal(x[5:50], a["train_features"][5:50])
    np.testing.assert_array_equal(x[np.array([119, 0])], a["train_features"][[119, 0]])
    assert float(x[100][0]) == float(a["train_features"][100][0])


def test_safetensors(tmp_path):
    a = arrays(test=True)
    save_file(a, str(tmp_path / "f.safetensors"), metadata={"class_names": json.dumps([f"c{i}" for i in range(C)])})
    b, n = load(tmp_path / "f.safetensors")
    assert n == C and len(b.test) == 30
    np.testing.assert_array_equal(all_x(b.train), a["train_features"])
    np.testing.assert_array_equal(b.val.y.numpy(), a["val_labels"])
    save_file(arrays(dtype=np.float16), str(tmp_path / "g.safetensors"))
    b, n = load(tmp_path / "g.safetensors", val_holdout=10)
    assert n == C and len(b.val) == 10 and b.info["storage_dtype"] == "float16"


def _bad(tmp_path: Path, name: str) -> Path:
    a = arrays()
    p = tmp_path / "f.npz"
    if name == "missing key":
        a.pop("val_labels")
    elif name == "label out of range":
        np.savez(p, **a, class_names=np.array(["a", "b"]))
        return p
    elif name == "mismatched lengths":
        a["train_labels"] = a["train_labels"][:-1]
    elif name == "float labels":
        a["train_labels"] = a["train_labels"].astype(np.float32)
    elif name == "negative label":
        a["val_labels"][0] = -1
    elif name == "wrong dim":
        a["val_features"] = a["val_features"][:, :5]
    elif name == "unreadable":
        p.write_bytes(b"not a zip file at all")
        return p
    elif name == "bad safetensors":
        p = tmp_path / "f.safetensors"
        p.write_bytes(b"\xff" * 64)
        return p
    elif name == "pickled names":
        np.savez(p, **a, class_names=np.array(["a", None], dtype=object))
        return p
    elif name == "unknown format":
        p = tmp_path / "f.h5"
        p.write_bytes(b"x")
        return p
    elif name == "no file":
        return tmp_path / "absent.npz"
    np.savez(p, **a)
    return p


@pytest.mark.parametrize("problem,match", [
    ("missing key", "missing 'val_labels'"), ("label out of range", "out of range for 2 class_names"),
    ("mismatched lengths", "120 features but 119 labels"), ("float labels", "1-D integer"),
    ("negative label", "negative label"), ("wrong dim", "per sample"), ("unreadable", "not a readable .npz"),
    ("bad safetensors", "not a readable safetensors"), ("pickled names", "not a readable .npz"),
    ("unknown format", "unknown format"), ("no file", "no such file"),
])
def test_broken_files_give_one_clear_line(tmp_path, problem, match):
    path = _bad(tmp_path, problem)
    entry = DATASETS.get("features")
    with pytest.raises(FeatureFileError, match=match) as err:
        entry.obj(seed=0, **entry.validate_params({"path": str(path)}))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_path_is_required():
    entry = DATASETS.get("features")
    with pytest.raises(ValueError, match="path is required"):
        entry.extra["num_classes"](entry.validate_params({}))
    with pytest.raises(ValueError, match="path is required"):
        entry.obj(seed=0, **entry.validate_params({}))


def test_truncated_safetensors(tmp_path):
    save_file(arrays(), str(tmp_path / "f.safetensors"))
    data = (tmp_path / "f.safetensors").read_bytes()
    (tmp_path / "f.safetensors").write_bytes(data[:-100])
    with pytest.raises(FeatureFileError, match="truncated"):
        load(tmp_path / "f.safetensors")


def _image_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _extract(tmp_path: Path, *extra: str) -> int:
    import argparse

    from harness import extract

    parser = argparse.ArgumentParser()
    extract.add_arguments(parser)
    args = parser.parse_args(["--root", str(tmp_path / "images"), "--model", "resnet18", "--resize", "32",
                              "--crop", "32", "--workers", "0", "--batch-size", "4", "--device", "cpu",
                              "--out", str(tmp_path / "feats.npz"), *extra])
    return extract.run(args)


def test_extract_features_offline_roundtrip(tmp_path):
    _image_folder(tmp_path / "images")
    assert _extract(tmp_path, "--weights", "none") == 0
    with np.load(tmp_path / "feats.npz", allow_pickle=False) as z:
        assert z["train_features"].shape == (6, 512) and z["train_features"].dtype == np.float16
        assert z["val_labels"].tolist() == [0, 0, 1, 1] and z["class_names"].tolist() == ["cat", "dog"]
    b, n = load(tmp_path / "feats.npz", val_holdout=2)
    assert n == 2 and (len(b.train), len(b.val), len(b.test)) == (4, 2, 4)


def test_extract_features_local_weights_and_errors(tmp_path, caplog):
    import torchvision

    _image_folder(tmp_path / "images")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "w.pth")
    assert _extract(tmp_path, "--weights", str(tmp_path / "w.pth"), "--dtype", "float32") == 0
    with np.load(tmp_path / "feats.npz") as z:
        assert z["val_features"].dtype == np.float32
    assert _extract(tmp_path, "--weights", str(tmp_path / "absent.pth")) == 2
    assert "no such file" in caplog.text
    torch.save({"bogus": torch.zeros(1)}, tmp_path / "bad.pth")
    assert _extract(tmp_path, "--weights", str(tmp_path / "bad.pth")) == 2
    assert "does not fit" in caplog.text


def test_extract_features_through_the_cli(tmp_path):
    cli = pytest.importorskip("harness.cli")
    _image_folder(tmp_path / "images")
    assert cli.main(["extract-features", "--root", str(tmp_path / "images"), "--model", "mobilenet_v3_small",
                     "--weights", "none", "--resize", "32", "--crop", "32", "--workers", "0",
                     "--device", "cpu", "--out", str(tmp_path / "cli")]) == 0
    with np.load(tmp_path / "cli.npz") as z:
        assert z["train_features"].shape[0] == 6 and z["val_features"].shape[0] == 4


# ---- holdout protocol on a real-size file ------------------------------------------------------
N_REAL, D_REAL, C_REAL = 50_676, 64, 100  # the file: ~50 k training samples, no test split


def _real_size(fmt: str, root: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(1)
    a = {"train_features": rng.standard_normal((N_REAL, D_REAL)).astype(np.float16),
         "train_labels": rng.integers(0, C_REAL, N_REAL).astype(np.int64),
         "val_features": rng.standard_normal((5000, D_REAL)).astype(np.float16),
         "val_labels": (np.arange(5000) % C_REAL).astype(np.int64)}
    if fmt == "npz":
        np.savez(root / "f.npz", **a)
        return root / "f.npz", a
    if fmt == "safetensors":
        save_file(a, str(root / "f.safetensors"))
        return root / "f.safetensors", a
    for k, v in a.items():
        for i, part in enumerate(np.array_split(v, 4 if k.startswith("train") else 1)):
            np.save(root / f"{k}-{i:05d}.npy", part)
    return root, a


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "npy"])
def test_default_holdout_is_a_tenth_of_a_real_size_train_set(tmp_path, fmt):
    path, a = _real_size(fmt, tmp_path)
    b, n = load(path)
    hold = round(0.1 * N_REAL)  # 5068: val_fraction 0.1, far below the 50 000 cap
    assert (len(b.train), len(b.val), len(b.test)) == (N_REAL - hold, hold, 5000)
    assert b.info["val_holdout_used"] == hold and b.info["val_source"] == "train holdout"
    d = b.describe()
    assert (d["train_size"], d["val_size"], d["test_size"]) == (N_REAL - hold, hold, 5000)
    assert d["classes"] == n == C_REAL and d["classes_in_train"] == C_REAL and d["classes_in_test"] == C_REAL
    # train and val partition the file's training split (labels as a multiset)
    np.testing.assert_array_equal(np.sort(np.r_[b.train.y.numpy(), b.val.y.numpy()]), np.sort(a["train_labels"]))
    b2, _ = load(path, val_holdout=20_000)  # explicit absolute holdout overrides the fraction
    assert (len(b2.train), len(b2.val)) == (N_REAL - 20_000, 20_000)


def test_holdout_cap_fraction_and_refusal(tmp_path, monkeypatch):
    from harness.data import features

    np.savez(tmp_path / "f.npz", **arrays(n_train=1000))
    b, _ = load(tmp_path / "f.npz", val_fraction=0.25)
    assert (len(b.train), len(b.val)) == (750, 250)
    monkeypatch.setattr(features, "VAL_HOLDOUT_CAP", 40)
    b, _ = load(tmp_path / "f.npz")
    assert len(b.val) == 40 and b.info["val_holdout_used"] == 40
    b, _ = load(tmp_path / "f.npz", val_holdout=500)  # exactly half kept: allowed
    assert len(b.train) == 500
    with pytest.raises(FeatureFileError, match="val_holdout=501 holds out 501 of the 1000 training samples"):
        load(tmp_path / "f.npz", val_holdout=501)
    with pytest.raises(ValueError, match="val_fraction"):
        load(tmp_path / "f.npz", val_fraction=0.6)


def test_file_with_test_split_ignores_holdout_and_describes_itself(tmp_path):
    a = arrays(test=True)
    a["val_labels"][:] = 0  # val holds a single class
    np.savez(tmp_path / "f.npz", **a)
    b, _ = load(tmp_path / "f.npz", val_holdout=100)
    assert b.info["val_holdout_used"] == 0 and b.info["val_source"] == "file"
    assert b.describe() == {"classes": C, "train_size": 120, "val_size": 40, "test_size": 30,
                            "classes_in_train": C, "classes_in_val": 1, "classes_in_test": C}


def test_every_dataset_describes_its_splits():
    from harness.registry import DATASETS

    entry = DATASETS.get("synthetic")
    b = entry.obj(seed=0, **entry.validate_params({"classes": 6, "superclasses": 2, "train_size": 50,
                                                   "val_size": 20, "test_size": 30}))
    d = b.describe()
    assert (d["classes"], d["train_size"], d["val_size"], d["test_size"]) == (6, 50, 20, 30)
    assert d["classes_in_train"] == len(set(b.train.y.tolist())) <= 6
    entry = DATASETS.get("random_images")
    b = entry.obj(seed=0, **entry.validate_params({"classes": 300, "train_size": 40, "val_size": 10,
                                                   "test_size": 10, "image_size": 8}))
    d = b.describe()
    assert d["classes"] == 300 and d["classes_in_train"] == len(set(b.train.y.tolist())) <= 40


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_finite_bit_test_matches_numpy(dtype):
    from harness.data.features import _finite_rows

    info = np.finfo(dtype)
    specials = [np.nan, -np.nan, np.inf, -np.inf, info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0, 0.0]
    x = np.random.default_rng(0).standard_normal((len(specials) * 3, 5)).astype(dtype)
    for i, v in enumerate(specials):
        x[3 * i, i % 5] = v
    np.testing.assert_array_equal(_finite_rows(x), np.isfinite(x).all(axis=1))
    np.testing.assert_array_equal(_finite_rows(x[:, ::2]), np.isfinite(x[:, ::2]).all(axis=1))  # strided view


def test_sparse_labels_need_declared_classes(tmp_path):
    a = arrays()
    a["train_labels"][0] = 999  # 8 distinct labels up to 999: 992 of 1000 classes empty
    np.savez(tmp_path / "f.npz", **a)
    with pytest.raises(FeatureFileError, match="992 of 1000 classes would be empty"):
        load(tmp_path / "f.npz")
    np.savez(tmp_path / "g.npz", **a, class_names=np.array([f"c{i}" for i in range(1000)]))
    b, n = load(tmp_path / "g.npz")  # the file says it has 1000 classes: fine
    assert n == b.num_classes == 1000 and b.describe()["classes"] == 1000
    a["train_labels"][0] = 2 * C - 1  # 13 = max: 7 + 1 used of 14, half empty: still allowed
    np.savez(tmp_path / "h.npz", **a)
    assert load(tmp_path / "h.npz")[1] == 2 * C


def test_record_carries_split_sizes_and_class_counts(tmp_path):
    import json as _json

    from harness.cli import main

    np.savez(tmp_path / "f.npz", **arrays(n_train=200))
    suite = tmp_path / "s.yaml"
    suite.write_text(f"suite: info\nseeds: [0]\ndataset: {{name: features, params: {{path: {tmp_path / 'f.npz'}}}}}\n"
                     "model: {name: linear}\ntrain: {epochs: 1, batch_size: 50}\neval: {k: [1]}\nlosses: [softmax]\n"
                     "resources: {device: cpu}\n")
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "r")]) == 0
    (path,) = (tmp_path / "r").rglob("runs/*.json")
    info = _json.loads(path.read_text())["data_info"]
    assert (info["train_size"], info["val_size"], info["test_size"]) == (180, 20, 40)
    assert info["classes"] == C and info["classes_in_test"] == C and 1 <= info["classes_in_val"] <= C
    assert info["val_source"] == "train holdout" and info["storage_dtype"] == "float32"
