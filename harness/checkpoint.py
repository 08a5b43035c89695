"""Epoch checkpoints that cannot run code and cannot be mistaken for another run's.

A checkpoint is a `torch.save`d dict of tensors and plain values (numbers, strings, lists, dicts:
state_dicts of the model, loss, optimizer and scheduler, RNG states as uint8 tensors, the history
as a JSON string) read back with `torch.load(weights_only=True)`, whose unpickler refuses anything
else, so a pickle planted at a checkpoint path runs nothing. It carries `FORMAT`, the run id and
the SHA-256 of the run's spec identity; a file that fails to load, lacks a field, or belongs to
another run or format is treated as absent: a warning, the run starts over, and the next epoch's
checkpoint replaces the file.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from harness.spec import RunSpec, canonical_json

log = logging.getLogger(__name__)
FORMAT = "topk-bench-checkpoint/2"
# field -> type every genuine checkpoint has (None values allowed where listed in OPTIONAL)
FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "run_id": str, "spec_sha256": str, "epoch": int, "step": int, "model": dict,
    "optimizer": dict, "loss": dict, "scheduler": dict, "generator": torch.Tensor, "torch_rng": torch.Tensor,
    "cuda_rng": list, "history": str, "train_rank_hist": torch.Tensor,
}
OPTIONAL = {"scheduler", "cuda_rng"}


def spec_sha256(spec: RunSpec) -> str:
    """Full SHA-256 of the spec identity (the run id is its first 16 hex digits)."""
    return hashlib.sha256(canonical_json(spec.identity_dict()).encode()).hexdigest()


def stamp(spec: RunSpec) -> dict[str, str]:
    """The fields that tie a checkpoint to its run."""
    return {"format": FORMAT, "run_id": spec.run_id, "spec_sha256": spec_sha256(spec)}


def save(path: Path, state: dict[str, Any]) -> bool:
    """Write atomically (temp file in the same folder, then os.replace); False (logged) when it cannot."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
        return True
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("cannot write checkpoint %s (%s); the run goes on without checkpoints", path, exc)
        return False


def _problem(state: Any, spec: RunSpec) -> str | None:
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a checkpoint"
    for key, kind in FIELDS.items():
        if key not in state:
            return f"no '{key}'"
        if not isinstance(state[key], kind) and not (key in OPTIONAL and state[key] is None):
            return f"'{key}' is a {type(state[key]).__name__}"
    for key, want in stamp(spec).items():
        if state[key] != want:
            return f"{key} {str(state[key])[:70]!r} is not this run's {want!r}"
    if not 0 <= state["epoch"] < spec.train["epochs"]:
        return f"epoch {state['epoch']} outside this run's {spec.train['epochs']} epochs"
    return None


def load(path: Path, spec: RunSpec) -> dict[str, Any] | None:
    """The checkpoint of `spec` at `path`, or None (with a warning) when absent, unreadable or not this run's."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError (code refused), zip/EOF errors (corrupt), OSError …
        problem = f"cannot be loaded safely ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    else:
        problem = _problem(state, spec)
    if problem is None:
        return state
    log.warning("ignoring checkpoint %s: %s; run %s starts over", path, problem, spec.run_id)
    return None


def remove(path: Path | None) -> None:
    """Delete a finished run's checkpoint; something else at that path (a folder) is left, logged."""
    if path is None:
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove checkpoint %s (%s)", path, exc)
