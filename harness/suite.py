"""Suite files: schema (pydantic, extra keys forbidden), YAML/TOML loading, grid expansion.

A list value in dataset/model/loss params is a grid axis; for a parameter whose own type is a
list (e.g. difftopk's `p_k`) a list *of lists* is the axis. Every error is one line naming the
file and the key path.
"""
from __future__ import annotations

import difflib
import itertools
import math
import typing
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.docload import read_mapping
from harness.errors import RegistryError, SuiteError, UserError, short_repr
from harness.registry import DATASETS, LOSSES, MODELS, Registry
from harness.resources_check import check_device_name, check_slurm_params
from harness.spec import Component, RunSpec

__all__ = ["DEFAULT_MAX_RUNS", "Suite", "SuiteModel", "expand_grid", "load_suite", "read_mapping"]

DEFAULT_MAX_RUNS = 10_000  # a larger grid needs --max-runs (counted before anything is expanded)
MAX_SEED = 2**63  # torch.manual_seed takes 0 <= seed < 2**63


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Named(_Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class Optimizer(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class Schedule(_Strict):
    name: Literal["none", "cosine", "step"] = "none"
    step_size: int = Field(30, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)


class Train(_Strict):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    optimizer: Optimizer = Field(default_factory=Optimizer)
    schedule: Schedule = Field(default_factory=Schedule)
    amp: Literal["none", "bf16"] = "none"
    channels_last: bool = False
    compile: bool = False
    checkpoint: bool = False
    grad_clip: float | None = Field(None, gt=0)


class Eval(_Strict):
    k: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [1, 5], min_length=1)
    primary: str = "top1"
    select: Literal["best_val", "last"] = "best_val"
    # comparison settings: they change the report, never a run, so they are not part of run ids
    baseline: str = "softmax"
    min_seeds: int = Field(3, ge=1)

    @field_validator("k")
    @classmethod
    def _distinct(cls, ks: list[int]) -> list[int]:
        repeated = sorted(k for k, n in Counter(ks).items() if n > 1)
        if repeated:
            raise ValueError(f"k {', '.join(map(str, repeated))} listed twice; each k at most once")
        return ks


NOT_HASHED_EVAL = {"baseline", "min_seeds"}


class LossTune(_Strict):
    """Per-loss override of the search space (`losses[i].tune.space`); null removes a declared hint."""

    space: dict[str, Any] = Field(default_factory=dict)


class LossEntry(Named):
    tune: LossTune | None = None


class Tune(_Strict):
    """`tune:` — every loss gets `budget` trials from its search space; see harness/tune.py."""

    budget: int = Field(ge=1)
    sampler: Literal["random", "tpe", "grid"] = "tpe"
    seed: int = 0  # the sampler's seed
    seeds: list[int] | None = Field(None, min_length=1)  # training seeds of the trials (default: the first suite seed)
    metric: str | None = None  # validation metric to select on (default: eval.primary)
    direction: Literal["max", "min"] | None = None  # default: max for top-k, min for k99
    space: dict[str, Any] = Field(default_factory=dict)


class Resources(_Strict):
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    timeout_min: float = Field(60.0, gt=0)
    executor: Literal["inline", "local", "slurm"] = "inline"
    workers: int = Field(1, ge=1)
    slurm: dict[str, Any] = Field(default_factory=dict)  # submitit AutoExecutor parameters (checked at load)

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        try:
            return check_device_name(device, "device")
        except UserError as exc:
            raise ValueError(str(exc).removeprefix("device: ")) from None


class SuiteModel(_Strict):
    suite: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seeds: list[Annotated[int, Field(ge=0, lt=MAX_SEED)]] = Field(min_length=1)
    dataset: Named
    model: Named
    train: Train
    eval: Eval = Field(default_factory=Eval)
    losses: list[str | LossEntry] = Field(min_length=1)
    tune: Tune | None = None
    resources: Resources = Field(default_factory=Resources)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        repeated = sorted(s for s, n in Counter(seeds).items() if n > 1)
        if repeated:
            raise ValueError(f"seed {', '.join(map(str, repeated[:5]))} listed twice; each seed at most once")
        return seeds


class Suite:
    """A validated suite file and its expanded runs."""

    def __init__(self, path: Path, model: SuiteModel, runs: list[RunSpec], tune: Any = None) -> None:
        self.path, self.model, self.runs = path, model, runs
        # a tuned suite: harness.tune_plan.TunePlan; `runs` is then the untuned grid (defaults), never run
        self.tune = tune

    @property
    def name(self) -> str:
        return self.model.suite


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (sub)model reached by `loc`, for did-you-mean hints."""
    current: Any = model
    if loc and loc[0] == "losses":
        return list(LossTune.model_fields) if "tune" in loc[:-1] else list(LossEntry.model_fields)
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            continue
        ann = fields[part].annotation
        options = typing.get_args(ann) or (ann,)  # `Tune | None` -> Tune
        current = next((a for a in options if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pydantic_message(path: Path, exc: ValidationError) -> str:
    errors = exc.errors()  # an unknown key explains a "missing" one next to it: report it first
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in ("str", "Named", "LossEntry")))
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{_cut(str(p))}" for p in loc).lstrip(".") or "<top>"
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(SuiteModel, loc)
        match = difflib.get_close_matches(str(loc[-1])[:100], allowed, n=1, cutoff=0.5)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        return f"{path}: {key}: unknown key{hint}; allowed: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{path}: {key}: required key is missing"
    message = err["msg"].removeprefix("Value error, ")
    return f"{path}: {key}: {message} (got {short_repr(err.get('input'))})"


def _axes(entry_params: dict, values: dict, where: str) -> tuple[list[str], list[list]]:
    """Keys and the values each takes: a list value is a grid axis (a list of lists for a list param)."""
    keys, choices = [], []
    for key, value in values.items():
        schema = entry_params.get(key)
        wants_list = schema is not None and (
            schema.type is list or (isinstance(schema.type, tuple) and list in schema.type)
        )
        is_axis = isinstance(value, list) and (not wants_list or (value and all(isinstance(v, list) for v in value)))
        if is_axis and not value:
            raise SuiteError(f"{where}.{key}: empty grid axis (a list needs at least one value)")
        keys.append(key)
        choices.append(value if is_axis else [value])
    return keys, choices


def grid_size(entry_params: dict, values: dict, where: str) -> int:
    """How many param dicts `expand_grid` would make, without making them."""
    return math.prod(len(c) for c in _axes(entry_params, values, where)[1])


def expand_grid(entry_params: dict, values: dict, where: str) -> list[dict]:
    """Expand list-valued params into a grid of concrete param dicts."""
    keys, choices = _axes(entry_params, values, where)
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


def _named_size(registry: Registry, named: Named, where: str) -> int:
    try:
        return grid_size(registry.get(named.name, where=f"{where}.name").params, named.params, f"{where}.params")
    except RegistryError as exc:
        raise SuiteError(str(exc)) from None


def count_runs(model: SuiteModel) -> tuple[int, str]:
    """Number of runs the suite expands to and how it factors, computed before expanding."""
    sizes = {
        "datasets": _named_size(DATASETS, model.dataset, "dataset"),
        "models": _named_size(MODELS, model.model, "model"),
        "loss configurations": sum(
            _named_size(LOSSES, Named(name=item) if isinstance(item, str) else item, f"losses[{i}]")
            for i, item in enumerate(model.losses)
        ),
        "seeds": len(model.seeds),
    }
    return math.prod(sizes.values()), " × ".join(f"{n} {what}" for what, n in sizes.items())


def resolve_paths(entry_params: dict, params: dict, base: Path) -> dict:
    """Relative values of path parameters (`Param(path=True)`) made relative to `base` (the suite's folder)."""
    out = dict(params)
    for key, value in params.items():
        schema = entry_params.get(key)
        if schema is not None and getattr(schema, "path", False) and isinstance(value, str) and value:
            if not Path(value).expanduser().is_absolute():
                out[key] = str((base / value).resolve())
    return out


def _components(registry: Registry, named: Named, where: str, base: Path | None = None) -> list[Component]:
    try:
        entry = registry.get(named.name, where=f"{where}.name")
        if entry.unavailable_reason:
            raise SuiteError(f"{where}.name: {registry.kind} '{named.name}' is unavailable: {entry.unavailable_reason}")
        comps = []
        for p in expand_grid(entry.params, named.params, f"{where}.params"):
            params = entry.validate_params(p, where=f"{where}.params")
            if base is not None:
                params = resolve_paths(entry.params, params, base)
            check = entry.extra.get("validate")  # plugin hook: raise with a message starting with the param name
            if check is not None:
                try:
                    check(params)
                except (ValueError, TypeError) as exc:
                    raise SuiteError(f"{where}.params.{exc}") from None
            identity = entry.identity_params(params)
            comps.append(Component(entry.name, entry.version, params, None if identity == params else identity))
        return comps
    except RegistryError as exc:
        raise SuiteError(str(exc)) from None


def _check_baseline(path: Path, baseline: str, losses: list[Component], row_labels: list[str]) -> None:
    """`eval.baseline` names a loss of the suite, or one variant's label when the loss has several."""
    from harness.leaderboard import variant_label  # leaderboard imports nothing from here

    labels = [variant_label(LOSSES, c) for c in losses]
    if baseline in labels or baseline in row_labels:  # row_labels: a tuned suite's row names
        return
    variants = [label for c, label in zip(losses, labels) if c.name == baseline]
    if len(variants) == 1:
        return
    if variants:
        raise SuiteError(f"{path}: eval.baseline: '{baseline}' has {len(variants)} variants; name one of {variants}")
    hint = difflib.get_close_matches(baseline, labels, n=1, cutoff=0.5)
    did = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise SuiteError(f"{path}: eval.baseline: '{baseline}' is not a loss of this suite{did}; losses: {labels}")


def load_suite(path: str | Path, max_runs: int = DEFAULT_MAX_RUNS) -> Suite:
    """Read, validate and expand a suite file; raises SuiteError with a one-line message.

    The number of runs is counted before the grid is expanded; more than `max_runs` is refused.
    """
    path = Path(path)
    data = read_mapping(path)
    try:
        model = SuiteModel.model_validate(data)
    except ValidationError as exc:
        raise SuiteError(_pydantic_message(path, exc)) from None
    try:
        check_slurm_params(model.resources.slurm)
        total, factors = count_runs(model)
        if total > max_runs:
            raise SuiteError(f"the suite expands to {total:,} runs ({factors}), more than the limit "
                             f"of {max_runs:,}; raise it with --max-runs if you mean it")
        datasets = _components(DATASETS, model.dataset, "dataset", path.parent)
        models = _components(MODELS, model.model, "model", path.parent)
        entries = [(i, comp) for i, item in enumerate(model.losses)
                   for comp in _components(LOSSES, LossEntry(name=item) if isinstance(item, str) else item,
                                           f"losses[{i}]", path.parent)]
        losses = [comp for _, comp in entries]
    except SuiteError as exc:
        raise SuiteError(f"{path}: {exc}") from None
    primary_ok = {f"top{k}" for k in model.eval.k} | {"k99"}
    if model.eval.primary not in primary_ok:
        raise SuiteError(f"{path}: eval.primary: {short_repr(model.eval.primary)} is not one of {sorted(primary_ok)}")
    for ds in datasets:
        check = DATASETS.get(ds.name).extra.get("validate")
        if check is not None:  # cheap dataset-level checks (too little data, an empty class, …)
            try:
                check(ds.params)
            except UserError as exc:
                raise SuiteError(f"{path}: dataset.params: {exc}") from None
        num_classes = DATASETS.get(ds.name).extra["num_classes"](ds.params)
        if max(model.eval.k) > num_classes:
            too_big = max(model.eval.k)
            raise SuiteError(f"{path}: eval.k: {too_big} exceeds the {num_classes} classes of dataset '{ds.name}' "
                             f"(allowed: 1 ≤ k ≤ {num_classes})")
        for loss in losses:
            try:  # catch constraints that depend on the number of classes (k < n, m < n, …)
                LOSSES.get(loss.name).obj(num_classes=num_classes, **loss.params)
            except (ValueError, TypeError) as exc:
                message = f"{loss.label()} with {num_classes} classes: {exc}"
                raise SuiteError(f"{path}: losses: {message}") from None
    train, evaluation = model.train.model_dump(), model.eval.model_dump(exclude=NOT_HASHED_EVAL)
    runs = [
        RunSpec(loss=loss, dataset=ds, model=m, train=train, eval=evaluation, seed=seed)
        for ds in datasets for m in models for loss in losses for seed in model.seeds
    ]
    if len({r.run_id for r in runs}) != len(runs):
        raise SuiteError(f"{path}: losses: the same run appears twice (duplicate loss entries or seeds)")
    plan = None
    if model.tune is not None:
        from harness.tune_plan import build_plan  # it imports the models above

        plan = build_plan(path, model, entries, datasets, models, train, evaluation)
    else:
        tuned = next((i for i, e in enumerate(model.losses) if isinstance(e, LossEntry) and e.tune), None)
        if tuned is not None:
            raise SuiteError(f"{path}: losses[{tuned}].tune: needs a top-level `tune:` block (budget, sampler, …)")
    if "baseline" in model.eval.model_fields_set:  # the default (softmax) may be absent: then no comparisons
        _check_baseline(path, model.eval.baseline, losses, [g.label for g in plan.groups] if plan else [])
    return Suite(path, model, runs, plan)
