"""The `compare` sub-command (registered by harness.cli through `_optional_command`).

Light to import: the statistics and plotting stack loads only when the command runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SUITE_OR_RESULTS_DIR",
                   help="suite files (records from --results-dir) or folders holding runs/*.json")
    p.add_argument("--metric", action="append", metavar="KEY",
                   help="topK, macro_topK or k99; repeat for several (default: top1 and top5)")
    p.add_argument("--baseline", default="softmax", help="loss row the differences are taken to (default softmax)")
    p.add_argument("--select", choices=["best_val", "last"],
                   help="model selection of the test metrics (default: each record's own eval.select)")
    p.add_argument("--out", help="output folder (default: <results root>/compare)")
    p.add_argument("--results-dir", help="results root of the suite files (default: $TOPK_BENCH_RESULTS or ./results)")


def run(args: argparse.Namespace) -> int:
    from harness.compare.records import load, parse_metric
    from harness.compare.report import write_compare

    metrics = [parse_metric(k) for k in dict.fromkeys(args.metric or ["top1", "top5"])]
    sel = load(args.sources, metrics, args.results_dir, args.select)
    from harness.store import default_results_dir

    out = Path(args.out) if args.out else Path(args.results_dir or default_results_dir()) / "compare"
    md, html = write_compare(sel, out, args.baseline, args.select)
    print(f"Comparison: {md} and {html} ({len(sel.problems)} problem(s), {len(sel.excluded)} record(s) left out)")
    return 0
