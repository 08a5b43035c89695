"""Write the comparison: compare.md, self-contained compare.html, tidy CSVs and figures under --out."""
from __future__ import annotations

import logging
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from harness.compare import analysis, figures, goals, render, stats, tables
from harness.compare.records import Selection
from harness.compare.render import Table, cell

log = logging.getLogger(__name__)

TITLES = {"summary": "Table 1 (summary)", "ranks": "Table 2 (average ranks)", "cost": "Table 3 (cost)",
          "baseline": "Table 4 (relative to baseline)"}
MAX_LISTED = 200
FOREST_PANELS = 4


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60] or "x"


class _Analysis:
    """Every number of the report, computed once from the Selection."""

    def __init__(self, sel: Selection, baseline: str) -> None:
        self.sel, self.baseline = sel, baseline
        self.cells = tables.cells_table(sel)
        self.runs = tables.runs_table(sel)
        self.avg: dict[str, pd.Series] = {}
        self.ranks: dict[str, pd.DataFrame] = {}
        self.tests: dict[str, stats.RankTest | str] = {}
        self.left_out: dict[str, list[str]] = {}
        self.profiles: dict[str, pd.DataFrame] = {}
        self.cost: dict[str, pd.DataFrame] = {}
        self.base: dict[str, pd.DataFrame] = {}
        for m in sel.metrics:
            mat, left = analysis.rank_inputs(self.cells, m)
            ranks, avg = stats.average_ranks(mat, m.higher_is_better)
            self.ranks[m.key], self.avg[m.key], self.left_out[m.key] = ranks, avg, left
            self.tests[m.key] = stats.rank_test(mat)
            self.profiles[m.key] = analysis.profiles(tables.wide(self.cells, m), m)
            self.cost[m.key] = analysis.cost_table(self.cells, m)
            self.base[m.key] = analysis.baseline_table(sel, m, baseline)
        first = sel.metrics[0].key
        ranked = list(self.avg[first].index)
        rest = sorted(set(self.cells["loss"]) - set(ranked)) if len(self.cells) else []
        self.order = ranked + rest


def _summary_table(a: _Analysis) -> Table:
    header, rows = tables.summary(a.cells, a.sel, a.order)
    rows = [[cell(c["text"], c["value"], c["best"]) for c in row] for row in rows]
    return Table("summary", TITLES["summary"], header, rows,
                 "mean ± sample std over seeds (accuracies in %); bold: best in the column; — : missing "
                 "(why: see 'Records'); the mean over problems only for losses present on all of them")


def _ranks_table(a: _Analysis) -> Table:
    metrics = a.sel.metrics
    header = ["loss"] + [goals.rank_column(m) for m in metrics]
    best = {m.key: a.avg[m.key].min() if len(a.avg[m.key]) else None for m in metrics}
    rows = []
    for loss in a.order:
        row = [cell(loss)]
        for m in metrics:
            v = a.avg[m.key].get(loss)
            row.append(cell(render.MISSING if v is None else f"{v:.2f}", v, v is not None and v == best[m.key]))
        rows.append(row)
    n = len(a.sel.problems)
    return Table("ranks", TITLES["ranks"], header, rows,
                 f"rank 1 = best on a problem, ties share the average rank; mean over the {n} problem(s); "
                 "only losses present on every problem are ranked (— otherwise)")


def _tests_table(a: _Analysis) -> Table:
    header = ["metric", "problems N", "losses k", "Friedman χ²", "p", "Iman–Davenport F", "p (F)",
              "Nemenyi CD (α = 0.05)"]
    rows = []
    for m in a.sel.metrics:
        t = a.tests[m.key]
        if isinstance(t, str):
            rows.append([cell(m.title)] + [cell(f"not computed: {t}")] + [cell("")] * 6)
            continue
        rows.append([cell(m.title), cell(str(t.n_problems), t.n_problems), cell(str(t.n_losses), t.n_losses),
                     cell(f"{t.chi2:.3f}", t.chi2), cell(f"{t.p_value:.3g}", t.p_value),
                     cell(f"{t.iman_davenport_f:.3f}", t.iman_davenport_f),
                     cell(f"{t.iman_davenport_p:.3g}", t.iman_davenport_p), cell(f"{t.cd:.3f}", t.cd)])
    return Table("tests", "Rank tests", header, rows,
                 "scipy's Friedman test (tie-corrected) and scikit-posthocs' Nemenyi test over the complete "
                 "problems × losses matrix")


def _cost_table(a: _Analysis) -> Table:
    metrics = a.sel.metrics
    first = a.cost[metrics[0].key]
    header = (["device / loss", "problems"] + [f"mean {m.title}" for m in metrics]
              + ["loss/CE time", "step ms", "peak memory MB", "Pareto (time)", "Pareto (memory)"])
    rows = []
    for r in first.itertuples():
        row = [cell(goals.cost_row(r.device, r.loss)), cell(str(r.problems), r.problems)]
        for m in metrics:
            c = a.cost[m.key]
            v = c[(c["device"] == r.device) & (c["loss"] == r.loss)]["mean"]
            v = float(v.iloc[0]) if len(v) else np.nan
            dev = c[c["device"] == r.device]["mean"]
            best = dev.max() if m.higher_is_better else dev.min()
            row.append(cell(f"{v:.2f}", v, v == best))
        for col, digits in (("loss_vs_ce", 2), ("step_ms", 2), ("peak_memory_mb", 0)):
            v = getattr(r, col)
            row.append(cell(render.MISSING if np.isnan(v) else f"{v:.{digits}f}", v))
        row += [cell("yes" if r.pareto_loss_vs_ce else "", 1.0 if r.pareto_loss_vs_ce else 0.0),
                cell("yes" if r.pareto_peak_memory_mb else "", 1.0 if r.pareto_peak_memory_mb else 0.0)]
        rows.append(row)
    return Table("cost", TITLES["cost"], header, rows,
                 "per device, the losses measured on every problem run on that device; means over those "
                 "problems; loss/CE time: geometric mean of the loss's forward+backward time over "
                 f"F.cross_entropy's in the same process; peak memory as recorded (CUDA allocator peak on a "
                 f"GPU, process peak RSS on a CPU); Pareto flags for {metrics[0].title}")


def _baseline_table(a: _Analysis) -> Table:
    metrics = a.sel.metrics
    header = ["problem / loss"] + [goals.diff_column(m) for m in metrics] + ["method", "seeds"]
    keyed = {m.key: a.base[m.key].set_index(["problem", "loss"]) for m in metrics}
    first = a.base[metrics[0].key]
    rows = []
    for r in first.itertuples():
        row = [cell(f"{r.problem} / {r.loss}")]
        for m in metrics:
            b = keyed[m.key].loc[(r.problem, r.loss)]
            ci = "" if np.isnan(b["ci_low"]) else f" [{b['ci_low']:+.2f}, {b['ci_high']:+.2f}]"
            good = b["significant"] and (b["diff"] > 0) == m.higher_is_better
            row.append(cell(f"{b['diff']:+.2f}{ci}", b["diff"], bool(good)))
        rows.append(row + [cell(r.method), cell(str(r.n), r.n)])
    return Table("baseline", TITLES["baseline"], header, rows,
                 f"mean difference to `{a.baseline}` on the same problem with its 95 % CI (paired over shared "
                 "seeds, else Welch); bold: significantly better")


def _findings(a: _Analysis) -> list[goals.Finding]:
    out = []
    summary_means = {}
    for m in a.sel.metrics:
        mat = tables.wide(a.cells, m)
        summary_means[m.key] = {c: float(mat[c].mean()) for c in mat.columns if mat[c].notna().all()
                                and len(mat) == len(a.sel.problems)}
    for m in a.sel.metrics:
        out += goals.rank_findings(m, a.avg[m.key], a.tests[m.key], len(a.sel.problems))
        out.append(goals.mean_finding(m, summary_means[m.key]))
    first = next((m for m in a.sel.metrics if m.is_accuracy), a.sel.metrics[0])  # "points" need a percentage
    n_base = sum(1 for p in a.sel.problems.values() if a.baseline in p.cells and p.cells[a.baseline].complete)
    out += goals.baseline_findings(first, a.base[first.key], a.baseline, n_base)
    if first.is_accuracy:
        out += goals.cost_findings(first, a.cost[first.key])
    return out


def _figures(a: _Analysis, out: Path) -> list[tuple[str, str, Path]]:
    """(section, caption, path) of every figure written."""
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    made = []
    n = len(a.sel.problems)
    for m in a.sel.metrics:
        t = a.tests[m.key]
        if not isinstance(t, str):
            made.append(("ranks", f"critical-difference diagram, {m.title}",
                         figures.cd_diagram(a.avg[m.key], t, m, figs / f"cd-{m.key}.png")))
        made.append(("profiles", f"performance profile, {m.title}",
                     figures.profile_plot(a.profiles[m.key], m, n, figs / f"profile-{m.key}.png")))
        for device in sorted(set(a.cost[m.key]["device"])):
            made.append(("cost", f"cost on {device}, {m.title}",
                         figures.cost_plot(a.cost[m.key], m, device, figs / f"cost-{m.key}-{_slug(device)}.png")))
        problems = list(dict.fromkeys(a.base[m.key]["problem"]))
        for i in range(0, len(problems), FOREST_PANELS):  # at most FOREST_PANELS problems side by side
            part = a.base[m.key][a.base[m.key]["problem"].isin(problems[i:i + FOREST_PANELS])]
            name = f"forest-{m.key}" + (f"-{i // FOREST_PANELS + 1}" if len(problems) > FOREST_PANELS else "")
            made.append(("baseline", f"difference to {a.baseline}, {m.title}",
                         figures.forest_plot(part, m, a.baseline, figs / f"{name}.png")))
    return made


def _records_lines(a: _Analysis) -> list[str]:
    sel = a.sel
    lines = [f"- {note}" for note in sel.notes]
    for p in sel.problems.values():
        complete = [c for c in p.cells.values() if c.complete]
        also = f" (the same runs also reached through {', '.join(p.also_in)}: counted once)" if p.also_in else ""
        lines.append(f"- **{p.label}**{also}: {len(complete)} of {len(p.cells)} loss rows complete, "
                     f"{sum(len(c.runs) for c in complete)} records used")
        envs = Counter(r.env for c in complete for r in c.runs.values())
        lines += [f"  - environment: {e.device}, topk_bench {e.version}, torch {e.torch}, git {e.git[:12]} — "
                  f"{k} records" for e, k in envs.most_common()]
        lines += [f"  - row `{c.loss}` left out: {c.why_missing()}" for c in p.cells.values() if not c.complete]
    for m in sel.metrics:
        if a.left_out[m.key]:
            lines.append(f"- not ranked at {m.title} (missing on some problem): " + ", ".join(
                f"`{x}`" for x in a.left_out[m.key]))
    if sel.excluded:
        lines += ["", f"{len(sel.excluded)} record(s) left out (all in `excluded.csv`):", ""]
        lines += [f"- `{e.where}`: {e.reason}" for e in sel.excluded[:MAX_LISTED]]
        if len(sel.excluded) > MAX_LISTED:
            lines.append(f"- … and {len(sel.excluded) - MAX_LISTED} more")
    return lines


def _write_csvs(a: _Analysis, out: Path) -> None:
    a.runs.to_csv(out / "runs.csv", index=False)
    a.cells.to_csv(out / "cells.csv", index=False)
    ranks, tests, pairs = [], [], []
    for m in a.sel.metrics:
        r = a.ranks[m.key].reset_index().melt(id_vars="problem", var_name="loss", value_name="rank")
        ranks.append(r.assign(metric=m.key, average_rank=r["loss"].map(a.avg[m.key])))
        t = a.tests[m.key]
        if not isinstance(t, str):
            tests.append({"metric": m.key, "problems": t.n_problems, "losses": t.n_losses, "friedman_chi2": t.chi2,
                          "friedman_p": t.p_value, "iman_davenport_f": t.iman_davenport_f,
                          "iman_davenport_p": t.iman_davenport_p, "nemenyi_cd": t.cd})
            p = t.nemenyi.rename_axis(index="loss_a", columns="loss_b").stack().rename("p_value").reset_index()
            pairs.append(p.assign(metric=m.key))
    pd.concat(ranks).to_csv(out / "ranks.csv", index=False) if ranks else None
    pd.DataFrame(tests).to_csv(out / "rank-tests.csv", index=False)
    (pd.concat(pairs) if pairs else pd.DataFrame(columns=["loss_a", "loss_b", "p_value", "metric"])).to_csv(
        out / "nemenyi.csv", index=False)
    pd.concat(a.profiles.values()).to_csv(out / "profiles.csv", index=False)
    pd.concat(a.cost.values()).to_csv(out / "cost.csv", index=False)
    pd.concat(a.base.values()).to_csv(out / "baseline.csv", index=False)
    pd.DataFrame([{"record": e.where, "reason": e.reason} for e in a.sel.excluded],
                 columns=["record", "reason"]).to_csv(out / "excluded.csv", index=False)


def write_compare(sel: Selection, out: Path, baseline: str, select: str | None = None) -> tuple[Path, Path]:
    """Write everything; return (compare.md, compare.html)."""
    out.mkdir(parents=True, exist_ok=True)
    a = _Analysis(sel, baseline)
    _write_csvs(a, out)
    figs = _figures(a, out)
    found = _findings(a)
    tabs = {"summary": _summary_table(a), "ranks": _ranks_table(a), "tests": _tests_table(a),
            "cost": _cost_table(a), "baseline": _baseline_table(a)}
    head = [
        f"- generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from "
        + ", ".join(f"`{s}`" for s in sel.sources),
        f"- metrics: {', '.join(m.title for m in sel.metrics)} on the test split, model selection: "
        + (f"`{select}` (--select)" if select else "each run's own `eval.select`") + "; accuracies in %",
        f"- {len(sel.problems)} problem(s); {len(a.runs)} records used; {len(sel.excluded)} left out; "
        f"baseline `{baseline}`",
    ]
    sections = [
        ("goals", "Which loss for which goal (generated from the tables)", None),
        ("summary", "1. Summary", ["summary"]),
        ("ranks", "2. Ranks across problems", ["ranks", "tests"]),
        ("profiles", "3. Performance profiles (Dolan & Moré 2002)", []),
        ("cost", "4. Cost", ["cost"]),
        ("baseline", f"5. Relative to `{baseline}`", ["baseline"]),
        ("records", "Records: which were used, which were left out and why", None),
    ]
    md = [f"# Comparison: {', '.join(sel.sources)}", "", *head, ""]
    html_parts = [f"<h1>Comparison: {render.html.escape(', '.join(sel.sources))}</h1><ul>"
                  + "".join(f"<li>{render.inline(h[2:])}</li>" for h in head) + "</ul>"]
    for key, title, table_ids in sections:
        md += [f"## {title}", ""]
        html_parts.append(f'<h2 id="s-{key}">{render.inline(title)}</h2>')
        if key == "goals":
            md += [render.cite_md(f, TITLES) for f in found] + [""]
            html_parts.append("<ul>" + "".join(render.finding_html(f, TITLES) for f in found) + "</ul>")
            continue
        if key == "records":
            lines = _records_lines(a)
            md += lines + [""]
            html_parts.append("<pre>" + render.html.escape("\n".join(lines)) + "</pre>")
            continue
        for tid in table_ids:
            t = tabs[tid]
            md += [f"**{t.title}** — {t.note}", "", *render.to_markdown(t), ""]
            html_parts.append(render.to_html(t))
        for section, caption, path in figs:
            if section == key:
                md += [f"![{caption}]({path.relative_to(out).as_posix()})", ""]
                html_parts.append(render.image_html(path, caption))
    md_path, html_path = out / "compare.md", out / "compare.html"
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text(render.page(f"topk-bench compare: {', '.join(sel.sources)}", html_parts))
    return md_path, html_path

