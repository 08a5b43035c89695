"""Report parts of a tuned suite: leaderboards of the selected configurations, trial tables, plots."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from harness import leaderboard  # noqa: E402
from harness import space as spaces  # noqa: E402
from harness.leaderboard import Board  # noqa: E402
from harness.spec import RunSpec  # noqa: E402
from harness.tune import Tuner  # noqa: E402
from harness.tune_plan import TunePlan  # noqa: E402


def format_values(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()) or "—"


def _board_key(spec: RunSpec, runs: list[RunSpec]) -> tuple[str, str]:
    return (leaderboard.varying_label(spec.dataset, [s.dataset for s in runs]),
            leaderboard.varying_label(spec.model, [s.model for s in runs]))


def boards(plan: TunePlan, tuners: list[Tuner], records: dict[str, dict], eval_cfg: dict
           ) -> tuple[list[Board], list[str]]:
    """One row per tuned row at its selected configuration (chosen hyperparameters and trials shown),
    and a note for each row that has no selection yet."""
    finals, labels, info, notes = [], {}, {}, []
    for tuner in tuners:
        label, best = tuner.group.label, tuner.best()
        if best is None:
            state = "no trial finished" if tuner.complete else f"{len(tuner.trials)}/{tuner.budget} trials done"
            notes.append(f"{label}: not selected yet ({state}) — not in the table")
            continue
        trials = "not tuned" if not tuner.group.dims else f"{len(tuner.trials)}"
        info[label] = {"chosen (validation)": format_values(best.values), "trials": trials}
        for spec in tuner.finals():
            finals.append(spec)
            labels[spec.run_id] = label
    built = leaderboard.build(finals, records, eval_cfg, row_label=lambda s: labels[s.run_id], info=info) \
        if finals else []
    return built, notes


def header(plan: TunePlan, tuners: list[Tuner]) -> list[str]:
    done = sum(len(t.trials) for t in tuners)
    untuned = [t.group.label for t in tuners if not t.group.dims]
    lines = [
        f"- tuning: **budget {plan.budget} trials per row** (every row, the baseline included), Optuna "
        f"{plan.sampler} sampler, trials trained on seeds {plan.seeds} and scored on the **validation** split "
        f"(`{plan.metric}`, {plan.selection} epoch, {plan.direction}); the best trial per row then ran on "
        f"seeds {plan.final_seeds}, and only those runs feed the tables ({done} trials recorded)",
    ]
    if untuned:
        lines.append(f"- not tuned (no search space): {', '.join(f'`{u}`' for u in untuned)}")
    return lines


def trials_table(tuners: list[Tuner]) -> pd.DataFrame:
    rows = []
    for tuner in tuners:
        for trial in tuner.trials:
            rows.append({"row": tuner.group.label, "trial": trial.number, **trial.values,
                         "validation": trial.value, "run_ids": " ".join(s.run_id for s in trial.specs)})
    return pd.DataFrame(rows)


def _colour(i: int):
    """Ten distinct hues first (tab20's dark shades), then their light shades."""
    return plt.get_cmap("tab20")((2 * i) % 20 + (i // 10) % 2)


def _for_board(tuners: list[Tuner], board: Board, runs: list[RunSpec]) -> list[Tuner]:
    return [t for t in tuners if _board_key(t.group.base, runs) == (board.dataset, board.model)]


def plot_history(tuners: list[Tuner], plan: TunePlan, path: Path, title: str) -> bool:
    """Best validation score so far against the trial number, one line per row (did the budget suffice?)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for tuner in tuners:
        best, xs, ys = None, [], []
        for trial in tuner.trials:
            if trial.value is not None:
                better = best is None or (trial.value > best if plan.direction == "max" else trial.value < best)
                best = trial.value if better else best
            if best is not None:
                xs.append(trial.number + 1)
                ys.append(best)
        if xs:
            ax.plot(xs, ys, marker=".", linewidth=1.0, drawstyle="steps-post", label=tuner.group.label,
                    color=_colour(tuners.index(tuner)))
            drawn = True
    if drawn:
        ax.set_xlabel("trial")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"best validation {plan.metric} so far")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5, loc="lower right" if plan.direction == "max" else "upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def plot_sensitivity(tuners: list[Tuner], plan: TunePlan, path: Path, title: str) -> bool:
    """Validation score of every trial against each tuned hyperparameter (one panel per hyperparameter)."""
    dims: dict[str, spaces.Space] = {}
    for tuner in tuners:
        for dim in tuner.group.dims:
            dims.setdefault(dim.name, dim.space)
    if not dims:
        return False
    cols = min(3, len(dims))
    rows = math.ceil(len(dims) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    colours = {t.group.label: _colour(i) for i, t in enumerate(tuners)}  # one colour per row in every panel
    for ax, (name, sp) in zip(axes.flat, dims.items()):
        for tuner in tuners:
            pts = [(t.values[name], t.value) for t in tuner.trials if name in t.values and t.value is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter([str(x) for x in xs] if isinstance(sp, spaces.Choice) else xs, ys, s=12,
                           color=colours[tuner.group.label], label=tuner.group.label)
        if isinstance(sp, spaces.Log):
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"validation {plan.metric}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(dims):]:
        ax.axis("off")
    handles = {h.get_label(): h for ax in axes.flat for h in ax.collections}
    fig.legend(list(handles.values()), list(handles), fontsize=5, loc="lower center",
               ncol=min(4, max(1, len(handles))), frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(handles) / 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def board_plots(tuners: list[Tuner], plan: TunePlan, board: Board, runs: list[RunSpec], plots: Path,
                slug: str) -> list[Path]:
    """Both plots for the rows of one leaderboard; returns the files written."""
    mine = _for_board(tuners, board, runs)
    title = f"{board.dataset} / {board.model}"
    out = []
    for name, fn in (("tune-history", plot_history), ("tune-sensitivity", plot_sensitivity)):
        png = plots / f"{name}-{slug}.png"
        if fn(mine, plan, png, title):
            out.append(png)
    return out
