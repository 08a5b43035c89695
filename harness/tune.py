"""Tuning: every row of a tuned suite gets `budget` trials from its search space, chosen on validation.

Each group (row, see harness/tune_plan.py) has its own Optuna study with a seeded sampler
(random, TPE or grid); its seed comes from `tune.seed` and the row's identity, so adding a loss to a
suite does not change the trials of the others. Trials are ordinary runs (a RunSpec with the sampled
hyperparameters, on each of `tune.seeds`), so their records are cached, resumable and shared.

The ask/tell sequence is a pure function of the records: a tuner asks for a trial, looks its runs
up in the store, tells the sampler their validation score, and asks again — so a re-run replays the
finished trials into a fresh seeded study and proposes exactly the trials an uninterrupted run would
have. Only `metrics.val.<best|last>.<metric>` is read for selection; the test split never is. The
best trial (ties: the earlier) is then run on every suite seed; those runs alone feed test metrics.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.samplers import GridSampler, RandomSampler, TPESampler
from optuna.trial import TrialState

from harness.spec import RunSpec
from harness.tune_plan import Group, TunePlan, grid_points

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

Loader = Callable[[str], "dict | None"]


class _BudgetedGridSampler(GridSampler):
    """Optuna's grid sampler without its stop hook: `study.stop()` only works inside `optimize`, and
    the tuner counts the budget itself (a grid always has at least `budget` points, see tune_plan)."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: D102
        return None


def make_sampler(plan: TunePlan, group: Group) -> optuna.samplers.BaseSampler:
    if plan.sampler == "random":
        return RandomSampler(seed=group.sampler_seed)
    if plan.sampler == "grid":
        return _BudgetedGridSampler(grid_points(group.dims, plan.budget), seed=group.sampler_seed)
    # Optuna's default is 10 random start-up trials; with small budgets keep half of them for TPE
    return TPESampler(seed=group.sampler_seed, n_startup_trials=max(1, min(10, plan.budget // 2)))


def validation_score(record: dict | None, metric: str, selection: str) -> float | None:
    """The validation number a record contributes to selection; None unless the run is done.

    Reads `metrics.val.<selection>.<metric>` and nothing else (never the test split).
    """
    if record is None or record.get("status") != "done":
        return None
    value = ((record.get("metrics") or {}).get("val") or {}).get(selection, {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass
class Trial:
    number: int
    values: dict[str, Any]  # sampled hyperparameters, by name
    specs: list[RunSpec]  # one per tune seed
    value: float | None = None  # mean validation score over the tune seeds; None: a seed did not finish


@dataclass
class Tuner:
    """The ask/tell state of one group, advanced from the records."""

    plan: TunePlan
    group: Group
    trials: list[Trial] = field(default_factory=list)
    _pending: tuple[Any, Trial] | None = None

    def __post_init__(self) -> None:
        direction = "maximize" if self.plan.direction == "max" else "minimize"
        self.study = optuna.create_study(direction=direction, sampler=make_sampler(self.plan, self.group))

    @property
    def budget(self) -> int:
        return self.plan.budget if self.group.dims else 0  # nothing to search: the row runs as given

    @property
    def complete(self) -> bool:
        return len(self.trials) >= self.budget

    def pending(self) -> Trial | None:
        """The proposed trial whose runs are not finished (asked from the sampler on first use)."""
        if self.complete:
            return None
        if self._pending is None:
            handle = self.study.ask()
            values = {d.name: d.space.suggest(handle, d.name, d.integer) for d in self.group.dims}
            specs = [self.group.spec(values, seed) for seed in self.plan.seeds]
            self._pending = (handle, Trial(len(self.trials), values, specs))
        return self._pending[1]

    def advance(self, load: Loader, attempted: set[str]) -> list[RunSpec]:
        """Tell the sampler every finished trial; return the runs the next trial still needs.

        A run counts as finished when its record is `done`, or when it was attempted in this
        invocation (a failed trial is told as failed, and retried by the next invocation).
        """
        while (trial := self.pending()) is not None:
            records = [load(s.run_id) for s in trial.specs]
            needed = [s for s, r in zip(trial.specs, records)
                      if (r is None or r.get("status") != "done") and s.run_id not in attempted]
            if needed:
                return needed
            scores = [validation_score(r, self.plan.metric, self.plan.selection) for r in records]
            handle, _ = self._pending  # type: ignore[misc]
            if any(s is None for s in scores):
                self.study.tell(handle, state=TrialState.FAIL)
            else:
                trial.value = sum(scores) / len(scores)  # type: ignore[arg-type]
                self.study.tell(handle, trial.value)
            self.trials.append(trial)
            self._pending = None
        return []

    def best(self) -> Trial | None:
        """The selected trial (best mean validation score; ties: the earlier); None before completion."""
        if not self.complete:
            return None
        if not self.group.dims:
            return Trial(-1, {}, [])
        scored = [t for t in self.trials if t.value is not None]
        if not scored:
            return None
        sign = 1.0 if self.plan.direction == "max" else -1.0
        return max(scored, key=lambda t: (sign * t.value, -t.number))  # type: ignore[operator]

    def finals(self) -> list[RunSpec]:
        """The selected configuration on every suite seed (empty until selection is possible)."""
        best = self.best()
        if best is None:
            return []
        return [self.group.spec(best.values, seed) for seed in self.plan.final_seeds]


Executor = Callable[[list[RunSpec]], "set[str] | None"]


def _run(specs: list[RunSpec], execute: Executor, attempted: set[str], poll_s: float) -> None:
    """Execute `specs`; those another runner holds (returned by `execute`) are waited for, never guessed."""
    waiting = set(execute(specs) or ())
    attempted.update(s.run_id for s in specs if s.run_id not in waiting)
    if waiting:
        log.info("%d runs are being computed by another runner; waiting %.0f s", len(waiting), poll_s)
        time.sleep(poll_s)


def tune(plan: TunePlan, load: Loader, execute: Executor, poll_s: float = 10.0) -> list[Tuner]:
    """Run the trials round by round (one pending trial per group per round, executed together),
    then the selected configurations on every suite seed.

    `execute(specs)` runs the specs and returns the ids of those claimed by another runner (their
    records will appear later: the tuner waits and asks again rather than scoring them as failed).
    """
    tuners = [Tuner(plan, g) for g in plan.groups]
    attempted: set[str] = set()
    while True:
        needed: dict[str, RunSpec] = {}
        for tuner in tuners:
            for spec in tuner.advance(load, attempted):
                needed.setdefault(spec.run_id, spec)
        if not needed:
            break
        log.info("tuning: %d runs for %d pending trials", len(needed),
                 sum(1 for t in tuners if not t.complete))
        _run(list(needed.values()), execute, attempted, poll_s)
    while True:
        finals = {s.run_id: s for t in tuners for s in t.finals()}
        todo = [s for i, s in finals.items() if i not in attempted and (load(i) or {}).get("status") != "done"]
        if not todo:
            return tuners
        log.info("tuning done: %d runs of the selected configurations", len(todo))
        _run(todo, execute, attempted, poll_s)


class _Recorded:
    """Counts every run with a record (whatever its status) as finished."""

    def __init__(self, load: Loader) -> None:
        self.load = load

    def __contains__(self, run_id: object) -> bool:
        return isinstance(run_id, str) and self.load(run_id) is not None


def replay(plan: TunePlan, load: Loader, retry: bool = True) -> list[Tuner]:
    """The tuners advanced as far as the records go, running nothing.

    `retry=True` (dry runs) stops at a trial with a run that is not done, as `run` would retry it;
    `retry=False` (reports) takes the records as they are, failed runs included.
    """
    tuners = [Tuner(plan, g) for g in plan.groups]
    for tuner in tuners:
        tuner.advance(load, set() if retry else _Recorded(load))  # type: ignore[arg-type]
    return tuners
