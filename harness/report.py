"""Markdown report with leaderboards and plots, rebuilt from the records alone."""
from __future__ import annotations

import logging
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from tabulate import tabulate  # noqa: E402

from harness import leaderboard  # noqa: E402
from harness.findings import Settings, board_findings, comparison_table  # noqa: E402
from harness.leaderboard import Board  # noqa: E402
from harness.leaderboard import variant_label, varying_label  # noqa: E402
from harness.registry import DATASETS, LOSSES, MODELS  # noqa: E402
from harness.spec import Component  # noqa: E402
from harness.store import RunStore  # noqa: E402
from harness.suite import Suite  # noqa: E402

log = logging.getLogger(__name__)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:80] or "board"


def saturation_k(curves: list[np.ndarray], max_k: int, level: float = 0.995) -> int:
    """The k from which every curve is at least `level` (the plot stops there), at most `max_k`."""
    k = 1
    for curve in curves:
        above = np.flatnonzero(np.asarray(curve[:max_k]) >= level)
        k = max(k, int(above[0]) + 1 if above.size else min(max_k, len(curve)))
    return min(max(k, 2), max_k)


def _plot_curves(board: Board, path: Path, max_k: int, labels: dict[str, str] | None = None) -> None:
    """Top-k curves, one distinct colour/marker/dash per row, integer k, cut where every row saturates."""
    from harness.compare.figures import distinct_styles

    labels = labels or {}
    k_end = saturation_k(list(board.curves.values()), max_k)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (label, curve), style in zip(board.curves.items(), distinct_styles(len(board.curves))):
        k = min(k_end, len(curve))
        ax.plot(range(1, k + 1), 100 * curve[:k], label=labels.get(label, label), linewidth=1.1, markersize=3,
                **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("k")
    ax.set_ylabel("test top-k accuracy (%)")
    ax.set_title(f"{board.dataset} / {board.model} (k up to where every row reaches 99.5 %)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + len(board.curves) // 24)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _environment_line(records: list[dict]) -> str:
    envs = Counter(
        (r["environment"].get("torch"), r["environment"].get("device_name"), r["environment"].get("git_sha"))
        for r in records if r.get("environment")
    )
    if not envs:
        return "no runs recorded yet"
    return "; ".join(f"torch {t}, device {d}, git {g} ({n} runs)" for (t, d, g), n in envs.most_common())


def _setup_line(suite: Suite) -> str:
    first = suite.runs[0]
    train = first.train
    tuned = {d.name for g in suite.tune.groups for d in g.dims} if suite.tune is not None else set()
    lr = "tuned" if "lr" in tuned else f"{train['optimizer']['lr']:g}"
    return (f"{variant_label(DATASETS, first.dataset)} · model {variant_label(MODELS, first.model)} · "
            f"{train['epochs']} epochs, batch {train['batch_size']}, {train['optimizer']['name']} "
            f"lr {lr}, schedule {train['schedule']['name']} · seeds {suite.model.seeds}")


def reference_of(dataset: Component) -> dict | None:
    """A dataset's reference curve computed from its parameters (for records that predate it)."""
    entry = DATASETS.get(dataset.name)
    compute = entry.extra.get("reference")
    if compute is None:
        return None
    try:
        return compute(entry.validate_params(dataset.params))
    except Exception as exc:  # a report must not fail over its reference row
        log.warning("no reference for %s: %s", dataset.name, exc)
        return None


def _data_info_lines(boards: list[Board], records: list[dict]) -> list[str]:
    """Setup lines on the reference row and, for homoglyphs, the look-alike groups."""
    lines = []
    for board in boards:
        ref = board.reference
        if ref:
            kind = "exact Bayes optimum given the test inputs" if ref.get("exact") else "an upper bound"
            head = ", ".join(f"top-{k} {100 * ref['curve'][k - 1]:.2f} %" for k in (1, 2, 5) if k <= len(ref["curve"]))
            lines.append(f"- reference ({board.dataset}): *{ref.get('label')}* — {kind}: {head}; "
                         f"`Δ ref` columns are loss − reference in points ({ref.get('note', '')})")
    groups = next((r["data_info"]["ambiguity"] for r in records if "ambiguity" in (r.get("data_info") or {})), None)
    if groups:
        listed = ", ".join(f"{g['chars']} ({g['fonts']})" for g in groups["identical_groups"][:12])
        lines.append(f"- look-alike classes, pixel-identical in (n) fonts: {listed}")
    return lines


def _pool_name(store: RunStore) -> str:
    try:
        return str(store.runs_dir.resolve().relative_to(store.root.resolve().parent.parent))
    except ValueError:
        return str(store.runs_dir)


def _data_lines(records: list[dict]) -> list[str]:
    """Split sizes and class counts as the runs saw them (one line per distinct data setup)."""
    seen: dict[str, int] = {}
    for r in records:
        info = r.get("data_info") or {}
        sizes = [f"{split} {info[f'{split}_size']}" for split in ("train", "val", "test") if f"{split}_size" in info]
        if not sizes:
            continue
        classes = info.get("classes")
        text = ", ".join(sizes) + (f" samples; {classes} classes" if classes is not None else " samples")
        if info.get("classes_in_train") is not None and classes is not None and info["classes_in_train"] < classes:
            text += f" ({info['classes_in_train']} present in train)"
        for key in ("val_holdout_used", "flipped_labels"):
            if info.get(key):
                text += f"; {key.replace('_', ' ')} {info[key]}"
        seen[text] = seen.get(text, 0) + 1
    return [f"- splits: {text} ({n} runs)" for text, n in seen.items()]


def write_report(suite: Suite, store: RunStore, tuners: list | None = None) -> Path:
    """Write `<results>/<suite>/report.md`, leaderboard CSVs and plots; return the report path.

    A tuned suite's tables show the selected configurations (`tuners`: harness.tune's result, else
    replayed from the records).
    """
    eval_cfg = suite.runs[0].eval
    plots = store.root / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    tune_lines: list[str] = []
    if suite.tune is not None:
        from harness import tune_report
        from harness.tune import replay

        tuners = tuners if tuners is not None else replay(suite.tune, store.load, retry=False)
        shown = [s for t in tuners for s in t.finals()]
        trial_specs = [s for t in tuners for trial in t.trials for s in trial.specs]
        expected = list(dict.fromkeys(s.run_id for s in shown + trial_specs))
        by_id = store.records_for(expected)
        boards, tune_notes = tune_report.boards(suite.tune, tuners, by_id, eval_cfg)
        tune_lines = tune_report.header(suite.tune, tuners) + [f"- ⚠ {note}" for note in tune_notes]
        trials = tune_report.trials_table(tuners)
        if not trials.empty:
            trials.to_csv(store.root / "trials.csv", index=False)
            tune_lines.append("- every trial (hyperparameters, validation score, run ids): `trials.csv`")
    else:
        shown = suite.runs
        expected = list(dict.fromkeys(s.run_id for s in suite.runs))
        by_id = store.records_for(expected)
        boards = leaderboard.build(suite.runs, by_id, eval_cfg, reference_fallback=reference_of)
    ignored = {run_id: why for run_id, why in store.problems().items() if run_id in set(expected)}
    records = [by_id[i] for i in expected if i in by_id]
    counts = Counter(r["status"] for r in records)
    missing = len(expected) - len(records) - len(ignored)
    lines = [
        f"# Report: {suite.name}",
        "",
        suite.model.description.strip(),
        "",
        f"- generated: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from `{suite.path}`",
        f"- runs: {len(expected)} expected — {counts.get('done', 0)} done, "
        + ", ".join(f"{counts[s]} {s}" for s in ("failed", "nan", "oom", "timeout") if counts.get(s))
        + (", " if any(counts.get(s) for s in ("failed", "nan", "oom", "timeout")) else "")
        + f"{missing} missing" + (f", {len(ignored)} with an invalid record file (ignored)" if ignored else ""),
        f"- environment: {_environment_line(records)}",
        f"- data: {_setup_line(suite)}",
        *_data_lines(records),
        *_data_info_lines(boards, records),
        f"- metrics: test split, model selected by `{eval_cfg['select']}` (per metric); "
        f"ranked by `{eval_cfg['primary']}`; mean ± std over seeds (sample std); "
        "ties in scores count against the true label",
        *tune_lines,
        "",
    ]
    for board in boards:
        slug = _slug(f"{board.dataset}-{board.model}")
        board.numbers.to_csv(store.root / f"leaderboard-{slug}.csv", index=False)
        lines += [f"## {board.dataset} · {board.model}", "",
                  tabulate(board.table, headers="keys", tablefmt="github", showindex=False), ""]
        lines += [f"- ⚠ {note}" for note in board.footnotes]
        settings = Settings(suite.model.eval.baseline, suite.model.eval.min_seeds)
        lines += ["", "What this table shows (generated from the records):", "", *board_findings(board, settings)]
        table = comparison_table(board, settings, eval_cfg["primary"])
        if not table.empty:
            lines += ["", f"Each row against `{settings.baseline}` on `{eval_cfg['primary']}` (difference of means, "
                      "95 % CI; p-values Holm-adjusted over every comparison in this table):", "",
                      tabulate(table, headers="keys", tablefmt="github", showindex=False, disable_numparse=True)]
        if board.curves:
            png = plots / f"topk-{slug}.png"
            losses = [spec.loss for spec in suite.runs]  # legend: only the parameters that vary in the suite
            labels = {variant_label(LOSSES, c): varying_label(c, losses) for c in losses}
            _plot_curves(board, png, max_k=max(20, 2 * max(eval_cfg["k"])), labels=labels)
            lines += ["", f"![top-k curves]({png.relative_to(store.root)})", ""]
        if suite.tune is not None:
            for png in tune_report.board_plots(tuners, suite.tune, board, shown, plots, slug):
                lines += ["", f"![{png.stem}]({png.relative_to(store.root)})", ""]
    failed = [r for r in records if r["status"] != "done"]
    if failed:
        lines += ["## Runs that did not finish", ""]
        lines += [f"- `{r['run_id']}` {r['spec']['loss']['name']} seed {r['spec']['seed']}: "
                  f"**{r['status']}** — {(r.get('error') or '').splitlines()[0] if r.get('error') else ''}"
                  for r in failed]
        lines.append("")
    if ignored:
        lines += ["## Record files ignored", "",
                  "These files in the run pool failed validation; their runs count as missing and are "
                  "recomputed by the next `topk-bench run`:", ""]
        lines += [f"- `runs/{run_id}.json`: {why}" for run_id, why in sorted(ignored.items())]
        lines.append("")
    lines += ["## Run records", "",
              f"Every number above comes from these files in `{_pool_name(store)}/` (one pool per results root):", ""]
    if suite.tune is not None:
        lines += ["(selected configurations on every seed; the trials are listed in `trials.csv`)", ""]
    for spec in shown:
        status = by_id[spec.run_id]["status"] if spec.run_id in by_id else (
            "invalid record (ignored)" if spec.run_id in ignored else "missing")
        lines.append(f"- `{spec.run_id}` {variant_label(LOSSES, spec.loss)} · seed {spec.seed} · {status}")
    path = store.root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
