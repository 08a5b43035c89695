"""What a leaderboard shows, in sentences generated from its numbers (never typed by hand).

For each metric: the best row, and which rows differ from the suite's baseline (`eval.baseline`)
beyond seed noise. Rows run on the same seeds are compared with a paired t-test, others with
Welch's; every difference carries a 95 % confidence interval; the p-values of all comparisons in
one table are Holm–Bonferroni adjusted and a difference is listed when the adjusted p < `alpha`.
Below `min_seeds` seeds no significance claim is made. Rows with missing or failed seeds are never
compared. See harness/stats.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from harness import stats
from harness.leaderboard import Board, Column

ALPHA = 0.05
MAX_LISTED = 6  # per metric and direction; the comparison table has the rest


@dataclass(frozen=True)
class Settings:
    """The suite's comparison settings (`eval.baseline`, `eval.min_seeds`)."""

    baseline: str = "softmax"
    min_seeds: int = 3
    alpha: float = ALPHA


def baseline_row(board: Board, baseline: str) -> str | None:
    """The row label that `baseline` names: the label itself, or the only complete row of that loss name."""
    if baseline in board.values:
        return baseline
    same_name = [label for label in board.values if label.split("[", 1)[0] == baseline]
    return same_name[0] if len(same_name) == 1 else None


def _metric_columns(board: Board) -> list[Column]:
    return [c for c in board.columns if c.key.startswith("top") or c.key == "k99"]


def comparisons(board: Board, settings: Settings) -> dict[tuple[str, str], stats.Comparison]:
    """(column key, row label) -> the row's comparison with the baseline, Holm-adjusted over the table."""
    base = baseline_row(board, settings.baseline)
    if base is None:
        return {}
    keys, raw = [], []
    for col in _metric_columns(board):
        if col.key not in board.values[base]:
            continue
        for label, vals in board.values.items():
            if label == base or col.key not in vals:
                continue
            keys.append((col.key, label))
            raw.append(stats.compare(vals[col.key], board.seeds.get(label, []), board.values[base][col.key],
                                     board.seeds.get(base, []), settings.min_seeds))
    return dict(zip(keys, stats.holm(raw)))


def comparison_table(board: Board, settings: Settings, column: str) -> pd.DataFrame:
    """Every row against the baseline for one metric: difference, 95 % CI, test, p and Holm-adjusted p."""
    col = next(c for c in board.columns if c.key == column)
    rows = []
    for (key, label), c in comparisons(board, settings).items():
        if key != column:
            continue
        rows.append({
            "loss": label, f"Δ {col.title}": f"{c.diff:+.{col.digits}f}",
            "95 % CI": f"[{c.ci_low:+.{col.digits}f}, {c.ci_high:+.{col.digits}f}]" if c.n_a > 1 else "—",
            "test": c.test + (f" ({c.note})" if c.note else ""),
            "p": "—" if c.p is None else stats.format_p(c.p),
            "p (Holm)": "—" if c.p_adj is None else stats.format_p(c.p_adj),
        })
    return pd.DataFrame(rows)


def _fmt(values, digits: int) -> str:
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.{digits}f}"


def _describe(label: str, c: stats.Comparison, digits: int) -> str:
    ci = f"[{c.ci_low:+.{digits}f}, {c.ci_high:+.{digits}f}]"
    evidence = f"{c.test}, Holm p={stats.format_p(c.p_adj)}"
    if c.note:
        evidence = f"{c.note}; {evidence}"
    return f"`{label}` {c.diff:+.{digits}f} {ci} ({evidence})"


def _listing(items: list[str], most: int = MAX_LISTED) -> str:
    """The first `most` items (largest effects first) and how many more there are."""
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def _metric_line(board: Board, col: Column, base: str | None, comps: dict, settings: Settings
                 ) -> tuple[str, set[str], set[str]]:
    """One bullet for a metric, and the labels significantly better / worse than the baseline."""
    rows = {label: v[col.key] for label, v in board.values.items() if col.key in v}
    sign = 1 if col.higher_is_better else -1
    best = max(rows, key=lambda label: sign * rows[label].mean())
    line = f"- **{col.title}**: best `{best}` {_fmt(rows[best], col.digits)}"
    better: set[str] = set()
    worse: set[str] = set()
    if base is None or base not in rows:
        return line + f" (no complete `{settings.baseline}` row to compare with)", better, worse
    if best != base:
        line += f"; `{base}` {_fmt(rows[base], col.digits)}"
    mine = {label: c for (key, label), c in comps.items() if key == col.key}
    if mine and not any(c.claim_allowed for c in mine.values()):
        return line + f"; fewer than {settings.min_seeds} seeds: no significance claim", better, worse
    diffs = []
    for label, c in mine.items():
        if c.p_adj is not None and c.p_adj < settings.alpha and c.diff != 0:
            (better if sign * c.diff > 0 else worse).add(label)
            diffs.append((sign * c.diff, _describe(label, c, col.digits)))
    if not mine:
        return line + "; no other complete row to compare with", better, worse
    if not diffs:
        smallest = min((c.p_adj for c in mine.values() if c.p_adj is not None), default=1.0)
        return (line + f"; no difference from `{base}` survives Holm's correction over the table "
                f"(smallest adjusted p = {stats.format_p(smallest)})"), better, worse
    ups = [text for gain, text in sorted(diffs, reverse=True) if gain > 0]
    downs = [text for gain, text in sorted(diffs) if gain < 0]
    if ups:
        line += f"; better than `{base}`: " + _listing(ups)
    if downs:
        line += "; worse: " + _listing(downs)
    return line, better, worse


def _gap_line(board: Board, cols: list[Column], base: str | None) -> str | None:
    """How far the baseline is from the board's reference (Bayes optimum / oracle bound) at each top-k,
    and which share of that gap the best row closes (negative: no row reaches the baseline)."""
    ref = board.reference
    if not ref or base is None or base not in board.values or not ref.get("curve"):
        return None
    parts = []
    for col in cols:
        if not col.key.startswith("top") or not col.key[3:].isdigit() or int(col.key[3:]) > len(ref["curve"]):
            continue
        optimum = ref["curve"][int(col.key[3:]) - 1] * col.scale
        means = {label: v[col.key].mean() for label, v in board.values.items() if col.key in v}
        gap = optimum - means[base]
        best = max(means, key=means.get)
        if gap <= 0:
            parts.append(f"{col.title.split(' ')[0]}: `{base}` is at the reference")
            continue
        closed = 100 * (means[best] - means[base]) / gap
        who = f"best `{best}` closes {closed:.0f} % of it" if best != base else "no row beats it"
        parts.append(f"{col.title.split(' ')[0]} {gap:.{col.digits}f} points, {who}")
    if not parts:
        return None
    return (f"- **gap to the {ref.get('label', 'reference')}** (reference − `{base}`, mean over seeds; share of "
            "it the best row closes): " + "; ".join(parts))


def board_findings(board: Board, settings: Settings | None = None) -> list[str]:
    """Markdown bullets for one leaderboard."""
    settings = settings or Settings()
    if not board.values:
        return ["- no loss has all its seeds done yet: nothing to compare"]
    cols = _metric_columns(board)
    base = baseline_row(board, settings.baseline)
    comps = comparisons(board, settings)
    lines, better, worse = [], {}, {}
    for col in cols:
        line, up, down = _metric_line(board, col, base, comps, settings)
        lines.append(line)
        better[col.key], worse[col.key] = up, down
    top1 = next((c.key for c in cols if c.key == "top1"), None)
    if top1 is not None:
        higher_k = [c.key for c in cols if c.key.startswith("top") and c.key != "top1"]
        trade = sorted({label for key in higher_k for label in better[key]} & worse[top1])
        if trade:
            lines.append(f"- **trade-off**: better than `{base}` at some k > 1 but worse at top-1: "
                         + ", ".join(f"`{label}`" for label in trade))
    gap = _gap_line(board, cols, base)
    if gap:
        lines.append(gap)
    seeds = {len(v) for vals in board.values.values() for v in vals.values()}
    tests = sorted({c.test for c in comps.values() if c.claim_allowed})
    lines.append(
        f"- seeds per row: {', '.join(map(str, sorted(seeds)))}; baseline `{base or settings.baseline}`; "
        f"{len(comps)} comparisons ({', '.join(tests) or 'no test'}: paired where rows share seeds, Welch "
        f"otherwise), Holm–Bonferroni across this table, adjusted p < {settings.alpha}; 95 % CIs of the "
        f"difference; no claim below {settings.min_seeds} seeds")
    return lines
