"""RunSpec: the frozen, hashable description of one run, and its id."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


def _normalise(value: Any) -> Any:
    """Canonical form: sorted dict keys (by json), floats rounded to 12 significant digits."""
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 2**53:
            return float(int(value))
        return float(f"{value:.12g}")
    return value


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, normalised floats."""
    return json.dumps(_normalise(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class Component:
    """A registered thing (loss, dataset, model) with its version and full parameters."""

    name: str
    version: int = 1
    params: dict = field(default_factory=dict)
    # params as they enter the run id (paths reduced or dropped); None: all params
    identity: dict | None = None

    def identity_dict(self) -> dict:
        return {"name": self.name, "version": self.version,
                "params": self.params if self.identity is None else self.identity}

    def label(self, show: tuple[str, ...] | None = None) -> str:
        """`name[k=5,tau=1]`, listing `show` params (all when None)."""
        keys = sorted(self.params) if show is None else [k for k in sorted(self.params) if k in show]
        if not keys:
            return self.name
        return f"{self.name}[{','.join(f'{k}={_fmt(self.params[k])}' for k in keys)}]"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines a run's numbers. Suite name, paths and device are not in it."""

    loss: Component
    dataset: Component
    model: Component
    train: dict
    eval: dict
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        return cls(
            loss=Component(**d["loss"]), dataset=Component(**d["dataset"]), model=Component(**d["model"]),
            train=d["train"], eval=d["eval"], seed=d["seed"],
        )

    def identity_dict(self) -> dict:
        """What the run id hashes: the spec with location-only parameters reduced or dropped."""
        return {"loss": self.loss.identity_dict(), "dataset": self.dataset.identity_dict(),
                "model": self.model.identity_dict(), "train": self.train, "eval": self.eval, "seed": self.seed}

    @property
    def run_id(self) -> str:
        return hashlib.sha256(canonical_json(self.identity_dict()).encode()).hexdigest()[:16]
