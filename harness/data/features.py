"""Precomputed embeddings (e.g. frozen ImageNet backbones) for training a linear head.

Accepted files (`path`), all holding `train_features` [N, ...] (float16/32/64), `train_labels` [N]
(integers), `val_features`, `val_labels`, optionally `test_features`/`test_labels`, `class_names`:

* `.npz` — arrays under those keys (`np.savez`), read with `allow_pickle=False`; `class_names` is a
  unicode string array. The whole file is read into host memory.
* `.safetensors` — tensors under those keys; `class_names` as a JSON list in the header metadata.
  Arrays are memory-mapped straight from the file (offsets from the header).
* a directory of `.npy` files — `train_features.npy`, `train_labels.npy`, … memory-mapped, or
  numbered shards `train_features-00000.npy`, `train_features-00001.npy`, … (same for labels)
  concatenated in shard-number order (see `ShardedArray`); optional `class_names.txt` (one per line).

Features stay in their storage dtype on the host (float16 halves memory) and are converted to
float32 per batch by `Split.batches`. Splits: when the file has a test split, the file's splits are
used as they are. Otherwise (the paper's ImageNet protocol) `val_holdout` random training samples
(seeded by `split_seed`) become the validation split and the file's val split is the test split;
when `val_holdout` is ≥ the training size, 10 % of train is held out instead (recorded in info).
"""
from __future__ import annotations

import json
import logging
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.data.base import DataBundle, Split
from harness.data.labels import long_tail_subset
from harness.errors import DataError
from harness.registry import Param, register_dataset

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
MISSING = "no such file or directory (create it with `topk-bench extract-features` or set dataset.params.path)"
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
              "U64": np.uint64}

PARAMS = {
    "path": Param(str, None, optional=True, identity="basename",
                  doc="features file (.npz, .safetensors) or folder of .npy"),
    "val_holdout": Param(int, 50000, ge=0, doc="training samples held out as val when the file has no test"),
    "split_seed": Param(int, 0, ge=0, doc="seed of the val holdout"),
    "long_tail": Param(float, 1.0, ge=1.0, identity="unless_default",
                       doc="cut train to an exponential class profile with this imbalance ratio (1: no cut)"),
}


class FeatureFileError(DataError):
    """A feature file is missing, unreadable or inconsistent (one line naming file and problem)."""


class ShardedArray:
    """Several arrays (e.g. memory-mapped shards) presented as one, concatenated along axis 0."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.offsets[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = np.arange(len(self))[idx] if isinstance(idx, slice) else np.asarray(idx)
        if idx.ndim == 0:
            s = int(np.searchsorted(self.offsets, idx, side="right") - 1)
            return np.asarray(self.parts[s][int(idx) - self.offsets[s]])
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        for s in np.unique(shard):
            mask = shard == s
            out[mask] = self.parts[s][idx[mask] - self.offsets[s]]
        return out


class IndexedArray:
    """Rows `index` (sorted) of an array, without copying them (keeps memmaps on disk)."""

    def __init__(self, base: Any, index: np.ndarray) -> None:
        self.base, self.index = base, np.sort(index)
        self.shape = (len(self.index), *base.shape[1:])
        self.dtype = base.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        return np.asarray(self.base[self.index[idx]])


def _fail(path: Path, problem: str) -> FeatureFileError:
    return FeatureFileError(f"features: {path}: {problem}")


def _safetensors(path: Path, keys_only: bool = False) -> tuple[dict[str, Any], list[str] | None]:
    """Memory-map every tensor of a .safetensors file; class names from its metadata."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > os.path.getsize(path) - 8:
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not a readable safetensors file ({exc})") from None
    meta = header.pop("__metadata__", None) or {}
    names = None
    if "class_names" in meta:
        try:
            names = [str(s) for s in json.loads(meta["class_names"])]
        except (ValueError, TypeError):
            raise _fail(path, "metadata class_names is not a JSON list") from None
    arrays: dict[str, Any] = {}
    for key, t in header.items():
        if t.get("dtype") not in _ST_DTYPES:
            raise _fail(path, f"{key}: unsupported dtype {t.get('dtype')}")
        start, end = t["data_offsets"]
        shape = tuple(t["shape"])
        dtype = np.dtype(_ST_DTYPES[t["dtype"]])
        if end - start != dtype.itemsize * int(np.prod(shape)) or 8 + n + end > os.path.getsize(path):
            raise _fail(path, f"{key}: data offsets do not match its shape (truncated file?)")
        if keys_only and not key.endswith("_labels"):
            arrays[key] = None
            continue
        arrays[key] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)
    return arrays, names


def _npy_dir(path: Path) -> tuple[dict[str, Any], list[str] | None]:
    arrays: dict[str, Any] = {}
    for split in SPLITS:
        for kind in ("features", "labels"):
            key = f"{split}_{kind}"
            single = path / f"{key}.npy"
            shards = sorted(path.glob(f"{key}-*.npy"), key=lambda f: int(re.sub(r"\D", "", f.stem[len(key):]) or 0))
            try:
                if single.is_file():
                    arrays[key] = np.load(single, mmap_mode="r", allow_pickle=False)
                elif shards:
                    parts = [np.load(f, mmap_mode="r", allow_pickle=False) for f in shards]
                    arrays[key] = parts[0] if len(parts) == 1 else ShardedArray(parts)
            except (OSError, ValueError) as exc:
                raise _fail(path, f"cannot read {key} ({' '.join(str(exc).split())})") from None
    names_file = path / "class_names.txt"
    names = names_file.read_text().splitlines() if names_file.is_file() else None
    return arrays, names


def _npz(path: Path) -> tuple[dict[str, Any], list[str] | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile.BadZipFile, pickled object arrays, truncated data ...
        raise _fail(path, f"not a readable .npz file ({' '.join(str(exc).split())})") from None
    names = arrays.pop("class_names", None)
    return arrays, None if names is None else [str(s) for s in names.tolist()]


def _open(path_str: str | None) -> tuple[Path, dict[str, Any], list[str] | None]:
    if not path_str:
        raise FeatureFileError("features: dataset.params.path is required (a .npz, .safetensors or .npy folder)")
    path = Path(path_str).expanduser()
    if not path.exists():
        raise _fail(path, MISSING)
    if path.is_dir():
        arrays, names = _npy_dir(path)
    elif path.suffix == ".safetensors":
        arrays, names = _safetensors(path)
    elif path.suffix == ".npz":
        arrays, names = _npz(path)
    else:
        raise _fail(path, "unknown format (expected .npz, .safetensors or a folder of .npy files)")
    for key in ("train_features", "train_labels", "val_features", "val_labels"):
        if key not in arrays:
            raise _fail(path, f"missing '{key}' (has: {', '.join(sorted(arrays)) or 'nothing'})")
    return path, arrays, names


def _labels(path: Path, arrays: dict[str, Any], split: str) -> np.ndarray:
    y = np.asarray(arrays[f"{split}_labels"][:])
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise _fail(path, f"{split}_labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise _fail(path, f"{split}_labels has negative label {int(y.min())}")
    return y.astype(np.int64)


def _check(path: Path, arrays: dict[str, Any], names: list[str] | None) -> tuple[dict[str, np.ndarray], int]:
    """Validate shapes, dtypes and label ranges; return labels per split and the class count."""
    splits = [s for s in SPLITS if f"{s}_features" in arrays or f"{s}_labels" in arrays]
    labels: dict[str, np.ndarray] = {}
    dim = arrays["train_features"].shape[1:]
    for s in splits:
        if f"{s}_features" not in arrays or f"{s}_labels" not in arrays:
            raise _fail(path, f"{s}: needs both {s}_features and {s}_labels")
        x = arrays[f"{s}_features"]
        labels[s] = _labels(path, arrays, s)
        if len(x.shape) < 2 or not np.issubdtype(x.dtype, np.floating):
            raise _fail(path, f"{s}_features must be a float array [N, ...], got {x.dtype} {tuple(x.shape)}")
        if len(x) != len(labels[s]):
            raise _fail(path, f"{s}: {len(x)} features but {len(labels[s])} labels")
        if x.shape[1:] != dim:
            raise _fail(path, f"{s}_features has shape {tuple(x.shape[1:])} per sample, train has {tuple(dim)}")
    top = max(int(y.max()) for y in labels.values() if len(y))
    num_classes = len(names) if names is not None else top + 1
    if top >= num_classes:
        raise _fail(path, f"label {top} out of range for {num_classes} class_names")
    return labels, num_classes


@lru_cache(maxsize=16)
def _num_classes_cached(path: str, mtime: float) -> int:
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        arrays, names = _safetensors(p, keys_only=True)
    elif p.is_file() and p.suffix == ".npz":
        try:  # read only the small arrays
            with np.load(p, allow_pickle=False) as z:
                if "class_names" in z.files:
                    return len(z["class_names"])
                ys = [z[k] for k in z.files if k.endswith("_labels")]
        except Exception as exc:
            raise _fail(p, f"not a readable .npz file ({' '.join(str(exc).split())})") from None
        if not ys or not all(y.ndim == 1 and np.issubdtype(y.dtype, np.integer) and len(y) for y in ys):
            raise _fail(p, "missing or malformed *_labels arrays")
        return int(max(y.max() for y in ys)) + 1
    else:
        _, arrays, names = _open(path)
    if names is not None:
        return len(names)
    ys = [_labels(p, arrays, k[: -len("_labels")]) for k in arrays if k.endswith("_labels")]
    if not ys or not any(len(y) for y in ys):
        raise _fail(p, "no labels")
    return int(max(y.max() for y in ys if len(y))) + 1


def num_classes(params: dict) -> int:
    """Class count from class_names or the labels only (cheap; used to validate suites)."""
    path = params.get("path")
    if not path:
        raise FeatureFileError("features: dataset.params.path is required (a .npz, .safetensors or .npy folder)")
    p = Path(path).expanduser()
    if not p.exists():
        raise _fail(p, MISSING)
    return _num_classes_cached(str(p), p.stat().st_mtime)


@register_dataset("features", version=1, params=PARAMS, num_classes=num_classes)
def load(seed: int, **p) -> DataBundle:
    """Load a features file (see the module docstring for formats and the split protocol)."""
    path, arrays, names = _open(p["path"])
    labels, n_classes = _check(path, arrays, names)
    info: dict[str, Any] = {"path": str(path), "storage_dtype": str(arrays["train_features"].dtype)}
    if "test" in labels:
        train = Split(arrays["train_features"], torch.from_numpy(labels["train"]))
        val = Split(arrays["val_features"], torch.from_numpy(labels["val"]))
        test = Split(arrays["test_features"], torch.from_numpy(labels["test"]))
        info["val_holdout_used"] = 0
    else:
        n = len(labels["train"])
        hold = p["val_holdout"] if p["val_holdout"] < n else n // 10
        if hold != p["val_holdout"]:
            log.warning("features: val_holdout=%d ≥ %d training samples; holding out %d (10%%)",
                        p["val_holdout"], n, hold)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(p["split_seed"])).numpy()
        held, kept = np.sort(perm[:hold]), np.sort(perm[hold:])
        x = arrays["train_features"]
        y = torch.from_numpy(labels["train"])
        train = Split(IndexedArray(x, kept), y[torch.from_numpy(kept)])  # type: ignore[arg-type]
        val = Split(IndexedArray(x, held), y[torch.from_numpy(held)])  # type: ignore[arg-type]
        test = Split(arrays["val_features"], torch.from_numpy(labels["val"]))
        info["val_holdout_used"] = int(hold)
    if p["long_tail"] > 1:  # CIFAR-100-LT's profile on the training split (labels.long_tail_counts)
        sub = long_tail_subset(train.y, n_classes, p["long_tail"], torch.Generator().manual_seed(p["split_seed"] + 1))
        train = Split(IndexedArray(train.x, sub.numpy()), train.y[sub])  # type: ignore[arg-type]
    info.update(train_size=len(train), val_size=len(val), test_size=len(test), class_names=names is not None)
    shape = tuple(int(d) for d in arrays["train_features"].shape[1:])
    return DataBundle(train, val, test, n_classes, shape, info=info)
