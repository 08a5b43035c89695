"""Generic name -> object registry with parameter schemas, aliases and did-you-mean.

Built-in losses, datasets and models are registered by importing their packages directly (no
installation needed: `python -m harness` works from a clone); a broken built-in module raises.
Third-party plugins arrive through entry points; a broken plugin is listed as unavailable with the
reason and never hides the others. This module imports neither torch nor any plugin at import time.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, TypeVar

from harness.errors import RegistryError, short_repr
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
    # folder), "basename" (a file path: its name identifies the data, its folder does not),
    # "content" (a file or folder path: a hash of its bytes identifies the data; see content_hash),
    # "unless_default" (left out while it equals its default: a parameter added later keeps the
    # run ids of existing records).
    identity: str = "value"
    # A file-system path: a relative value in a suite resolves against the suite file's folder.
    path: bool = False
    # Where tuning searches this parameter (harness/space.py): Log(lo, hi), Linear(lo, hi) or
    # Choice(...); None: not tuned unless a suite's `tune.space` names it.
    search: Space | None = None

    def check(self, name: str, value: Any) -> Any:
        """Return the value (ints promoted to float where a float is wanted) or raise RegistryError."""
        if value is None and self.optional:
            return None
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        value = _number_from_string(value, types)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in types:
            raise RegistryError(f"{name}: expected {_type_name(types)}, got {short_repr(value)}")
        if not isinstance(value, types):
            raise RegistryError(f"{name}: expected {_type_name(types)}, got {short_repr(value)}")
        bad = _non_finite(value)
        if bad is not None:
            raise RegistryError(f"{name}: {bad!r} is not a finite number")
        if self.choices is not None and value not in self.choices:
            hint = _closest(str(value), [str(c) for c in self.choices])
            raise RegistryError(f"{name}: {short_repr(value)} is not one of {list(self.choices)}{hint}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for bound, op, ok in (
                (self.ge, ">=", lambda v, b: v >= b),
                (self.gt, ">", lambda v, b: v > b),
                (self.le, "<=", lambda v, b: v <= b),
                (self.lt, "<", lambda v, b: v < b),
            ):
                if bound is not None and not ok(value, bound):
                    raise RegistryError(f"{name}: {short_repr(value)} out of range (must be {op} {bound})")
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


_INT_TEXT = re.compile(r"^[-+]?[0-9]+$")
_FLOAT_TEXT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")


def _number_from_string(value: Any, types: tuple[type, ...]) -> Any:
    """A numeric string ('1e-3', '10') read as the number a numeric-only parameter wants.

    YAML 1.1 leaves `1e-3` a string and pydantic-validated settings (lr) accept it; parameters
    accept it the same way. Strings stay strings for parameters that take strings.
    """
    if not isinstance(value, str) or str in types:
        return value
    text = value.strip()
    if int in types and _INT_TEXT.match(text):
        return int(text)
    if float in types and _FLOAT_TEXT.match(text):
        return float(text)
    return value


def _non_finite(value: Any) -> float | None:
    """The first non-finite float in `value` (a number or nested lists/tuples), or None."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return item
        if isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


def _type_name(types: Iterable[type]) -> str:
    return "|".join(t.__name__ for t in types)


def _closest(name: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


# The packages of this project: what they register is attributed to this distribution, installed or not.
PROJECT_DISTRIBUTION = "topk-loss-bench"
PROJECT_PACKAGES = ("harness", "losses")


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    from importlib import metadata  # (lazy: 0.1-0.3 s that `topk-bench --help` does not need)

    return metadata.packages_distributions()


def distribution_of(module: str) -> tuple[str | None, str | None]:
    """(distribution name, version) that ships `module`; (None, None) for a module outside any."""
    top = module.split(".")[0]
    if top in PROJECT_PACKAGES:
        from harness import __version__

        return PROJECT_DISTRIBUTION, __version__
    from importlib import metadata

    names = _packages_distributions().get(top)
    if not names:
        return None, None
    try:
        return names[0], metadata.version(names[0])
    except metadata.PackageNotFoundError:
        return names[0], None


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
    module: str = ""  # the module that registered it
    distribution: str | None = None  # the installed distribution shipping that module (None: not installed)
    distribution_version: str | None = None

    def provenance(self) -> dict[str, Any]:
        """Where this entry comes from, for run records: its integer `version` beside the module and
        the distribution (name and version) that ships it."""
        return {"name": self.name, "version": self.version, "module": self.module,
                "distribution": self.distribution, "distribution_version": self.distribution_version}

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
            elif mode == "unless_default" and value == self.params[key].default:
                continue
            elif mode == "content" and isinstance(value, str):
                from harness.content_hash import content_digest  # hashing only where a suite asks for it

                out[key] = content_digest(value)
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


Check = Callable[[str, Any, dict[str, Any]], None]


class Registry(Generic[T]):
    """Name -> Entry mapping, filled on first use by importing the built-in modules, then the modules
    named in an entry-point group (third-party plugins)."""

    def __init__(self, kind: str, entry_point_group: str | None = None, builtins: Iterable[str] = (),
                 check: Check | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.builtins = tuple(builtins)
        self.check = check
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
        """Decorator registering `obj` under `name`; the registry's check runs first (a RegistryError
        names what is wrong)."""

        def decorator(obj: T) -> T:
            if self.check is not None:
                self.check(name, obj, extra)
            if name in self._entries and self._entries[name].obj is not obj:
                raise RegistryError(f"{self.kind} '{name}' is registered twice")
            doc = (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            module = getattr(obj, "__module__", None) or ""
            dist, dist_version = distribution_of(module)
            self._entries[name] = Entry(
                name, obj, dict(params or {}), family, paper, version, tuple(requires), doc, extra,
                module=module, distribution=dist, distribution_version=dist_version,
            )
            for alias in aliases:
                self._aliases[alias] = name
            return obj

        return decorator

    def load_plugins(self) -> None:
        """Import the built-in modules (an import error propagates: it is a bug), then every module
        named in the entry-point group (a failing plugin is listed as unavailable with the reason)."""
        if self._plugins_loaded:
            return
        for module in self.builtins:
            try:
                importlib.import_module(module)
            except Exception as exc:
                exc.add_note(f"topk-bench: the built-in {self.kind} module '{module}' failed to import")
                raise
        self._plugins_loaded = True
        if self.entry_point_group is None:
            return
        from importlib import metadata

        for ep in metadata.entry_points(group=self.entry_point_group):
            if ep.module in self.builtins:  # stale metadata of an older install that listed built-ins
                continue
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                dist = getattr(ep, "dist", None)
                log.warning("%s plugin %s (%s) failed to load: %s", self.kind, ep.name, ep.value, exc)
                self._entries.setdefault(
                    ep.name, Entry(ep.name, None, load_error=f"plugin failed to import: {exc}",  # type: ignore[arg-type]
                                   module=ep.module, distribution=dist.name if dist else None,
                                   distribution_version=dist.version if dist else None)
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


def _check_loss(name: str, obj: Any, extra: dict[str, Any]) -> None:
    from torch import nn  # the module registering a loss has imported torch already

    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise RegistryError(f"loss '{name}': {obj!r} is not a torch.nn.Module subclass "
                            "(a loss is an nn.Module built as cls(num_classes, **params))")
    if extra.get("reference") is not None and not callable(extra["reference"]):
        raise RegistryError(f"loss '{name}': reference= must be callable (see harness.registry.ReferenceImpl)")


def _check_dataset(name: str, obj: Any, extra: dict[str, Any]) -> None:
    if not callable(obj):
        raise RegistryError(f"dataset '{name}': {obj!r} is not callable (load(seed, **params) -> DataBundle)")
    if not callable(extra.get("num_classes")):
        raise RegistryError(f"dataset '{name}': register_dataset needs num_classes=callable(params) -> int")


def _check_model(name: str, obj: Any, extra: dict[str, Any]) -> None:
    if not callable(obj):
        raise RegistryError(f"model '{name}': {obj!r} is not callable "
                            "(build(input_shape, num_classes, **params) -> nn.Module)")


@dataclass(frozen=True)
class ReferenceImpl:
    """A reference implementation of a loss configuration, timed beside it by `bench-loss`.

    A loss declares them with `register_loss(..., reference=hook)`, where
    `hook(loss: nn.Module, num_classes: int, options: dict) -> list[ReferenceImpl]` maps a built
    instance of ours to the equivalent reference losses (none when there is no equivalent).
    `build(device)` returns a callable `(scores, labels) -> scalar`; `unavailable` names why it
    cannot run here (e.g. the reference package is not installed). `options` carries bench-loss
    settings (e.g. `torch_sparse_shim`).
    """

    label: str
    build: Callable[[Any], Callable]
    unavailable: str | None = None


LOSSES: Registry[Any] = Registry("loss", "topk_bench.losses", builtins=("losses",), check=_check_loss)
DATASETS: Registry[Any] = Registry("dataset", "topk_bench.datasets", builtins=("harness.data",), check=_check_dataset)
MODELS: Registry[Any] = Registry("model", "topk_bench.models", builtins=("harness.models",), check=_check_model)
register_loss = LOSSES.register
register_model = MODELS.register


def register_dataset(name: str, *, num_classes: Callable[[dict[str, Any]], int], **kwargs: Any) -> Callable:
    """Register a dataset loader `load(seed, **params) -> DataBundle` under `name`.

    `num_classes(params) -> int` gives the class count for validated params without loading the data
    (the suite checks `eval.k` and builds every loss with it before any run starts). Other keyword
    arguments are those of `Registry.register` (params, version, family, paper, requires, aliases).
    """
    return DATASETS.register(name, num_classes=num_classes, **kwargs)
