"""Precomputed embeddings (e.g. frozen ImageNet backbones) for training a linear head.

Accepted files (`path`), all holding `train_features` [N, ...] (float16/32/64), `train_labels` [N]
(integers), `val_features`, `val_labels`, optionally `test_features`/`test_labels`, `class_names`:

* `.npz` — arrays under those keys (`np.savez`), read with `allow_pickle=False`; `class_names` is a
  unicode string array. The whole file is read into host memory.
* `.safetensors` — tensors under those keys; `class_names` as a JSON list in the header metadata.
  Arrays are memory-mapped straight from the file (offsets from the header).
* a directory of `.npy` files — `train_features.npy`, `train_labels.npy`, … memory-mapped, or
  numbered shards `train_features-00000.npy`, `train_features-00001.npy`, … (same for labels)
  concatenated in shard-number order (see `ShardedArray`); optional `class_names.txt` (one per line, UTF-8).

Features stay in their storage dtype on the host (float16 halves memory) and are converted to
float32 per batch by `Split.batches`. Splits: when the file has a test split, the file's splits are
used as they are. Otherwise (the paper's ImageNet protocol) random training samples (seeded by
`split_seed`) become the validation split and the file's val split is the test split: `val_holdout`
samples when given, else `val_fraction` of train capped at `VAL_HOLDOUT_CAP` (50 000, the paper's
holdout for ImageNet's 1.28 M images, so the default reproduces it there). A holdout that leaves
less than half of the training samples is refused.

The data is checked once, up front, by the `num_classes` hook that suite validation calls (and
again by `load`): keys, shapes, dtypes, lengths, label range, finite feature values (scanned in
chunks), and that labels do not leave most of 0..max empty unless the file declares class_names.
The path enters the run id by content (`Param(identity="content")`): same bytes, same runs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.data.base import DataBundle, Split
from harness.data.feature_files import (  # noqa: F401  (re-exported for users and tests)
    MISSING, SPLITS, FeatureFileError, IndexedArray, ShardedArray, fail, open_features,
)
from harness.registry import Param, register_dataset

log = logging.getLogger(__name__)
VAL_HOLDOUT_CAP = 50_000
MIN_TRAIN_KEPT = 0.5  # a holdout must leave at least this fraction of the training samples
MAX_EMPTY_CLASSES = 0.5  # without class_names, at most this fraction of 0..max may be unused labels
SCAN_BYTES = 32 << 20  # chunk size of the finite-value scan
_scanned: set[tuple[str, tuple]] = set()  # (path, stamp) of file versions this process checked in full

PARAMS = {
    "path": Param(str, None, optional=True, identity="content", path=True,
                  doc="features file (.npz, .safetensors) or folder of .npy; its content identifies the runs"),
    "val_fraction": Param(float, 0.1, gt=0, le=MIN_TRAIN_KEPT,
                          doc=f"fraction of train held out as val when the file has no test (≤ {VAL_HOLDOUT_CAP})"),
    "val_holdout": Param(int, None, optional=True, ge=1,
                         doc="absolute number of training samples held out as val (overrides val_fraction)"),
    "split_seed": Param(int, 0, ge=0, doc="seed of the val holdout"),
}


@dataclass(frozen=True)
class Summary:
    """What validation learnt about a file (cached per file version)."""

    num_classes: int
    sizes: dict[str, int]
    has_test: bool


def _labels(path: Path, arrays: dict[str, Any], split: str) -> np.ndarray:
    raw = arrays[f"{split}_labels"]
    if len(raw.shape) != 1 or not np.issubdtype(raw.dtype, np.integer):
        raise fail(path, f"{split}_labels must be a 1-D integer array, got {raw.dtype} {tuple(raw.shape)}")
    y = np.asarray(raw[:])
    if not len(y):
        raise fail(path, f"{split} split is empty")
    if y.min() < 0:
        raise fail(path, f"{split}_labels has negative label {int(y.min())}")
    if int(y.max()) >= 2**62:
        raise fail(path, f"{split}_labels has label {int(y.max())}, far beyond any class count")
    return y.astype(np.int64)


def _finite_rows(chunk: np.ndarray) -> np.ndarray:
    """Per row: all values finite. IEEE bit test (exponent not all ones): ~3× np.isfinite on float16."""
    chunk = np.ascontiguousarray(chunk).reshape(len(chunk), -1)
    size = chunk.dtype.itemsize
    if size not in (2, 4, 8):  # long double: no unsigned twin
        return np.isfinite(chunk).all(axis=1)
    info = np.finfo(chunk.dtype)
    exponent = ((1 << info.nexp) - 1) << info.nmant
    return ((chunk.view(f"u{size}") & exponent) != exponent).all(axis=1)


def _scan_finite(path: Path, key: str, x: Any) -> None:
    """Raise if `x` holds NaN or ±inf; reads it in chunks of about SCAN_BYTES."""
    row_bytes = max(1, int(np.prod(x.shape[1:])) * x.dtype.itemsize)
    step = max(1, SCAN_BYTES // row_bytes)
    for start in range(0, len(x), step):
        finite = _finite_rows(np.asarray(x[start:start + step]))
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise fail(path, f"{key} has NaN or infinite values (first in row {row})")


def inspect(path: Path, arrays: dict[str, Any], names: list[str] | None,
            scan_values: bool = True) -> tuple[dict[str, np.ndarray], Summary]:
    """Validate shapes, dtypes, labels (and feature values); return labels per split and a summary."""
    splits = [s for s in SPLITS if f"{s}_features" in arrays or f"{s}_labels" in arrays]
    labels: dict[str, np.ndarray] = {}
    dim = tuple(arrays["train_features"].shape[1:])
    for s in splits:
        if f"{s}_features" not in arrays or f"{s}_labels" not in arrays:
            raise fail(path, f"{s}: needs both {s}_features and {s}_labels")
        x = arrays[f"{s}_features"]
        if len(x.shape) < 2 or not np.issubdtype(x.dtype, np.floating):
            raise fail(path, f"{s}_features must be a float array [N, ...], got {x.dtype} {tuple(x.shape)}")
        if tuple(x.shape[1:]) != dim:
            raise fail(path, f"{s}_features has shape {tuple(x.shape[1:])} per sample, train has {dim}")
        if not int(np.prod(dim)):
            raise fail(path, f"{s}_features has no values per sample (shape {tuple(x.shape)})")
        labels[s] = _labels(path, arrays, s)
        if len(x) != len(labels[s]):
            raise fail(path, f"{s}: {len(x)} features but {len(labels[s])} labels")
    top = max(int(y.max()) for y in labels.values())
    if names is not None:
        num_classes = len(names)
        if top >= num_classes:
            raise fail(path, f"label {top} out of range for {num_classes} class_names")
    else:
        num_classes = top + 1
        used = len(np.unique(np.concatenate(list(labels.values()))))
        if num_classes - used > MAX_EMPTY_CLASSES * num_classes:
            raise fail(path, f"labels use {used} distinct values but go up to {top}, so {num_classes - used} of "
                             f"{num_classes} classes would be empty; remap labels to 0..{used - 1} or declare "
                             "class_names")
    if num_classes < 2:
        raise fail(path, f"needs at least 2 classes, found {num_classes}")
    if scan_values:
        for s in splits:
            _scan_finite(path, f"{s}_features", arrays[f"{s}_features"])
    return labels, Summary(num_classes, {s: len(labels[s]) for s in splits}, "test" in labels)


def _stamp(path: Path) -> tuple:
    """(name, size, mtime) of the file, or of every file in a folder: changes when the data may have."""
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    return tuple((f.name, (st := f.stat()).st_size, st.st_mtime_ns) for f in files)


@lru_cache(maxsize=16)
def _summary(path: str, stamp: tuple) -> Summary:
    p, arrays, names = open_features(path)
    summary = inspect(p, arrays, names)[1]
    _scanned.add((path, stamp))
    return summary


def holdout_size(path: Path, params: dict, summary: Summary) -> int:
    """Training samples held out as val (0 when the file has a test split); refuses too large a holdout."""
    if summary.has_test:
        return 0
    n = summary.sizes["train"]
    if params.get("val_holdout") is not None:
        hold, source = params["val_holdout"], f"val_holdout={params['val_holdout']}"
    else:
        fraction = params.get("val_fraction", 0.1)
        hold = min(max(1, round(fraction * n)), VAL_HOLDOUT_CAP)
        source = f"val_fraction={fraction:g}"
    if n - hold < MIN_TRAIN_KEPT * n or n - hold < 1:
        raise fail(path, f"{source} holds out {hold} of the {n} training samples, leaving fewer than "
                         f"{MIN_TRAIN_KEPT:.0%} to train on; lower it (the file has no test split, so val comes "
                         "from train)")
    return int(hold)


def _path(params: dict) -> Path:
    if not params.get("path"):
        raise FeatureFileError("features: dataset.params.path is required (a .npz, .safetensors or .npy folder)")
    path = Path(params["path"]).expanduser()
    if not path.exists():
        raise fail(path, MISSING)
    return path


def num_classes(params: dict) -> int:
    """Validate the file once (cached per file version) and the holdout; return the class count.

    Suite validation calls this, so a bad file or holdout is one line before any run starts.
    """
    path = _path(params)
    try:
        summary = _summary(str(path), _stamp(path))
    except OSError as exc:
        raise fail(path, f"cannot read it ({exc.strerror or exc})") from None
    holdout_size(path, params, summary)
    return summary.num_classes


@register_dataset("features", version=2, params=PARAMS, num_classes=num_classes)
def load(seed: int, **p) -> DataBundle:
    """Load a features file (see the module docstring for formats and the split protocol)."""
    key = (str(_path(p)), _stamp(_path(p)))
    path, arrays, names = open_features(p["path"])
    labels, summary = inspect(path, arrays, names, scan_values=key not in _scanned)  # values: once per process
    _scanned.add(key)
    hold = holdout_size(path, p, summary)
    info: dict[str, Any] = {"path": str(path), "storage_dtype": str(arrays["train_features"].dtype),
                            "class_names": names is not None, "val_holdout_used": hold,
                            "val_source": "file" if summary.has_test else "train holdout",
                            "test_source": "file test split" if summary.has_test else "file val split"}
    if summary.has_test:
        train = Split(arrays["train_features"], torch.from_numpy(labels["train"]))
        val = Split(arrays["val_features"], torch.from_numpy(labels["val"]))
        test = Split(arrays["test_features"], torch.from_numpy(labels["test"]))
    else:
        n = len(labels["train"])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(p["split_seed"])).numpy()
        held, kept = np.sort(perm[:hold]), np.sort(perm[hold:])
        x = arrays["train_features"]
        y = torch.from_numpy(labels["train"])
        train = Split(IndexedArray(x, kept), y[torch.from_numpy(kept)])  # type: ignore[arg-type]
        val = Split(IndexedArray(x, held), y[torch.from_numpy(held)])  # type: ignore[arg-type]
        test = Split(arrays["val_features"], torch.from_numpy(labels["val"]))
        lost = len(np.unique(labels["train"])) - int(torch.unique(train.y).numel())
        if lost:
            log.warning("features: %s: the val holdout took every training sample of %d classes", path, lost)
    shape = tuple(int(d) for d in arrays["train_features"].shape[1:])
    return DataBundle(train, val, test, summary.num_classes, shape, info=info)
