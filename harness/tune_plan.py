"""A suite's `tune:` block resolved into tuning groups: which rows are tuned over which spaces.

A *group* is one row of the final leaderboard: one expanded loss entry (its fixed parameters,
e.g. one difftopk sorter) on one dataset/model variant. Its search space is, in order of precedence:
`losses[i].tune.space` > `tune.space.<loss name>` > `tune.space` (only `lr`, `weight_decay`) > the
loss's declared `Param(search=...)` hints that apply to the row (`when`) and are not fixed in
`losses[i].params`. A `null` space removes a declared hint. Every error is one line naming the key.
"""
from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import space as spaces
from harness.errors import RegistryError, SuiteError
from harness.registry import LOSSES
from harness.spec import Component, RunSpec, canonical_json

if TYPE_CHECKING:
    from harness.suite import SuiteModel

OPTIMIZER_PARAMS = {"lr": "learning rate (train.optimizer.lr)", "weight_decay": "train.optimizer.weight_decay"}


@dataclass(frozen=True)
class Dim:
    """One tuned hyperparameter of a group."""

    name: str
    target: str  # "loss" (a loss parameter) or "optimizer" (train.optimizer.<name>)
    space: spaces.Space
    integer: bool = False


@dataclass
class Group:
    """One tuned row: the fixed configuration (seed 0 placeholder) and its search dimensions."""

    label: str
    base: RunSpec
    dims: list[Dim]
    sampler_seed: int
    fixed: dict[str, Any] = field(default_factory=dict)  # loss params the row fixes (for display)

    def spec(self, values: dict[str, Any], seed: int) -> RunSpec:
        """The run of this group at hyperparameters `values` (names of `dims`) on `seed`."""
        loss_params = dict(self.base.loss.params)
        train = {**self.base.train, "optimizer": dict(self.base.train["optimizer"])}
        entry = LOSSES.get(self.base.loss.name)
        for dim in self.dims:
            if dim.target == "loss":  # check() types the value as the loss expects (a choice of 0 -> 0.0)
                loss_params[dim.name] = entry.params[dim.name].check(dim.name, values[dim.name])
            else:
                value = values[dim.name]
                train["optimizer"][dim.name] = float(value) if isinstance(value, int) else value
        identity = entry.identity_params(loss_params)
        loss = Component(self.base.loss.name, self.base.loss.version, loss_params,
                         None if identity == loss_params else identity)
        return RunSpec(loss=loss, dataset=self.base.dataset, model=self.base.model, train=train,
                       eval=self.base.eval, seed=seed)


@dataclass
class TunePlan:
    budget: int
    sampler: str
    seeds: list[int]  # seeds of the trials
    final_seeds: list[int]  # the suite's seeds: the selected configuration runs on each
    metric: str
    direction: str  # "max" | "min"
    selection: str  # "best" | "last": which validation number of a record is scored
    groups: list[Group]


def _space(where: str, value: Any) -> spaces.Space:
    try:
        return spaces.parse(value)
    except ValueError as exc:
        raise SuiteError(f"{where}: {exc}") from None


def _check_endpoints(where: str, name: str, space: spaces.Space, param: Any) -> None:
    """A space whose end values the parameter itself rejects (e.g. label smoothing up to 1) is an error."""
    for value in space.endpoints():
        if param is None:  # optimizer: lr > 0, weight_decay >= 0
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value > 0 if name == "lr" else value >= 0)
            if not ok:
                raise SuiteError(f"{where}: {value!r} is not a valid {OPTIMIZER_PARAMS[name]}")
            continue
        try:
            param.check(name, value)
        except RegistryError as exc:
            raise SuiteError(f"{where}: {exc}") from None


def _split_global(path: Path, raw: dict[str, Any], suite_losses: set[str]) -> tuple[dict, dict]:
    """`tune.space` -> (optimizer spaces, {loss name: {param: raw space}})."""
    optimizer, per_loss = {}, {}
    for key, value in raw.items():
        where = f"{path}: tune.space.{key}"
        if key in OPTIMIZER_PARAMS:
            optimizer[key] = value
        elif key in suite_losses:
            if not isinstance(value, dict):
                raise SuiteError(f"{where}: expected a mapping of {key}'s parameters to spaces")
            per_loss[key] = value
        elif key in LOSSES:
            raise SuiteError(f"{where}: a space for loss '{key}', which is not in this suite; "
                             f"losses: {sorted(suite_losses)}")
        else:
            allowed = sorted(OPTIMIZER_PARAMS) + sorted(suite_losses)
            match = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise SuiteError(f"{where}: unknown parameter{hint}; allowed: {', '.join(allowed)} "
                             "(loss parameters go under tune.space.<loss> or losses[i].tune.space)")
    return optimizer, per_loss


def _group_dims(path: Path, index: int, comp: Component, user_params: dict, optimizer: dict,
                global_loss: dict, local: dict) -> list[Dim]:
    entry = LOSSES.get(comp.name)
    where_local, where_global = f"losses[{index}].tune.space", f"tune.space.{comp.name}"
    dims: dict[str, Dim | None] = {}
    for name, param in entry.params.items():  # declared hints first (in declaration order)
        if param.search is not None and name not in user_params and spaces.applies(param.search, comp.params):
            dims[name] = Dim(name, "loss", param.search, _is_int(param))
    for where, raw in (("tune.space", optimizer), (where_global, global_loss), (where_local, local)):
        for name, value in raw.items():
            key = f"{path}: {where}.{name}"
            if name in OPTIMIZER_PARAMS:
                target, param = "optimizer", None
            elif name in entry.params:
                target, param = "loss", entry.params[name]
            else:
                allowed = sorted(OPTIMIZER_PARAMS) + list(entry.params)
                match = difflib.get_close_matches(name, allowed, n=1, cutoff=0.5)
                hint = f" (did you mean '{match[0]}'?)" if match else ""
                raise SuiteError(f"{key}: unknown parameter of '{comp.name}'{hint}; allowed: {', '.join(allowed)}")
            if target == "loss" and name in user_params:
                raise SuiteError(f"{key}: '{name}' is also fixed in losses[{index}].params; keep one of them")
            if value is None:
                dims[name] = None
                continue
            sp = _space(key, value)
            _check_endpoints(key, name, sp, param)
            dims[name] = Dim(name, target, sp, param is not None and _is_int(param))
    return [d for d in dims.values() if d is not None]


def _is_int(param: Any) -> bool:
    types = param.type if isinstance(param.type, tuple) else (param.type,)
    return int in types and float not in types


def build_plan(path: Path, model: "SuiteModel", entries: list[tuple[int, Component]], datasets: list[Component],
               models: list[Component], train: dict, evaluation: dict) -> TunePlan:
    """Resolve the tune block of a validated suite; raises SuiteError (one line, naming the key)."""
    tune = model.tune
    assert tune is not None
    metric = tune.metric or model.eval.primary
    allowed_metrics = {f"top{k}" for k in model.eval.k} | {"k99"}
    if metric not in allowed_metrics:
        raise SuiteError(f"{path}: tune.metric: '{metric}' is not one of {sorted(allowed_metrics)}")
    direction = tune.direction or ("min" if metric == "k99" else "max")
    suite_losses = {comp.name for _, comp in entries}
    optimizer, global_loss = _split_global(path, tune.space, suite_losses)
    groups, seen = [], set()
    for ds in datasets:
        for mdl in models:
            for index, comp in entries:
                item = model.losses[index]
                user_params = {} if isinstance(item, str) else item.params
                local = {} if isinstance(item, str) or item.tune is None else item.tune.space
                dims = _group_dims(path, index, comp, user_params, optimizer, global_loss.get(comp.name, {}), local)
                base = RunSpec(loss=comp, dataset=ds, model=mdl, train=train, eval=evaluation, seed=0)
                key = canonical_json({k: v for k, v in base.identity_dict().items() if k != "seed"})
                if key in seen:
                    raise SuiteError(f"{path}: losses[{index}]: the same tuned row appears twice")
                seen.add(key)
                digest = hashlib.sha256(f"{tune.seed}:{key}".encode()).hexdigest()
                if tune.sampler == "grid" and dims:
                    size = _grid_size(dims, tune.budget)
                    if size < tune.budget:
                        raise SuiteError(f"{path}: tune.budget: {tune.budget} trials but the grid of "
                                         f"losses[{index}] ({comp.label()}) has only {size} points")
                label = _label(comp, [c for _, c in entries])
                groups.append(Group(label, base, dims, int(digest[:8], 16), dict(user_params)))
    return TunePlan(tune.budget, tune.sampler, list(tune.seeds or model.seeds[:1]), list(model.seeds), metric,
                    direction, "best" if model.eval.select == "best_val" else "last", groups)


def grid_points(dims: list[Dim], budget: int) -> dict[str, list[Any]]:
    """The grid sampler's values per dimension: each range gets the fewest points (at least 2, the same
    number for every range) that make the grid at least `budget` points; choices keep their values."""
    ranges = [d for d in dims if not isinstance(d.space, spaces.Choice)]
    choices = 1
    for d in dims:
        if isinstance(d.space, spaces.Choice):
            choices *= len(d.space.values)
    n = 2
    while ranges and n ** len(ranges) * choices < budget:
        n += 1
    return {d.name: d.space.grid(n, d.integer) for d in dims}


def _grid_size(dims: list[Dim], budget: int) -> int:
    size = 1
    for values in grid_points(dims, budget).values():
        size *= len(values)
    return size


def _label(comp: Component, comps: list[Component]) -> str:
    """`name[p=v,…]` with the fixed parameters that differ from the defaults or between rows of this loss
    (so every difftopk row names its sorter, the default one included)."""
    defaults = {k: p.default for k, p in LOSSES.get(comp.name).params.items()}
    same = [c for c in comps if c.name == comp.name]
    show = tuple(k for k, v in comp.params.items()
                 if defaults.get(k, object()) != v or len({repr(c.params.get(k)) for c in same}) > 1)
    return comp.label(show=show)
