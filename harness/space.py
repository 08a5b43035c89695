"""Search-space hints for hyperparameters: `Log(lo, hi)`, `Linear(lo, hi)`, `Choice(a, b, …)`.

A loss declares them on its `Param`s (`Param(float, 1.0, gt=0, search=Log(1e-3, 10))`); a suite's
`tune:` block overrides or narrows them with the same three forms in YAML (`{log: [lo, hi]}`,
`{linear: [lo, hi]}`, `{choice: [...]}`). `when` limits a hint to rows whose fixed parameters take
the given values (e.g. the λ of difftopk's `logistic_phi` relaxation only when that is the
relaxation). Constructors raise ValueError on an empty, inverted or (log) non-positive range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SIGNIFICANT = 4  # sampled floats are rounded to this many significant digits (readable labels, stable ids)


def _when(when: dict[str, Any] | None) -> dict[str, tuple]:
    return {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in (when or {}).items()}


@dataclass(frozen=True)
class _Range:
    low: float
    high: float
    when: dict[str, tuple] = field(default_factory=dict)

    log = False

    def __post_init__(self) -> None:
        for bound in (self.low, self.high):
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                raise ValueError(f"range bounds must be finite numbers, got [{self.low}, {self.high}]")
        if self.low == self.high:
            raise ValueError(f"empty range [{self.low}, {self.high}] (low must be below high)")
        if self.low > self.high:
            raise ValueError(f"inverted range [{self.low}, {self.high}] (low must be below high)")
        object.__setattr__(self, "when", _when(self.when))

    def endpoints(self) -> list[Any]:
        return [self.low, self.high]

    def suggest(self, trial: Any, name: str, integer: bool) -> Any:
        """Ask an Optuna trial for a value of this range."""
        if integer:
            return trial.suggest_int(name, math.ceil(self.low), math.floor(self.high), log=self.log)
        value = round_sig(trial.suggest_float(name, float(self.low), float(self.high), log=self.log))
        return min(max(value, float(self.low)), float(self.high))  # rounding never leaves the range

    def grid(self, n: int, integer: bool) -> list[Any]:
        """`n` evenly spaced points (geometrically for Log), for the grid sampler."""
        import numpy as np  # lazily: `topk-bench --help` imports the registry, and must stay light

        pts = (np.geomspace if self.log else np.linspace)(self.low, self.high, max(n, 2))
        if integer:
            return sorted({int(round(p)) for p in pts})
        return [round_sig(float(p)) for p in pts]


@dataclass(frozen=True)
class Log(_Range):
    """A range searched on a log scale; both bounds strictly positive."""

    log = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.low <= 0:
            raise ValueError(f"log range [{self.low}, {self.high}] must not reach 0 or below (use linear)")

    def describe(self) -> str:
        return f"log[{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Linear(_Range):
    """A range searched on a linear scale."""

    def describe(self) -> str:
        return f"linear[{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Choice:
    """A finite set of values (strings, numbers, booleans)."""

    values: tuple[Any, ...]
    when: dict[str, tuple] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = tuple(self.values)
        if not values:
            raise ValueError("empty choice (give at least one value)")
        if len({repr(v) for v in values}) != len(values):
            raise ValueError(f"choice lists a value twice: {list(values)}")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "when", _when(self.when))

    def endpoints(self) -> list[Any]:
        return list(self.values)

    def suggest(self, trial: Any, name: str, integer: bool) -> Any:
        return trial.suggest_categorical(name, list(self.values))

    def grid(self, n: int, integer: bool) -> list[Any]:
        return list(self.values)

    def describe(self) -> str:
        return "choice{" + ", ".join(map(str, self.values)) + "}"


Space = Log | Linear | Choice


def applies(space: Space, fixed: dict[str, Any]) -> bool:
    """Whether the hint is active for a row with these fixed parameters (see `when`)."""
    return all(fixed.get(key) in allowed for key, allowed in space.when.items())


def round_sig(value: float, digits: int = SIGNIFICANT) -> float:
    return float(f"{value:.{digits}g}")


def parse(value: Any) -> Space:
    """A space from its YAML form: `{log: [lo, hi]}`, `{linear: [lo, hi]}` or `{choice: [...]}`.

    Raises ValueError with a short reason (the caller adds the key path).
    """
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError(f"expected one of {{log: [lo, hi]}}, {{linear: [lo, hi]}}, {{choice: [...]}}, got {value!r}")
    (kind, arg), = value.items()
    if kind == "choice":
        if not isinstance(arg, list):
            raise ValueError(f"choice: expected a list of values, got {arg!r}")
        return Choice(tuple(arg))
    if kind in ("log", "linear"):
        if not isinstance(arg, list) or len(arg) != 2:
            raise ValueError(f"{kind}: expected [low, high], got {arg!r}")
        return (Log if kind == "log" else Linear)(arg[0], arg[1])
    raise ValueError(f"unknown space kind '{kind}'; allowed: log, linear, choice")
