"""Identify data files by content: a streamed hash, cached by (path, size, mtime).

A run id must change when its data changes and must not change when the same bytes move to
another folder, so data paths enter run ids as a hash of their content (`Param(identity="content")`).
Hashing a large file takes a while (see the README for figures), so digests are cached in memory
and in `$XDG_CACHE_HOME/topk-bench/hashes.json` (default `~/.cache/...`), keyed by the resolved
path, size and mtime (ns): touching a file re-hashes it, and the same bytes give the same digest.
The cache is advisory: a missing, unreadable or corrupt cache only costs a re-hash.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from harness.errors import DataError

log = logging.getLogger(__name__)
ALGORITHM = "sha256"  # faster than blake2b where the CPU has SHA extensions (README: hashing speed)
CHUNK = 4 << 20  # 4 MiB reads
MAX_CACHE_ENTRIES = 2000
_memory: dict[str, str] = {}


def cache_file() -> Path:
    """Where digests are cached on disk (honours XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "topk-bench" / "hashes.json"


def _key(path: Path, st: os.stat_result) -> str:
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _write_cache(new: dict[str, str]) -> None:
    """Merge `new` into the on-disk cache atomically (temp file + os.replace); failures are logged only."""
    path = cache_file()
    try:
        data = {**_read_cache(), **new}
        if len(data) > MAX_CACHE_ENTRIES:  # keep the newest entries (dicts keep insertion order)
            data = dict(list(data.items())[-MAX_CACHE_ENTRIES:])
        from harness.store import atomic_write_text

        atomic_write_text(path, json.dumps(data))
    except OSError as exc:
        log.warning("cannot write the hash cache %s: %s", path, exc)


def _hasher() -> Any:
    return hashlib.new(ALGORITHM)


def hash_file(path: Path) -> str:
    """Streamed digest of one file's bytes (hex)."""
    h = _hasher()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    """Regular files under a folder, sorted by relative path; hidden names (.*) are skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return sorted((f for f in out if f.is_file()), key=lambda f: f.relative_to(root).as_posix())


def content_digest(path_str: str) -> str:
    """`ALGORITHM:hex` of a file's bytes, or of a folder's files (relative names and contents).

    Raises DataError (one line) when the path does not exist or cannot be read.
    """
    path = Path(path_str).expanduser()
    try:
        path = path.resolve(strict=True)
        files = _files(path) if path.is_dir() else [path]
        if path.is_dir() and not files:
            raise DataError(f"{path}: empty folder, nothing to identify the data by")
        new: dict[str, str] = {}
        disk: dict[str, str] | None = None
        digests = []
        for f in files:
            key = _key(f, f.stat())
            digest = _memory.get(key)
            if digest is None:
                disk = _read_cache() if disk is None else disk
                digest = disk.get(key) or hash_file(f)
                _memory[key] = new[key] = digest
            digests.append((f.relative_to(path).as_posix() if path.is_dir() else "", digest))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file or directory (its content identifies the runs)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it to identify the data ({exc.strerror or exc})") from None
    if new and disk is not None and any(disk.get(k) != v for k, v in new.items()):
        _write_cache(new)
    if not path.is_dir():
        return f"{ALGORITHM}:{digests[0][1]}"
    h = _hasher()
    h.update(json.dumps(digests, separators=(",", ":")).encode())
    return f"{ALGORITHM}:{h.hexdigest()}"
