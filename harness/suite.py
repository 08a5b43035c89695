"""Suite files: schema (pydantic, extra keys forbidden), YAML/TOML loading, grid expansion.

A list value in dataset/model/loss params is a grid axis; for a parameter whose own type is a
list (e.g. difftopk's `p_k`) a list *of lists* is the axis. Every error is one line naming the
file and the key path.
"""
from __future__ import annotations

import difflib
import itertools
import typing
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.errors import RegistryError, SuiteError
from harness.registry import DATASETS, LOSSES, MODELS, Registry
from harness.spec import Component, RunSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    k: list[int] = Field(default_factory=lambda: [1, 5], min_length=1)
    primary: str = "top1"
    select: Literal["best_val", "last"] = "best_val"
    # comparison settings: they change the report, never a run, so they are not part of run ids
    baseline: str = "softmax"
    min_seeds: int = Field(3, ge=1)


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
    device: str = "auto"
    timeout_min: float = Field(60.0, gt=0)
    executor: Literal["inline", "local", "slurm"] = "inline"
    workers: int = Field(1, ge=1)
    slurm: dict[str, Any] = Field(default_factory=dict)


class SuiteModel(_Strict):
    suite: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    seeds: list[int] = Field(min_length=1)
    dataset: Named
    model: Named
    train: Train
    eval: Eval = Field(default_factory=Eval)
    losses: list[str | LossEntry] = Field(min_length=1)
    tune: Tune | None = None
    resources: Resources = Field(default_factory=Resources)


class Suite:
    """A validated suite file and its expanded runs."""

    def __init__(self, path: Path, model: SuiteModel, runs: list[RunSpec], tune: Any = None) -> None:
        self.path, self.model, self.runs = path, model, runs
        # a tuned suite: harness.tune_plan.TunePlan; `runs` is then the untuned grid (defaults), never run
        self.tune = tune

    @property
    def name(self) -> str:
        return self.model.suite


def read_mapping(path: Path) -> dict:
    """The top-level mapping of a YAML or TOML file; SuiteError (one line) when it is not one."""
    if not path.is_file():
        raise SuiteError(f"{path}: no such suite file")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        first = where + " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise SuiteError(f"{path}: invalid {'TOML' if path.suffix == '.toml' else 'YAML'}: {first}") from None
    if not isinstance(data, dict):
        raise SuiteError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


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


def _pydantic_message(path: Path, exc: ValidationError) -> str:
    errors = exc.errors()  # an unknown key explains a "missing" one next to it: report it first
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in ("str", "Named", "LossEntry")))
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "<top>"
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(SuiteModel, loc)
        match = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        return f"{path}: {key}: unknown key{hint}; allowed: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{path}: {key}: required key is missing"
    return f"{path}: {key}: {err['msg']} (got {err.get('input')!r})"


def expand_grid(entry_params: dict, values: dict, where: str) -> list[dict]:
    """Expand list-valued params into a grid of concrete param dicts."""
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
    return [dict(zip(keys, combo)) for combo in itertools.product(*choices)]


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


def load_suite(path: str | Path) -> Suite:
    """Read, validate and expand a suite file; raises SuiteError with a one-line message."""
    path = Path(path)
    data = read_mapping(path)
    try:
        model = SuiteModel.model_validate(data)
    except ValidationError as exc:
        raise SuiteError(_pydantic_message(path, exc)) from None
    try:
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
        raise SuiteError(f"{path}: eval.primary: '{model.eval.primary}' is not one of {sorted(primary_ok)}")
    for ds in datasets:
        num_classes = DATASETS.get(ds.name).extra["num_classes"](ds.params)
        if max(model.eval.k) > num_classes:
            too_big = max(model.eval.k)
            raise SuiteError(f"{path}: eval.k: {too_big} exceeds the {num_classes} classes of dataset '{ds.name}'")
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
