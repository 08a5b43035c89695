"""Load run records for `compare`: validate each, group into problems and cells, note what was left out.

A *problem* is one (dataset, model, training setup) — the same runs reached through two suites are one
problem, counted once. A *cell* is one loss on one problem: complete when every expected seed has a
valid `done` record from one environment (device name, project version); otherwise it is missing and
the report says why. Records are untrusted JSON: anything malformed is skipped with a note.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.errors import ResultsError, UserError
from harness.leaderboard import variant_label, varying_label
from harness.registry import LOSSES
from harness.spec import Component, canonical_json
from harness.record import STATUSES, RecordProblem, validate_record
from harness.store import RunStore
from harness.suite import load_suite

log = logging.getLogger(__name__)

MAX_RECORD_BYTES = 50_000_000
_METRIC = re.compile(r"^(macro_)?top(\d+)$|^k99$")


@dataclass(frozen=True)
class Metric:
    """A record metric: `topK` / `macro_topK` (accuracy, shown in %) or `k99` (smallest k for 99 %)."""

    key: str

    @property
    def is_accuracy(self) -> bool:
        return self.key != "k99"

    @property
    def higher_is_better(self) -> bool:
        return self.is_accuracy

    @property
    def scale(self) -> float:
        return 100.0 if self.is_accuracy else 1.0

    @property
    def title(self) -> str:
        m = _METRIC.match(self.key)
        if self.key == "k99":
            return "k@99"
        return f"{'macro ' if m.group(1) else ''}top-{m.group(2)}"


def parse_metric(key: str) -> Metric:
    if not _METRIC.match(key):
        raise UserError(f"--metric: '{key}' is not a metric; use topK, macro_topK (K an integer) or k99")
    return Metric(key)


@dataclass(frozen=True)
class Env:
    device: str
    version: str
    git: str
    torch: str


@dataclass
class Run:
    """One valid `done` record, reduced to what `compare` uses (metric values already scaled)."""

    run_id: str
    seed: int
    env: Env
    values: dict[str, float]
    loss_vs_ce: float
    step_ms: float
    peak_memory_mb: float


@dataclass
class Cell:
    """One loss on one problem: its expected runs and the valid ones among them."""

    loss: str
    expected: dict[str, int] = field(default_factory=dict)  # run_id -> seed
    runs: dict[str, Run] = field(default_factory=dict)
    problems: Counter = field(default_factory=Counter)  # why a seed is not usable: "missing", "failed", ...

    @property
    def complete(self) -> bool:
        return bool(self.expected) and len(self.runs) == len(self.expected)

    @property
    def env(self) -> Env | None:
        envs = {r.env for r in self.runs.values()}
        return next(iter(envs)) if len(envs) == 1 else None

    def why_missing(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in sorted(self.problems.items())) + f" of {len(self.expected)} seeds"


@dataclass
class Problem:
    key: str
    suite: str
    dataset: str
    model: str
    cells: dict[str, Cell] = field(default_factory=dict)
    also_in: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.suite} · {self.dataset} · {self.model}"


@dataclass
class Excluded:
    where: str
    reason: str


@dataclass
class Selection:
    """Everything `compare` read: problems with their cells, and what it left out and why."""

    metrics: list[Metric]
    problems: dict[str, Problem] = field(default_factory=dict)
    excluded: list[Excluded] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def used_runs(self) -> list[tuple[Problem, Cell, Run]]:
        return [(p, c, r) for p in self.problems.values() for c in p.cells.values() if c.complete
                for r in c.runs.values()]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _component(d: object, what: str) -> Component:
    if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("params", {}), dict):
        raise ValueError(f"spec.{what} is not a {{name, params}} mapping")
    identity = d.get("identity")
    return Component(d["name"], int(d.get("version", 1)), dict(d.get("params", {})),
                     identity if isinstance(identity, dict) else None)


def parse_spec(spec: object) -> tuple[Component, Component, Component, dict, int]:
    """(loss, dataset, model, train, seed) of a record's spec; ValueError naming the bad key."""
    if not isinstance(spec, dict):
        raise ValueError("spec is missing or not a mapping")
    loss, dataset, model = (_component(spec.get(k), k) for k in ("loss", "dataset", "model"))
    seed = spec.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError("spec.seed is not an integer")
    train = spec.get("train") if isinstance(spec.get("train"), dict) else {}
    return loss, dataset, model, train, seed


def problem_key(dataset: Component, model: Component, train: dict) -> str:
    return canonical_json({"dataset": dataset.identity_dict(), "model": model.identity_dict(), "train": train})


def validate(record: object, run_id: str, metrics: list[Metric], select: str | None) -> Run | str:
    """The record reduced to a Run, or the reason it cannot be used (a status other than done included)."""
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    if record.get("run_id") != run_id:
        return f"run_id {str(record.get('run_id'))[:40]!r} does not match the file / expected id"
    status = record.get("status")
    if status not in STATUSES:
        return f"unknown status {str(status)[:20]!r}"
    if status != "done":
        return status
    try:
        _, _, _, _, seed = parse_spec(record.get("spec"))
    except (ValueError, TypeError) as exc:
        return f"invalid spec: {exc}"
    sel = select or (record["spec"].get("eval") or {}).get("select", "best_val")
    test = (record.get("metrics") or {}).get("test") if isinstance(record.get("metrics"), dict) else None
    chosen = test.get(sel) if isinstance(test, dict) else None
    values = {}
    for m in metrics:
        v = _number(chosen.get(m.key)) if isinstance(chosen, dict) else None
        if v is None:
            return f"lacks a finite metrics.test.{sel}.{m.key}"
        if (m.is_accuracy and not 0.0 <= v <= 1.0) or (not m.is_accuracy and v < 1):
            return f"metrics.test.{sel}.{m.key} = {v:g} is out of range"
        values[m.key] = v * m.scale
    env_d = record.get("environment") if isinstance(record.get("environment"), dict) else {}
    env = Env(*(str(env_d.get(k) or "unknown") for k in ("device_name", "topk_bench", "git_sha", "torch")))
    timings = record.get("timings") if isinstance(record.get("timings"), dict) else {}

    def positive(v: object) -> float:
        x = _number(v)
        return x if x is not None and x > 0 else math.nan

    return Run(run_id, seed, env, values, positive(timings.get("loss_vs_ce")), positive(timings.get("median_step_ms")),
               positive(record.get("peak_memory_mb")))


def _read(path: Path) -> object:
    """Parsed JSON of an untrusted file, or an error string."""
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return ValueError(f"larger than {MAX_RECORD_BYTES // 1_000_000} MB")
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return ValueError(f"unreadable JSON ({type(exc).__name__})")


class _Builder:
    def __init__(self, metrics: list[Metric], select: str | None) -> None:
        self.sel = Selection(metrics)
        self.select = select
        self.seen: set[str] = set()

    def add_source(self, label: str, entries: list[tuple[str, str, object, dict | None]]) -> None:
        """entries: (where, run_id, record, expected spec). The record is the parsed JSON, None when missing
        or a ValueError when unreadable; the expected spec (a suite's) labels the run, else the record's."""
        self.sel.sources.append(label)
        parsed, datasets, models = [], [], []
        for where, run_id, rec, expected in entries:
            if isinstance(rec, ValueError):
                self.sel.excluded.append(Excluded(where, str(rec)))
                continue
            try:
                record_spec = rec.get("spec") if isinstance(rec, (dict, Invalid)) else None
                loss, ds, model, train, seed = parse_spec(expected or record_spec)
            except (ValueError, TypeError) as exc:
                self.sel.excluded.append(Excluded(where, f"invalid spec: {exc}" if isinstance(rec, (dict, Invalid))
                                                  else f"not a JSON object ({type(rec).__name__})"))
                continue
            parsed.append((where, run_id, rec, loss, ds, model, train, seed))
            datasets.append(ds)
            models.append(model)
        for where, run_id, rec, loss, ds, model, train, seed in parsed:
            key = problem_key(ds, model, train)
            prob = self.sel.problems.get(key)
            if prob is None:
                prob = self.sel.problems[key] = Problem(key, label, varying_label(ds, datasets),
                                                        varying_label(model, models))
            elif prob.suite != label and label not in prob.also_in:
                prob.also_in.append(label)
            if run_id in self.seen:
                continue  # the same run reached through a second suite: counted once
            self.seen.add(run_id)
            cell = prob.cells.setdefault(variant_label(LOSSES, loss), Cell(variant_label(LOSSES, loss)))
            twin = next((rid for rid, s in cell.expected.items() if s == seed), None)
            if twin is not None:  # e.g. two suites that differ only in their eval settings
                self.sel.excluded.append(Excluded(where, f"the same loss, problem and seed as run {twin} "
                                                  "(they differ only in eval settings): that one is used"))
                continue
            cell.expected[run_id] = seed
            if rec is None:
                cell.problems["missing"] += 1
                continue
            run = rec.reason if isinstance(rec, Invalid) else validate(rec, run_id, self.sel.metrics, self.select)
            if isinstance(run, str):
                cell.problems[run if run in STATUSES else "invalid"] += 1
                if run not in STATUSES:
                    self.sel.excluded.append(Excluded(where, run))
                continue
            cell.runs[run_id] = run

    def finish(self) -> Selection:
        for prob in self.sel.problems.values():
            for cell in prob.cells.values():
                envs = Counter((r.env.device, r.env.version) for r in cell.runs.values())
                if len(envs) > 1:  # never average seeds measured on different devices or project versions
                    (main, _), *_ = envs.most_common()
                    for rid, run in list(cell.runs.items()):
                        if (run.env.device, run.env.version) != main:
                            self.sel.excluded.append(Excluded(
                                f"{prob.label} / {cell.loss} / run {rid}",
                                f"environment ({run.env.device}, topk_bench {run.env.version}) differs from the "
                                f"row's other seeds ({main[0]}, topk_bench {main[1]})"))
                            del cell.runs[rid]
                            cell.problems["other environment"] += 1
        order = {name: i for i, name in enumerate(self.sel.sources)}
        self.sel.problems = dict(sorted(self.sel.problems.items(),
                                        key=lambda kv: (order[kv[1].suite], kv[1].dataset, kv[1].model)))
        return self.sel


def _suite_entries(path: Path, results_dir: Path) -> tuple[str, list]:
    """A suite's expected runs with their records. A tuned suite contributes its selected configurations
    only (the runs its report tables), each placed under its row's fixed spec (the tuned values and
    learning rate left out), so a row is one loss on one problem whatever its tuning chose; a row not
    selected yet counts as missing."""
    suite = load_suite(path)
    store = RunStore(results_dir, suite.name)
    if suite.tune is None:
        pairs = [(spec, spec) for spec in suite.runs]
    else:
        from harness.tune import replay

        pairs = []
        for tuner in replay(suite.tune, store.load, retry=False):
            finals = {s.seed: s for s in tuner.finals()}
            for seed in suite.tune.final_seeds:
                placeholder = replace(tuner.group.base, seed=seed)
                pairs.append((finals.get(seed, placeholder), placeholder))
    entries = []
    for spec, shown in pairs:
        rec = store.load(spec.run_id)  # None when absent or unreadable
        if rec is None and store.path(spec.run_id).is_file():
            rec = ValueError("unreadable JSON")
        entries.append((str(store.path(spec.run_id)), spec.run_id, rec, shown.to_dict()))
    return suite.name, entries


def _dir_entries(path: Path) -> tuple[str, list]:
    runs = path / "runs"
    if not runs.is_dir():
        raise ResultsError(f"{path}: not a suite file and has no runs/ folder of records")
    files = sorted(p for p in runs.glob("*.json") if not p.name.startswith(".") and p.is_file())
    if not files:
        raise ResultsError(f"{runs}: no *.json records")
    return path.resolve().name, [(str(p), p.stem, _trusted(_read(p), p.stem), None) for p in files]


@dataclass
class Invalid:
    """A parsed record that failed the pool's validation: its spec still places it in its cell."""

    data: object
    reason: str

    def get(self, key: str, default: object = None) -> object:
        return self.data.get(key, default) if isinstance(self.data, dict) else default


def _trusted(data: object, stem: str) -> object:
    """The record when it passes the pool's validation, else Invalid (or the read error) saying why."""
    if isinstance(data, ValueError):
        return data
    try:
        return validate_record(data, stem)
    except RecordProblem as exc:
        return Invalid(data, str(exc)) if isinstance(data, dict) else ValueError(str(exc))


def load(sources: list[str], metrics: list[Metric], results_dir: str | None = None,
         select: str | None = None) -> Selection:
    """Read every suite file or results folder in `sources` into one Selection."""
    from harness.cli import results_root

    builder = _Builder(metrics, select)
    read: set[Path] = set()
    for src in sources:
        path = Path(src)
        if not path.exists():
            raise ResultsError(f"{src}: no such suite file or results folder")
        if path.resolve() in read:
            builder.sel.notes.append(f"`{src}` was given more than once: read once")
            continue
        read.add(path.resolve())
        label, entries = (_suite_entries(path, results_root(path, results_dir)) if path.is_file()
                          else _dir_entries(path))
        if label in builder.sel.sources:  # two folders (or suites) of the same name: tell them apart
            label = f"{path.resolve().parent.name}/{label}"
        builder.add_source(label, entries)
    sel = builder.finish()
    if not sel.used_runs():
        reasons = Counter(e.reason for e in sel.excluded).most_common(1)
        why = f"; most common reason: {reasons[0][0]} ({reasons[0][1]} records)" if reasons else ""
        raise ResultsError(f"{', '.join(sources)}: no loss row has every seed done and valid for "
                           f"{', '.join(m.key for m in metrics)}{why}")
    log.info("compare: %d problems, %d records used, %d left out", len(sel.problems), len(sel.used_runs()),
             len(sel.excluded))
    return sel
