"""Derived tables: performance profiles, cost per device with its Pareto front, differences to a baseline."""
from __future__ import annotations

import numpy as np
import pandas as pd

from harness.compare import stats
from harness.compare.records import Metric, Selection
from harness.compare.tables import wide


def profile_gaps(matrix: pd.DataFrame, metric: Metric) -> pd.DataFrame:
    """Per problem, how far each loss is from the best: points below the best (accuracies) or the ratio
    to the best (k@99, Dolan & Moré's performance ratio). NaN where the loss is missing."""
    if metric.higher_is_better:
        return matrix.max(axis=1).to_numpy()[:, None] - matrix
    return matrix / matrix.min(axis=1).to_numpy()[:, None]


def profiles(matrix: pd.DataFrame, metric: Metric, taus: np.ndarray | None = None) -> pd.DataFrame:
    """ρ_s(τ): the fraction of all problems on which loss s is within τ of the best (missing = never).
    Losses with no value on any problem are left out (the report lists them)."""
    matrix = matrix.loc[:, matrix.notna().any(axis=0)]
    gaps = profile_gaps(matrix, metric)
    finite = gaps.to_numpy()[np.isfinite(gaps.to_numpy())]
    if taus is None:  # the profile is a step function: exact at 0 (1), at every gap, and one step beyond
        start = 0.0 if metric.higher_is_better else 1.0
        top = float(finite.max()) if finite.size else start
        taus = np.unique(np.concatenate([[start], finite, [top + max(0.05 * (top - start), 0.1)]]))
    rows = []
    for loss in matrix.columns:
        g = gaps[loss].to_numpy()
        for tau in taus:
            rows.append({"metric": metric.key, "loss": loss, "tau": float(tau),
                         "fraction": float(np.mean(np.nan_to_num(g, nan=np.inf) <= tau + 1e-12))})
    return pd.DataFrame(rows)


def pareto(acc: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Mask of the points no other point beats on both (higher accuracy, lower cost); NaN cost: never."""
    ok = np.isfinite(acc) & np.isfinite(cost)
    front = np.zeros(len(acc), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (acc >= acc[i]) & (cost <= cost[i]) & ((acc > acc[i]) | (cost < cost[i]))
        front[i] = not dominated.any()
    return front


def cost_table(cells: pd.DataFrame, metric: Metric) -> pd.DataFrame:
    """Per device: the losses measured on every problem that ran on that device, with their mean metric
    over those problems, geometric-mean loss/CE time, mean step time, largest peak memory and Pareto flags."""
    sub = cells[(cells["metric"] == metric.key) & cells["device"].notna()]
    rows = []
    for device, dev in sub.groupby("device", sort=True):
        problems = sorted(dev["problem"].unique())
        for loss, grp in dev.groupby("loss", sort=False):
            if len(grp) != len(problems):
                continue
            ratio = grp["loss_vs_ce"].to_numpy()
            rows.append({"device": device, "loss": loss, "metric": metric.key, "problems": len(problems),
                         "mean": grp["mean"].mean(),
                         "loss_vs_ce": float(np.exp(np.log(ratio).mean())) if np.all(ratio > 0) else np.nan,
                         "step_ms": grp["step_ms"].mean(), "peak_memory_mb": grp["peak_memory_mb"].max()})
    table = pd.DataFrame(rows, columns=["device", "loss", "metric", "problems", "mean", "loss_vs_ce", "step_ms",
                                        "peak_memory_mb"])
    sign = 1 if metric.higher_is_better else -1
    for col in ("loss_vs_ce", "peak_memory_mb"):
        flags = np.zeros(len(table), dtype=bool)
        for _, idx in table.groupby("device").groups.items():
            part = table.loc[idx]
            flags[table.index.get_indexer(idx)] = pareto(sign * part["mean"].to_numpy(), part[col].to_numpy())
        table[f"pareto_{col}"] = flags
    return table


def baseline_table(sel: Selection, metric: Metric, baseline: str) -> pd.DataFrame:
    """Per problem and loss: the difference to the baseline's row with its 95 % CI (empty without baseline)."""
    rows = []
    for prob in sel.problems.values():
        base = prob.cells.get(baseline)
        if base is None or not base.complete:
            continue
        base_vals = {r.seed: r.values[metric.key] for r in base.runs.values()}
        for cell in prob.cells.values():
            if cell.loss == baseline or not cell.complete:
                continue
            d = stats.difference({r.seed: r.values[metric.key] for r in cell.runs.values()}, base_vals)
            rows.append({"problem": prob.label, "loss": cell.loss, "metric": metric.key, "baseline": baseline,
                         "diff": d.diff, "ci_low": d.low, "ci_high": d.high, "method": d.method, "n": d.n,
                         "significant": d.significant})
    return pd.DataFrame(rows, columns=["problem", "loss", "metric", "baseline", "diff", "ci_low", "ci_high",
                                       "method", "n", "significant"])


def rank_inputs(cells: pd.DataFrame, metric: Metric) -> tuple[pd.DataFrame, list[str]]:
    """The complete problems × losses matrix for the rank tests, and the losses left out of it."""
    mat = wide(cells, metric)
    keep = [c for c in mat.columns if mat[c].notna().all()]
    return mat[keep], [c for c in mat.columns if c not in keep]
