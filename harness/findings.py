"""What a leaderboard shows, in sentences generated from its numbers (never typed by hand).

For each metric: the best loss, and which losses differ from the softmax baseline by more than seed
noise — Welch's t-test on the per-seed values, two-sided, p < 0.05, no correction for the number
of comparisons (so with many losses expect the odd false positive; the p-values are printed).
Rows with missing or failed seeds are never compared.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from harness.leaderboard import Board, Column

BASELINE = "softmax"
ALPHA = 0.05
MAX_LISTED = 6  # per metric and direction; the table has the rest


def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of Welch's t-test; 1.0 when it is undefined (fewer than 2 seeds, no spread)."""
    if len(a) < 2 or len(b) < 2:
        return 1.0
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # e.g. the same integer k@99 on every seed
        return 1.0 if a[0] == b[0] else 0.0
    with warnings.catch_warnings():  # nearly identical seeds: scipy warns, the p-value is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return 1.0 if math.isnan(p) else p


def _fmt(values: np.ndarray, digits: int) -> str:
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.{digits}f}"


def _metric_line(board: Board, col: Column) -> tuple[str, set[str], set[str]]:
    """One bullet for a metric, and the labels significantly better / worse than the baseline."""
    rows = {label: v[col.key] for label, v in board.values.items() if col.key in v}
    sign = 1 if col.higher_is_better else -1
    best = max(rows, key=lambda label: sign * rows[label].mean())
    line = f"- **{col.title}**: best `{best}` {_fmt(rows[best], col.digits)}"
    better, worse = set(), set()
    base = rows.get(BASELINE)
    if base is None:
        return line + f" (no complete `{BASELINE}` row to compare with)", better, worse
    if best != BASELINE:
        line += f"; `{BASELINE}` {_fmt(base, col.digits)}"
    diffs = []
    for label, vals in rows.items():
        if label == BASELINE:
            continue
        p = welch_p(vals, base)
        if p < ALPHA:
            delta = vals.mean() - base.mean()
            (better if sign * delta > 0 else worse).add(label)
            evidence = f"p={p:.2g}" if p > 0 else "the same on every seed"
            diffs.append((sign * delta, f"`{label}` {delta:+.{col.digits}f} ({evidence})"))
    if not diffs:
        return line + f"; no loss differs from `{BASELINE}` beyond seed noise", better, worse
    ups = [text for gain, text in sorted(diffs, reverse=True) if gain > 0]
    downs = [text for gain, text in sorted(diffs) if gain < 0]
    if ups:
        line += f"; better than `{BASELINE}`: " + _listing(ups)
    if downs:
        line += "; worse: " + _listing(downs)
    return line, better, worse


def _listing(items: list[str], most: int = MAX_LISTED) -> str:
    """The first `most` items (largest effects first) and how many more there are."""
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def board_findings(board: Board) -> list[str]:
    """Markdown bullets for one leaderboard."""
    cols = [c for c in board.columns if c.key.startswith("top") or c.key == "k99"]
    if not board.values:
        return ["- no loss has all its seeds done yet: nothing to compare"]
    lines, better, worse = [], {}, {}
    for col in cols:
        line, up, down = _metric_line(board, col)
        lines.append(line)
        better[col.key], worse[col.key] = up, down
    top1 = next((c.key for c in cols if c.key == "top1"), None)
    if top1 is not None:
        higher_k = [c.key for c in cols if c.key.startswith("top") and c.key != "top1"]
        trade = sorted({label for key in higher_k for label in better[key]} & worse[top1])
        if trade:
            lines.append("- **trade-off**: better than `softmax` at some k > 1 but worse at top-1: "
                         + ", ".join(f"`{label}`" for label in trade))
    seeds = {len(v) for vals in board.values.values() for v in vals.values()}
    lines.append(f"- seeds per row: {', '.join(map(str, sorted(seeds)))}; Welch's t-test, p < {ALPHA}, "
                 "uncorrected for multiple comparisons")
    return lines
