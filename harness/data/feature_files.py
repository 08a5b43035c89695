"""Readers of features files: .npz, .safetensors and folders of .npy files (see harness.data.features).

Everything read here is untrusted: no pickles (`allow_pickle=False`), the safetensors header is
parsed and checked field by field before anything is memory-mapped, and every problem is one
`FeatureFileError` line naming the file. Readers return `(arrays, class_names)`; arrays may be
memory-mapped and are checked for shapes, labels and values by `harness.data.features`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from harness.errors import DataError, short_repr

SPLITS = ("train", "val", "test")
MISSING = "no such file or directory (create it with `topk-bench extract-features` or set dataset.params.path)"
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
              "U64": np.uint64}
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class FeatureFileError(DataError):
    """A feature file is missing, unreadable or inconsistent (one line naming file and problem)."""


def fail(path: Path, problem: str) -> FeatureFileError:
    return FeatureFileError(f"features: {path}: {problem}")


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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _names(path: Path, raw: Any, where: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise fail(path, f"{where} must be a JSON list of strings, got {short_repr(raw)}")
    return raw


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > min(size - 8, MAX_HEADER):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise fail(path, f"not a readable safetensors file ({' '.join(str(exc).split())})") from None
    if not isinstance(header, dict):
        raise fail(path, f"not a readable safetensors file (header is a JSON {type(header).__name__}, not an object)")
    return header, n


def read_safetensors(path: Path) -> tuple[dict[str, Any], list[str] | None]:
    """Memory-map the tensors of a .safetensors file; class names from the header metadata."""
    header, n = _safetensors_header(path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise fail(path, "header __metadata__ is not a JSON object")
    names = None
    if "class_names" in meta:
        try:
            raw = json.loads(meta["class_names"]) if isinstance(meta["class_names"], str) else None
        except (ValueError, RecursionError):
            raw = None
        names = _names(path, raw, "metadata class_names")
    size = os.path.getsize(path)
    arrays: dict[str, Any] = {}
    for key, t in header.items():
        if not isinstance(t, dict):
            raise fail(path, f"{key}: header entry is not a JSON object")
        if t.get("dtype") not in _ST_DTYPES:
            allowed = ", ".join(_ST_DTYPES)
            raise fail(path, f"{key}: unsupported dtype {short_repr(t.get('dtype'))} (allowed: {allowed})")
        offsets, shape = t.get("data_offsets"), t.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise fail(path, f"{key}: data_offsets must be [start, end], 0 ≤ start ≤ end, got {short_repr(offsets)}")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise fail(path, f"{key}: shape must be a list of non-negative integers, got {short_repr(shape)}")
        dtype = np.dtype(_ST_DTYPES[t["dtype"]])
        start, end = offsets
        if end - start != dtype.itemsize * int(np.prod(shape, dtype=object)) or 8 + n + end > size:
            raise fail(path, f"{key}: data offsets do not match its shape (truncated file?)")
        if start == end:  # numpy cannot memory-map zero bytes
            arrays[key] = np.empty(tuple(shape), dtype=dtype)
        else:
            arrays[key] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=tuple(shape))
    return arrays, names


def _shard_number(f: Path, key: str) -> int:
    return int(re.sub(r"\D", "", f.stem[len(key):]) or 0)


def read_npy_dir(path: Path) -> tuple[dict[str, Any], list[str] | None]:
    """`<split>_<kind>.npy` or numbered shards `<split>_<kind>-00000.npy`, … memory-mapped; class_names.txt."""
    arrays: dict[str, Any] = {}
    for split in SPLITS:
        for kind in ("features", "labels"):
            key = f"{split}_{kind}"
            single = path / f"{key}.npy"
            shards = sorted(path.glob(f"{key}-*.npy"), key=lambda f, key=key: _shard_number(f, key))
            try:
                if single.is_file():
                    arrays[key] = np.load(single, mmap_mode="r", allow_pickle=False)
                elif shards:
                    parts = [np.load(f, mmap_mode="r", allow_pickle=False) for f in shards]
                    if any(p.ndim == 0 or p.shape[1:] != parts[0].shape[1:] or p.dtype != parts[0].dtype
                           for p in parts):
                        shapes = sorted({f"{p.dtype} {tuple(p.shape)}" for p in parts})
                        raise fail(path, f"{key} shards differ in dtype or per-sample shape ({'; '.join(shapes)})")
                    arrays[key] = parts[0] if len(parts) == 1 else ShardedArray(parts)
            except (OSError, ValueError) as exc:
                if isinstance(exc, FeatureFileError):
                    raise
                if "pickled" in str(exc):
                    raise fail(path, f"cannot read {key}: it holds pickled objects, which are refused "
                                     "(save plain numeric arrays)") from None
                raise fail(path, f"cannot read {key} ({' '.join(str(exc).split())})") from None
    names_file = path / "class_names.txt"
    names = None
    if names_file.is_file():
        try:
            names = names_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise fail(names_file, f"not UTF-8 text (byte {exc.start}); write one class name per line") from None
        except OSError as exc:
            raise fail(names_file, f"cannot read it ({exc.strerror or exc})") from None
    return arrays, names


def read_npz(path: Path) -> tuple[dict[str, Any], list[str] | None]:
    """Arrays of an .npz file (read into memory; no pickles); class_names a 1-D string array."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile.BadZipFile, pickled object arrays, truncated data, CRC errors …
        raise fail(path, f"not a readable .npz file ({' '.join(str(exc).split())})") from None
    names = arrays.pop("class_names", None)
    if names is None:
        return arrays, None
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise fail(path, f"class_names must be a 1-D string array, got {names.dtype} {names.shape}")
    return arrays, [s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s) for s in names.tolist()]


def open_features(path_str: str | None) -> tuple[Path, dict[str, Any], list[str] | None]:
    """Read a features file or folder by its format; checks that the required keys are there."""
    if not path_str:
        raise FeatureFileError("features: dataset.params.path is required (a .npz, .safetensors or .npy folder)")
    path = Path(path_str).expanduser()
    if not path.exists():
        raise fail(path, MISSING)
    if path.is_dir():
        arrays, names = read_npy_dir(path)
    elif path.suffix == ".safetensors":
        arrays, names = read_safetensors(path)
    elif path.suffix == ".npz":
        arrays, names = read_npz(path)
    else:
        raise fail(path, "unknown format (expected .npz, .safetensors or a folder of .npy files)")
    for key in ("train_features", "train_labels", "val_features", "val_labels"):
        if key not in arrays:
            raise fail(path, f"missing '{key}' (has: {', '.join(sorted(arrays)) or 'nothing'})")
    return path, arrays, names
