"""Figures of the comparison (matplotlib, Agg): CD diagram, performance profiles, cost, forest plot."""
from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from harness.compare.records import Metric  # noqa: E402
from harness.compare.stats import ALPHA, RankTest  # noqa: E402

MARKERS = "osD^v<>pXh*P"
LINESTYLES = ("-", "--", ":", "-.")


def distinct_styles(n: int) -> list[dict]:
    """n different (colour, marker, line style) combinations: tab20 colours, then markers and dashes vary."""
    colours = [plt.get_cmap("tab20")(i) for i in range(20)] if n > 10 else [f"C{i}" for i in range(10)]
    combos = itertools.product(LINESTYLES, MARKERS, colours)
    return [{"color": c, "marker": mk, "linestyle": ls} for (ls, mk, c), _ in zip(combos, range(n))]


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def cd_diagram(avg: pd.Series, test: RankTest, metric: Metric, path: Path) -> Path:
    """Demšar's critical-difference diagram, drawn by scikit-posthocs from the Nemenyi p-values."""
    import scikit_posthocs as sp  # imported here: the suite report uses this module's styles without it

    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.22 * len(avg)))
    sp.critical_difference_diagram(avg, test.nemenyi, ax=ax, alpha=ALPHA, cd=test.cd,
                                   label_props={"fontsize": 7})
    ax.set_title(f"average rank at {metric.title} over {test.n_problems} problems (1 = best); bars join losses "
                 f"Nemenyi cannot tell apart (α = {ALPHA}); CD = {test.cd:.2f}", fontsize=8)
    return _save(fig, path)


def profile_plot(prof: pd.DataFrame, metric: Metric, n_problems: int, path: Path) -> Path:
    """Dolan & Moré performance profiles: fraction of problems within τ of the best, per loss."""
    area = prof.groupby("loss", sort=False)["fraction"].mean()  # legend: highest profile first
    losses = list(area.sort_values(ascending=False, kind="stable").index)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for loss, style in zip(losses, distinct_styles(len(losses))):
        part = prof[prof["loss"] == loss]
        ax.step(part["tau"], part["fraction"], where="post", label=loss, linewidth=1.1, color=style["color"],
                linestyle=style["linestyle"], marker=style["marker"], markersize=3,
                markevery=max(1, len(part) // 8))
    ax.set_xlabel(f"τ: points of {metric.title} below the best" if metric.higher_is_better
                  else f"τ: {metric.title} as a multiple of the best")
    ax.set_ylabel(f"fraction of the {n_problems} problems within τ")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + len(losses) // 24)
    ax.set_title(f"performance profile, {metric.title}", fontsize=9)
    return _save(fig, path)


def cost_plot(cost: pd.DataFrame, metric: Metric, device: str, path: Path) -> Path:
    """Accuracy against loss/CE time and against peak memory on one device, the Pareto fronts marked."""
    dev = cost[cost["device"] == device].reset_index(drop=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    styles = distinct_styles(len(dev))
    for ax, col, label in ((axes[0], "loss_vs_ce", "loss / cross-entropy time (×, log)"),
                           (axes[1], "peak_memory_mb", "peak memory (MB)")):
        for (_, row), style in zip(dev.iterrows(), styles):
            on = bool(row[f"pareto_{col}"])
            ax.scatter(row[col], row["mean"], color=style["color"], marker=style["marker"],
                       s=60 if on else 22, edgecolors="black" if on else "none", zorder=3,
                       label=row["loss"] if ax is axes[0] else None)
        front = dev[dev[f"pareto_{col}"]].sort_values(col)
        if len(front):
            ax.step(front[col], front["mean"], where="post", color="black", linewidth=0.8, alpha=0.6,
                    label="Pareto front" if ax is axes[0] else None)
        if col == "loss_vs_ce" and (dev[col] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"mean {metric.title} over {int(dev['problems'].max()) if len(dev) else 0} problem(s)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{device}: cost against {metric.title} (large, outlined markers: on the Pareto front)",
                 fontsize=9)
    fig.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1 + len(dev) // 30)
    return _save(fig, path)


def forest_plot(table: pd.DataFrame, metric: Metric, baseline: str, path: Path) -> Path:
    """Difference to the baseline with its 95 % CI, one panel per problem, one line per loss."""
    problems = list(dict.fromkeys(table["problem"]))
    losses = sorted(set(table["loss"]))
    fig, axes = plt.subplots(1, len(problems), figsize=(3.6 * len(problems) + 2, 0.9 + 0.2 * len(losses)),
                             sharey=True, squeeze=False)
    y = {loss: i for i, loss in enumerate(losses)}
    for ax, prob in zip(axes[0], problems):
        part = table[table["problem"] == prob]
        for r in part.itertuples():
            colour = "tab:green" if r.significant and r.diff > 0 else ("tab:red" if r.significant else "0.35")
            if metric.higher_is_better is False and r.significant:
                colour = "tab:green" if r.diff < 0 else "tab:red"
            if np.isfinite(r.ci_low):
                ax.plot([r.ci_low, r.ci_high], [y[r.loss]] * 2, color=colour, linewidth=1.4)
            ax.plot(r.diff, y[r.loss], "o", color=colour, markersize=3.5)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_title(prob, fontsize=7)
        ax.set_xlabel(f"{metric.title} − {baseline}" + (" (points)" if metric.is_accuracy else ""), fontsize=7)
        ax.grid(alpha=0.3, axis="x")
    axes[0][0].set_yticks(range(len(losses)), losses, fontsize=6)
    axes[0][0].invert_yaxis()
    axes[0][0].set_title(f"difference to {baseline}, 95 % CI (green: significantly better, red: worse)\n{problems[0]}",
                         fontsize=7, loc="left")
    return _save(fig, path)
