"""Tidy tables from a Selection: one row per used run, one row per (problem, loss, metric) cell."""
from __future__ import annotations

import numpy as np
import pandas as pd

from harness.compare.records import Metric, Selection

MISSING = "—"


def runs_table(sel: Selection) -> pd.DataFrame:
    """Every record the comparison used, one row each (numbers only)."""
    rows = []
    for prob, cell, run in sel.used_runs():
        row = {"problem": prob.label, "suite": prob.suite, "dataset": prob.dataset, "model": prob.model,
               "loss": cell.loss, "seed": run.seed, "run_id": run.run_id, "device": run.env.device,
               "topk_bench": run.env.version, "git_sha": run.env.git, "torch": run.env.torch,
               "loss_vs_ce": run.loss_vs_ce, "step_ms": run.step_ms, "peak_memory_mb": run.peak_memory_mb}
        row.update(run.values)
        rows.append(row)
    return pd.DataFrame(rows)


def cells_table(sel: Selection) -> pd.DataFrame:
    """One row per (problem, loss, metric): n, mean, std over seeds and the cell's cost; NaN when missing."""
    rows = []
    for prob in sel.problems.values():
        for cell in prob.cells.values():
            runs = list(cell.runs.values()) if cell.complete else []
            env = cell.env if cell.complete else None
            for m in sel.metrics:
                vals = np.array([r.values[m.key] for r in runs])
                rows.append({
                    "problem": prob.label, "suite": prob.suite, "dataset": prob.dataset, "model": prob.model,
                    "loss": cell.loss, "metric": m.key, "n": len(vals), "n_expected": len(cell.expected),
                    "mean": vals.mean() if len(vals) else np.nan,
                    "std": vals.std(ddof=1) if len(vals) > 1 else (0.0 if len(vals) else np.nan),
                    "device": env.device if env else None, "topk_bench": env.version if env else None,
                    "loss_vs_ce": np.mean([r.loss_vs_ce for r in runs]) if runs else np.nan,
                    "step_ms": np.mean([r.step_ms for r in runs]) if runs else np.nan,
                    "peak_memory_mb": np.max([r.peak_memory_mb for r in runs]) if runs else np.nan,
                    "missing": "" if cell.complete else cell.why_missing(),
                })
    return pd.DataFrame(rows)


def wide(cells: pd.DataFrame, metric: Metric) -> pd.DataFrame:
    """Means as a problems × losses matrix for one metric (NaN where missing)."""
    sub = cells[cells["metric"] == metric.key]
    return sub.pivot_table(index="problem", columns="loss", values="mean", aggfunc="first", dropna=False,
                           sort=False)


def fmt(mean: float, std: float, metric: Metric) -> str:
    if np.isnan(mean):
        return MISSING
    d = 2 if metric.is_accuracy else 1
    return f"{mean:.{d}f} ± {std:.{d}f}"


def summary(cells: pd.DataFrame, sel: Selection, order: list[str]) -> tuple[list[str], list[list[dict]]]:
    """Header and rows of the summary table. Each cell is {text, value, best}: one column per (problem,
    metric) and, per metric, the mean over the problems (only for losses present on all of them)."""
    header = ["loss"]
    columns: list[tuple[str | None, Metric]] = []
    for prob in sel.problems.values():
        for m in sel.metrics:
            header.append(f"{prob.label} · {m.title}")
            columns.append((prob.label, m))
    for m in sel.metrics:
        header.append(f"mean over problems · {m.title}")
        columns.append((None, m))
    index = cells.set_index(["problem", "loss", "metric"])
    table: dict[str, list[dict]] = {loss: [{"text": loss, "value": None, "best": False}] for loss in order}
    for problem, m in columns:
        sign = 1 if m.higher_is_better else -1
        vals = {}
        mat = wide(cells, m) if problem is None else None
        for loss in order:
            if mat is not None:
                col = mat[loss] if loss in mat.columns else pd.Series(dtype=float)
                full = len(col) == len(sel.problems) and col.notna().all()
                vals[loss] = (col.mean(), np.nan) if full else (np.nan, np.nan)
            elif (problem, loss, m.key) in index.index:
                r = index.loc[(problem, loss, m.key)]
                vals[loss] = (r["mean"], r["std"])
            else:
                vals[loss] = (np.nan, np.nan)
        finite = [sign * v[0] for v in vals.values() if not np.isnan(v[0])]
        best = max(finite) if finite else None
        for loss, (mean, std) in vals.items():
            text = fmt(mean, std, m) if problem is not None or np.isnan(mean) else f"{mean:.2f}"
            table[loss].append({"text": text, "value": None if np.isnan(mean) else float(mean),
                                "best": best is not None and not np.isnan(mean) and sign * mean == best})
    return header, list(table.values())
