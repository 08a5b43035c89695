"""The scaling view of a bench-loss table: time and peak memory against the class count, log-log.

A bench file with three or more class counts (e.g. ``suites/lossbench-scaling.yaml``, n = 10 … 20 000)
gets, next to its markdown table, a figure with one line per config (time on the left, memory on the
right, both against n on log-log axes, at one logit scale) and a table of **empirical exponents**: the
least-squares slope of log(time) and log(memory) against log(n) over the class counts ≥ ``FIT_FROM``,
where fixed per-call costs no longer dominate. A slope of ≈ 1 is linear in n (CE, the O(n) losses),
≈ 1.1 what O(n log n) looks like over this range, ≈ 2 quadratic; a loss with top-m preselection is
O(n) in n whatever its operator costs in m. Configs that failed (oom, error) at some n are fitted on
the rest and say so.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

FIT_FROM = 1000  # classes: the exponent is fitted on n ≥ this (fixed costs dominate below)
MIN_CLASS_COUNTS = 3  # a bench with fewer class counts has no scaling view


def has_scaling(df: pd.DataFrame) -> bool:
    """Whether the table spans enough class counts for a scaling view."""
    return df["classes"].nunique() >= MIN_CLASS_COUNTS


def plot_scale(df: pd.DataFrame) -> float:
    """The logit scale the view uses: 3 (the trained-logit regime) when benched, else the largest one."""
    scales = sorted(df["scale"].unique())
    return 3.0 if 3.0 in scales else float(scales[-1])


def _slope(part: pd.DataFrame, column: str) -> tuple[float, int]:
    """(least-squares slope of log column vs log classes over n ≥ FIT_FROM, points used)."""
    ok = part[(part["classes"] >= FIT_FROM) & (part["status"] == "ok") & (part[column] > 0)]
    if ok["classes"].nunique() < 2:
        return math.nan, len(ok)
    x, y = np.log(ok["classes"].to_numpy(float)), np.log(ok[column].to_numpy(float))
    return float(np.polyfit(x, y, 1)[0]), len(ok)


def exponents(df: pd.DataFrame) -> pd.DataFrame:
    """Per config at the view's scale: time and memory exponents, the largest n that ran, failures."""
    part = df[df["scale"] == plot_scale(df)]
    rows = []
    for (loss, config), group in part.groupby(["loss", "config"], sort=False):
        time_slope, points = _slope(group, "median_ms")
        mem_slope, _ = _slope(group, "peak_mem_mb")
        failed = group[(group["status"] != "ok") & ~group["status"].str.startswith("n/a")]
        ran = group[group["status"] == "ok"]["classes"]
        rows.append({
            "loss": loss, "config": config, "time exponent": round(time_slope, 2),
            "memory exponent": round(mem_slope, 2), "fit points": points,
            "largest n": int(ran.max()) if len(ran) else 0,
            "failed at": ", ".join(f"{int(n)} ({s})" for n, s in zip(failed["classes"], failed["status"])) or "—",
        })
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, path: Path) -> Path:
    """Write the log-log figure (time and memory against n, one line per config) to ``path``."""
    scale = plot_scale(df)
    part = df[(df["scale"] == scale) & (df["status"] == "ok")]
    configs = list(dict.fromkeys(part["config"]))
    cmap = plt.get_cmap("tab20")
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(15, 7.5))
    for i, config in enumerate(configs):
        group = part[part["config"] == config].sort_values("classes")
        style = dict(color=cmap((2 * i) % 20 + (i // 10) % 2), linestyle=styles[(i // 20) % len(styles)],
                     marker="o", markersize=3, linewidth=1.6 if config == "cross_entropy" else 1.0)
        if config == "cross_entropy":
            style.update(color="black", linewidth=2.4)
        axes[0].plot(group["classes"], group["median_ms"], label=config, **style)
        mem = group[group["peak_mem_mb"] > 0]
        axes[1].plot(mem["classes"], mem["peak_mem_mb"], **style)
    panels = list(zip(axes, ["forward+backward time (ms, median)", "peak memory of one pass (MB)"]))
    if not (part["peak_mem_mb"] > 0).any():  # --no-memory
        axes[1].axis("off")
        axes[1].text(0.5, 0.5, "peak memory not measured", ha="center", va="center", transform=axes[1].transAxes)
        panels = panels[:1]
    for ax, ylabel in panels:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    batch, device = part["batch"].iloc[0], part["device"].iloc[0]
    fig.suptitle(f"bench-loss scaling: batch {batch}, {device}, scores ~ N(0, {scale:g}²)")
    fig.legend(loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.8, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def section(df: pd.DataFrame, figure: Path) -> str:
    """The markdown that goes under the tables: the figure and the exponent table."""
    from tabulate import tabulate

    table = tabulate(exponents(df).astype(object).fillna("—"), headers="keys", tablefmt="github", showindex=False)
    return (f"## Scaling with the class count (scores ~ N(0, {plot_scale(df):g}²))\n\n"
            f"![time and memory against n]({figure.name})\n\n"
            f"Empirical exponents: least-squares slope of log time and log peak memory against log n over "
            f"n ≥ {FIT_FROM} (≈ 1: linear in n; ≈ 1.1: n log n over this range; ≈ 2: quadratic).\n\n{table}\n")
