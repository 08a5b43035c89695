"""Leaderboards: one per (dataset, model) variant; mean ± std over seeds; missing stays missing."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd

from harness.registry import LOSSES, Registry
from harness.spec import Component, RunSpec


def variant_label(registry: Registry, comp: Component) -> str:
    """`name[p=v,…]` listing only the parameters that differ from the registered defaults."""
    try:
        defaults = {k: p.default for k, p in registry.get(comp.name).params.items()}
    except ValueError:
        defaults = {}
    changed = tuple(k for k, v in comp.params.items() if defaults.get(k, object()) != v)
    return comp.label(show=changed)


def varying_label(comp: Component, all_comps: list[Component]) -> str:
    """`name[p=v,…]` listing only the parameters that take several values across `all_comps`."""
    same_name = [c for c in all_comps if c.name == comp.name]
    varying = tuple(k for k in comp.params if len({repr(c.params.get(k)) for c in same_name}) > 1)
    return comp.label(show=varying)


@dataclass(frozen=True)
class Column:
    key: str  # record path: ("metrics", "test", "best_val", "top1") or ("timings", "median_step_ms")
    title: str
    higher_is_better: bool
    path: tuple[str, ...]
    digits: int = 2
    scale: float = 1.0
    reliable_path: tuple[str, ...] | None = None  # a bool per record: False marks the cell unreliable


def columns(eval_cfg: dict, macro: bool = False) -> list[Column]:
    """Top-k per k, k@99 %, timings; with `macro`, the class-averaged top-k beside (long-tailed data)."""
    sel = eval_cfg["select"]
    cols = [Column(f"top{k}", f"top-{k} % ↑", True, ("metrics", "test", sel, f"top{k}"), 2, 100.0)
            for k in eval_cfg["k"]]
    if macro:
        cols += [Column(f"macro_top{k}", f"macro top-{k} % ↑", True, ("metrics", "test", sel, f"macro_top{k}"), 2,
                        100.0) for k in eval_cfg["k"]]
    cols.append(Column("k99", "k@99 % ↓", False, ("metrics", "test", sel, "k99"), 1))
    cols.append(Column("step_ms", "step ms ↓", False, ("timings", "median_step_ms"), 2,
                       reliable_path=("timings", "step_reliable")))
    cols.append(Column("loss_vs_ce", "loss/CE time ↓", False, ("timings", "loss_vs_ce"), 2,
                       reliable_path=("timings", "loss_vs_ce_reliable")))
    return cols


def _get(record: dict, path: tuple[str, ...]) -> float | None:
    cur = record
    for part in path:
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return float(cur) if isinstance(cur, (int, float)) else None


UNRELIABLE = "†"
UNRELIABLE_NOTE = (f"{UNRELIABLE} timing unreliable on at least one seed (spread of repeated measurements too "
                   "large, or too few samples): read it as a rough figure")


@dataclass
class Board:
    """One leaderboard table plus its footnotes."""

    dataset: str
    model: str
    table: pd.DataFrame
    footnotes: list[str] = field(default_factory=list)
    numbers: pd.DataFrame = field(default_factory=pd.DataFrame)  # tidy: mean, std, n per metric
    curves: dict[str, np.ndarray] = field(default_factory=dict)  # loss label -> mean test top-k curve
    # complete rows only: loss label -> column key -> the per-seed values (scaled as displayed)
    values: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    columns: list[Column] = field(default_factory=list)
    reference: dict | None = None  # data_info["reference"]: a Bayes optimum or an oracle bound
    seeds: dict[str, list[int]] = field(default_factory=dict)  # complete rows: the seed of each value


def _reference(recs: list[dict | None]) -> dict | None:
    """The dataset's reference curve (Bayes optimum / oracle bound) from the first record that has one."""
    for r in recs:
        ref = (r or {}).get("data_info", {}).get("reference") if isinstance(r, dict) else None
        if isinstance(ref, dict) and isinstance(ref.get("curve"), list):
            return ref
    return None


def _reference_rows(ref: dict, cols: list[Column], table: pd.DataFrame) -> tuple[dict, list[str]]:
    """The reference row (values, no spread) and a `Δ <label> top-k` column per top-k (loss − reference, pp)."""
    row: dict = {"rank": "ref", "loss": f"*{ref.get('label', 'reference')}*", "n": "—"}
    added = []
    for col in cols:
        curve = ref.get("macro_curve") if col.key.startswith("macro_top") else ref.get("curve")
        k = int(col.key.rsplit("top", 1)[1]) if "top" in col.key else 0
        if not k or not curve or k > len(curve):
            row[col.title] = "—"
            continue
        value = curve[k - 1] * col.scale
        row[col.title] = f"{value:.{col.digits}f}"
        if not col.key.startswith("macro_"):
            title = f"Δ ref top-{k}"
            table[title] = [f"{m - value:+.{col.digits}f}" if not np.isnan(m) else "—" for m in table[f"_{col.key}"]]
            row[title] = "0"
            added.append(title)
    return row, added



def build(runs: list[RunSpec], records: dict[str, dict], eval_cfg: dict,
          reference_fallback: Callable[[Component], dict | None] | None = None,
          row_label: Callable[[RunSpec], str] | None = None, info: dict[str, dict[str, str]] | None = None,
          ) -> list[Board]:
    """Group the suite's expected runs into leaderboards; cells of incomplete rows are '—'.

    `row_label` names a run's row (default: the loss variant); `info` adds text columns to rows
    by label (a tuned suite's chosen hyperparameters and trial count).

    A board whose records carry a `data_info.reference` (the Bayes optimum of synthetic data, the
    oracle bound of homoglyphs) gets it as a last, unranked row and `Δ ref top-k` columns;
    `reference_fallback(dataset)` supplies it for records written before datasets recorded one.
    Long-tailed datasets (`long_tail` > 1) get macro top-k columns beside the micro ones.
    """
    primary_key = eval_cfg["primary"]
    groups: dict[tuple[str, str], dict[str, list[RunSpec]]] = defaultdict(lambda: defaultdict(list))
    datasets, models = [s.dataset for s in runs], [s.model for s in runs]
    for spec in runs:
        key = (varying_label(spec.dataset, datasets), varying_label(spec.model, models))
        groups[key][row_label(spec) if row_label else variant_label(LOSSES, spec.loss)].append(spec)
    boards = []
    for (ds, model), by_loss in groups.items():
        specs_here = [s for specs in by_loss.values() for s in specs]
        cols = columns(eval_cfg, macro=any(float(s.dataset.params.get("long_tail") or 1) > 1 for s in specs_here))
        primary = next(c for c in cols if c.key == primary_key)
        rows, notes, curves, values, numbers, seeds = [], [], {}, {}, [], {}
        for label, specs in by_loss.items():
            recs = [records.get(s.run_id) for s in specs]
            done = [r for r in recs if r is not None and r["status"] == "done"]
            row = {"loss": label, **(info or {}).get(label, {}), "n": f"{len(done)}/{len(specs)}"}
            tidy: dict = {"loss": label, **(info or {}).get(label, {}), "seeds_done": len(done),
                          "seeds_expected": len(specs)}
            complete = len(done) == len(specs)
            if complete:
                seeds[label] = [s.seed for s in specs]
            if not complete:
                statuses = defaultdict(int)
                for r in recs:
                    statuses["missing" if r is None else r["status"]] += 1
                detail = ", ".join(f"{v} {k}" for k, v in sorted(statuses.items()) if k != "done")
                notes.append(f"{label}: {detail} of {len(specs)} seeds — cells left empty, not averaged")
            for col in cols:
                seed_values = [_get(r, col.path) for r in done]
                if not complete or any(v is None for v in seed_values):
                    row[col.title] = "—"
                    row[f"_{col.key}"] = np.nan
                    tidy.update({f"{col.key}_mean": np.nan, f"{col.key}_std": np.nan, f"{col.key}_n": 0})
                    continue
                arr = np.array(seed_values) * col.scale
                values.setdefault(label, {})[col.key] = arr
                std = arr.std(ddof=1) if len(arr) > 1 else 0.0
                shaky = col.reliable_path is not None and any(_get(r, col.reliable_path) == 0 for r in done)
                row[col.title] = f"{arr.mean():.{col.digits}f} ± {std:.{col.digits}f}" + (UNRELIABLE if shaky else "")
                row[f"_{col.key}"] = arr.mean()
                tidy.update({f"{col.key}_mean": arr.mean(), f"{col.key}_std": std, f"{col.key}_n": len(arr)})
                if col.reliable_path is not None:
                    tidy[f"{col.key}_reliable"] = not shaky
                if shaky and UNRELIABLE_NOTE not in notes:
                    notes.append(UNRELIABLE_NOTE)
            if complete and all(r.get("metrics", {}).get("curve_test_last") for r in done):
                curves[label] = np.mean([r["metrics"]["curve_test_last"] for r in done], axis=0)
            rows.append(row)
            numbers.append(tidy)
        table = pd.DataFrame(rows)
        score = table[f"_{primary.key}"]
        table.insert(0, "rank", score.rank(ascending=not primary.higher_is_better, method="min"))
        table["rank"] = table["rank"].map(lambda r: "—" if pd.isna(r) else str(int(r)))
        table = table.assign(_sort=score if primary.higher_is_better else -score)
        table = table.sort_values("_sort", ascending=False, na_position="last")
        hidden = [c for c in table.columns if c.startswith("_")]
        order = {label: i for i, label in enumerate(table["loss"])}
        tidy_table = pd.DataFrame(numbers).sort_values("loss", key=lambda c: c.map(order)).reset_index(drop=True)
        tidy_table.insert(0, "rank", pd.to_numeric(table["rank"].reset_index(drop=True), errors="coerce"))
        ref = _reference([records.get(s.run_id) for s in specs_here])
        if ref is None and reference_fallback is not None:
            ref = reference_fallback(specs_here[0].dataset)
        if ref is not None:  # after the tidy table: the reference is no loss
            ref_row, added = _reference_rows(ref, cols, table)
            ref_row.update({c: "—" for c in table.columns if c not in ref_row and not c.startswith("_")})
            table = pd.concat([table, pd.DataFrame([ref_row])], ignore_index=True)
        boards.append(Board(ds, model, table.drop(columns=hidden).reset_index(drop=True), notes, tidy_table,
                            curves, values, cols, ref, seeds))
    return boards
