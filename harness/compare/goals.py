""""Which loss for which goal": sentences generated from the report's tables, each citing its cells.

Nothing here is typed by hand: every name and number comes from a table the report shows, and each
sentence carries citations (table, row, column, value) that the markdown prints and the HTML links.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from harness.compare.records import Metric
from harness.compare.stats import ALPHA, RankTest

NEAR_BEST = 0.5  # points: "cheapest within 0.5 points of the best"
ALL_ROWS = "all rows"  # a citation of a whole column (its header cell)


@dataclass(frozen=True)
class Cite:
    table: str  # "summary" | "ranks" | "cost" | "baseline"
    row: str
    column: str
    value: str


@dataclass
class Finding:
    text: str
    cites: list[Cite] = field(default_factory=list)


def rank_column(m: Metric) -> str:
    return f"average rank · {m.title}"


def mean_column(m: Metric) -> str:
    return f"mean over problems · {m.title}"


def cost_row(device: str, loss: str) -> str:
    return f"{device} / {loss}"


def diff_column(m: Metric) -> str:
    return f"Δ {m.title} (95 % CI)"


def _names(items: list[str], most: int = 8) -> str:
    shown = ", ".join(f"`{x}`" for x in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def rank_findings(m: Metric, avg: pd.Series, test: RankTest | str, n_problems: int) -> list[Finding]:
    if avg.empty:
        return [Finding(f"No loss is present on every problem at {m.title}, so no average rank.")]
    if avg.iloc[0] == avg.iloc[-1]:
        return [Finding(f"All {len(avg)} ranked losses tie at {m.title} (average rank {avg.iloc[0]:.2f}).",
                        [Cite("ranks", str(avg.index[0]), rank_column(m), f"{avg.iloc[0]:.2f}")])]
    best = str(avg.index[0])
    cite = Cite("ranks", best, rank_column(m), f"{avg.iloc[0]:.2f}")
    text = f"Best average rank at {m.title}: `{best}` ({avg.iloc[0]:.2f} over {n_problems} problem(s))."
    if isinstance(test, str):
        return [Finding(text + f" No rank test: it {test}.", [cite])]
    tied = [str(x) for x in avg.index[1:] if test.nemenyi.loc[best, x] >= ALPHA]
    verdict = (f"Friedman χ² = {test.chi2:.2f}, p = {test.p_value:.2g}"
               + (" — the losses' ranks differ" if test.p_value < ALPHA else " — no evidence the ranks differ"))
    text += f" {verdict}; Nemenyi (CD = {test.cd:.2f}): "
    text += (f"not significantly different from {_names(tied)}." if tied
             else "significantly better ranked than every other loss.")
    return [Finding(text, [cite])]


def mean_finding(m: Metric, summary_means: dict[str, float]) -> Finding:
    if not summary_means:
        return Finding(f"No loss is present on every problem at {m.title}, so no mean over problems.")
    sign = 1 if m.higher_is_better else -1
    best = max(summary_means, key=lambda k: sign * summary_means[k])
    tied = [k for k, v in summary_means.items() if round(v, 9) == round(summary_means[best], 9)]
    names = _names(tied) + (" (tied)" if len(tied) > 1 else "")
    return Finding(f"Best {m.title} on average over the problems: {names} ({summary_means[best]:.2f}).",
                   [Cite("summary", best, mean_column(m), f"{summary_means[best]:.2f}")])


def baseline_findings(m: Metric, table: pd.DataFrame, baseline: str, n_base_problems: int) -> list[Finding]:
    if table.empty:
        return [Finding(f"No complete `{baseline}` row to compare with at {m.title}.")]
    col = diff_column(m)
    sign = 1 if m.higher_is_better else -1
    full = table.groupby("loss").filter(lambda g: len(g) == n_base_problems)
    never_worse, always_better = [], []
    for loss, grp in full.groupby("loss", sort=False):
        worse = (sign * grp["diff"] < 0) & grp["significant"]
        better = (sign * grp["diff"] > 0) & grp["significant"]
        if not worse.any():
            never_worse.append(loss)
        if better.all():
            always_better.append(loss)
    out = [Finding(
        f"Never significantly worse than `{baseline}` at {m.title} (95 % CI of the difference never entirely "
        f"on the worse side, over all {n_base_problems} problem(s) with a `{baseline}` row): "
        + (_names(never_worse) if never_worse else "none") + ".",
        [Cite("baseline", ALL_ROWS, col, f"{len(never_worse)} of {full['loss'].nunique()} losses")])]
    if always_better:
        cites = [Cite("baseline", f"{r.problem} / {r.loss}", col, f"{r.diff:+.2f}")
                 for r in full[full["loss"].isin(always_better)].itertuples()][:6]
        out.append(Finding(f"Significantly better than `{baseline}` at {m.title} on every such problem: "
                           + _names(always_better) + ".", cites))
    return out


def cost_findings(m: Metric, cost: pd.DataFrame) -> list[Finding]:
    out = []
    sign = 1 if m.higher_is_better else -1
    for device, dev in cost.groupby("device", sort=True):
        dev = dev[dev["loss_vs_ce"].notna()]
        if dev.empty:
            continue
        best = dev.loc[(sign * dev["mean"]).idxmax()]
        near = dev[sign * (best["mean"] - dev["mean"]) <= NEAR_BEST + 1e-9]
        cheap = near.loc[near["loss_vs_ce"].idxmin()]
        gap = abs(best["mean"] - cheap["mean"])
        if not math.isfinite(gap):
            continue
        out.append(Finding(
            f"On {device}: the cheapest loss within {NEAR_BEST} points of the best mean {m.title} "
            f"(`{best['loss']}`, {best['mean']:.2f}) is `{cheap['loss']}` ({cheap['mean']:.2f}, "
            f"{cheap['loss_vs_ce']:.2f}× the time of cross-entropy).",
            [Cite("cost", cost_row(device, best["loss"]), f"mean {m.title}", f"{best['mean']:.2f}"),
             Cite("cost", cost_row(device, cheap["loss"]), "loss/CE time", f"{cheap['loss_vs_ce']:.2f}")]))
    return out
