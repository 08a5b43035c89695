"""Generic name -> object registry with parameter schemas, aliases and did-you-mean."""
from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, TypeVar

from harness.errors import RegistryError
from harness.space import Choice, Linear, Log, Space  # noqa: F401  (re-exported for loss modules)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Param:
    """Schema of one hyperparameter: type, default and allowed values."""

    type: type | tuple[type, ...]
    default: Any = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    optional: bool = False  # None is an allowed value
    doc: str = ""
    # How the value enters the run id: "value" (as is), "ignore" (where data lives, e.g. a cache
    # folder), "basename" (a file path: its name identifies the data, its folder does not).
    identity: str = "value"
    # Where tuning searches this parameter (harness/space.py): Log(lo, hi), Linear(lo, hi) or
    # Choice(...); None: not tuned unless a suite's `tune.space` names it.
    search: Space | None = None

    def check(self, name: str, value: Any) -> Any:
        """Return the value (ints promoted to float where a float is wanted) or raise RegistryError."""
        if value is None and self.optional:
            return None
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in types:
            raise RegistryError(f"{name}: expected {_type_name(types)}, got {value!r}")
        if not isinstance(value, types):
            raise RegistryError(f"{name}: expected {_type_name(types)}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            hint = _closest(str(value), [str(c) for c in self.choices])
            raise RegistryError(f"{name}: {value!r} is not one of {list(self.choices)}{hint}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for bound, op, ok in (
                (self.ge, ">=", lambda v, b: v >= b),
                (self.gt, ">", lambda v, b: v > b),
                (self.le, "<=", lambda v, b: v <= b),
                (self.lt, "<", lambda v, b: v < b),
            ):
                if bound is not None and not ok(value, bound):
                    raise RegistryError(f"{name}: {value!r} out of range (must be {op} {bound})")
        return value

    def describe(self) -> str:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        parts = [_type_name(types), f"default={self.default!r}"]
        for label, bound in (("≥", self.ge), (">", self.gt), ("≤", self.le), ("<", self.lt)):
            if bound is not None:
                parts.append(f"{label}{bound}")
        if self.choices is not None:
            parts.append("one of " + "|".join(map(str, self.choices)))
        if self.search is not None:
            parts.append("tune " + self.search.describe())
        return " ".join(parts)


def _type_name(types: Iterable[type]) -> str:
    return "|".join(t.__name__ for t in types)


def _closest(name: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


@dataclass
class Entry(Generic[T]):
    """A registered object and its metadata."""

    name: str
    obj: T
    params: dict[str, Param] = field(default_factory=dict)
    family: str = ""
    paper: str = ""
    version: int = 1
    requires: tuple[str, ...] = ()
    doc: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    load_error: str | None = None

    @property
    def unavailable_reason(self) -> str | None:
        if self.load_error:
            return self.load_error
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return f"needs {', '.join(missing)} (pip install {' '.join(missing)})" if missing else None

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    def identity_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """The parameters as they enter the run id (see Param.identity)."""
        out = {}
        for key, value in params.items():
            mode = self.params[key].identity if key in self.params else "value"
            if mode == "basename" and isinstance(value, str):
                out[key] = value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
            elif mode != "ignore":
                out[key] = value
        return out

    def validate_params(self, params: dict[str, Any], where: str = "params") -> dict[str, Any]:
        """Check user params against the schema; return them with defaults filled in."""
        unknown = [k for k in params if k not in self.params]
        if unknown:
            hint = _closest(unknown[0], self.params)
            allowed = ", ".join(self.params) or "none"
            raise RegistryError(
                f"{where}.{unknown[0]}: unknown parameter of '{self.name}'{hint}; allowed: {allowed}"
            )
        out = {k: p.default for k, p in self.params.items()}
        for key, value in params.items():
            out[key] = self.params[key].check(f"{where}.{key}", value)
        return out


class Registry(Generic[T]):
    """Name -> Entry mapping; third-party entries arrive through an entry-point group."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}
        self._plugins_loaded = False

    def register(
        self,
        name: str,
        *,
        params: dict[str, Param] | None = None,
        aliases: Iterable[str] = (),
        family: str = "",
        paper: str = "",
        version: int = 1,
        requires: Iterable[str] = (),
        **extra: Any,
    ) -> Callable[[T], T]:
        """Decorator registering `obj` under `name`."""

        def decorator(obj: T) -> T:
            if name in self._entries and self._entries[name].obj is not obj:
                raise RegistryError(f"{self.kind} '{name}' is registered twice")
            doc = (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._entries[name] = Entry(
                name, obj, dict(params or {}), family, paper, version, tuple(requires), doc, extra
            )
            for alias in aliases:
                self._aliases[alias] = name
            return obj

        return decorator

    def load_plugins(self) -> None:
        """Import every module named in the entry-point group once (built-ins included)."""
        if self._plugins_loaded or self.entry_point_group is None:
            return
        self._plugins_loaded = True
        for ep in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                log.warning("%s plugin %s failed to load: %s", self.kind, ep.name, exc)
                self._entries.setdefault(
                    ep.name, Entry(ep.name, None, load_error=f"plugin failed to import: {exc}")  # type: ignore[arg-type]
                )

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def get(self, name: str, where: str = "name") -> Entry[T]:
        """Entry by name or alias; unknown names raise a one-line error with the closest match."""
        self.load_plugins()
        name = self._aliases.get(name, name)
        if name not in self._entries:
            hint = _closest(name, list(self._entries) + list(self._aliases))
            raise RegistryError(f"{where}: unknown {self.kind} '{name}'{hint}")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        self.load_plugins()
        return self._aliases.get(name, name) in self._entries


@dataclass(frozen=True)
class TrainingProgress:
    """What a loss may learn about training progress (passed to `loss.on_progress`).

    The training loop calls `loss.on_progress(progress)` before every optimisation step when the
    loss defines that method; `train_topk_accuracy` holds the running top-k accuracy (k -> fraction)
    of the current epoch so far (of the previous epoch at step 0), empty before any step.
    """

    epoch: int  # 0-based
    num_epochs: int
    step: int  # global 0-based step
    steps_per_epoch: int
    train_topk_accuracy: dict[int, float] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Fraction of training completed, in [0, 1)."""
        total = max(1, self.num_epochs * self.steps_per_epoch)
        return self.step / total


LOSSES: Registry[Any] = Registry("loss", "topk_bench.losses")
DATASETS: Registry[Any] = Registry("dataset", "topk_bench.datasets")
MODELS: Registry[Any] = Registry("model", "topk_bench.models")
register_loss = LOSSES.register
register_dataset = DATASETS.register
register_model = MODELS.register
