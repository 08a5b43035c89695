"""Command line: topk-bench list | run | status | collect | report | bench-loss | extract-features."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections import Counter
from pathlib import Path

from tabulate import tabulate

from harness.errors import ResultsError, UserError
from harness.registry import DATASETS, LOSSES, MODELS
from harness.store import RunStore, collect, default_results_dir
from harness.suite import Suite, load_suite

log = logging.getLogger("topk_bench")


def _suite_and_store(args: argparse.Namespace) -> tuple[Suite, RunStore]:
    suite = load_suite(args.suite)
    results = Path(args.results_dir) if args.results_dir else default_results_dir()
    return suite, RunStore(results, suite.name)


def cmd_list(args: argparse.Namespace) -> int:
    for registry in (LOSSES, DATASETS, MODELS):
        rows = []
        for e in registry.entries():
            params = "; ".join(f"{k}: {p.describe()}" for k, p in e.params.items()) or "—"
            status = "ok" if e.available else f"unavailable: {e.unavailable_reason}"
            rows.append([e.name, e.family or "", e.version, status, params])
        print(f"\n{registry.kind}{'es' if registry.kind.endswith('s') else 's'}:")
        print(tabulate(rows, headers=["name", "family", "version", "status", "parameters"], tablefmt="simple",
                       maxcolwidths=[None, None, None, None, 80]))
    return 0


def _run_status(store: RunStore, run_id: str) -> str:
    """A run's record status, or `running (host pid …)` while a live runner holds its claim."""
    from harness.claims import Claims

    status = store.status(run_id)
    holder = None if status == "done" else Claims(store.claims_dir).holder(run_id)
    return f"running ({holder.host} pid {holder.pid})" if holder else status


def _plan(suite: Suite, store: RunStore) -> list[tuple]:
    return [(s.run_id, s.loss.label(), s.dataset.name, s.model.name, s.seed, _run_status(store, s.run_id))
            for s in suite.runs]


def cmd_status(args: argparse.Namespace) -> int:
    suite, store = _suite_and_store(args)
    if suite.tune is not None:  # trials and selected configurations (harness/tune_cli.py)
        from harness import tune_cli

        return tune_cli.dry_run(suite, store)
    plan = _plan(suite, store)
    print(tabulate(plan, headers=["run_id", "loss", "dataset", "model", "seed", "status"], tablefmt="simple"))
    print("\n" + ", ".join(f"{n} {s}" for s, n in Counter(p[-1] for p in plan).most_common()))
    return 0


def _progress(total: int):
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, unit="run", dynamic_ncols=True)
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from harness.executors import EXECUTORS
    from harness.report import write_report

    suite, store = _suite_and_store(args)
    if suite.tune is not None:  # trials first, then the selected configurations (harness/tune_cli.py)
        from harness import tune_cli

        return tune_cli.run(args, suite, store)
    if args.dry_run:
        return cmd_status(args)
    resources = suite.model.resources
    device = args.device or resources.device
    executor = args.executor or resources.executor
    store.check_writable()
    store.sweep_temp_files()
    todo = [s for s in suite.runs if args.force or store.status(s.run_id) != "done"]
    skipped = len(suite.runs) - len(todo)
    if args.force:
        for spec in todo:
            for ckpt in store.checkpoints_dir.glob(f"{spec.run_id}.*"):
                ckpt.unlink(missing_ok=True)
    log.info("suite %s: %d runs, %d to compute, %d already done; results in %s", suite.name, len(suite.runs),
             len(todo), skipped, store.results_root)
    bar = _progress(len(todo))
    outcomes: Counter = Counter()
    results = EXECUTORS[executor](
        todo, store.results_root, suite.name, device, resources.timeout_min,
        workers=args.workers or resources.workers, slurm=resources.slurm, force=args.force,
    )
    try:
        for i, result in enumerate(results):
            status = result["status"] if result.get("computed", True) or result["status"] == "claimed" else "skipped"
            outcomes[status] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(outcomes)
            else:
                log.info("[%d/%d] %s %s%s", i + 1, len(todo), result["run_id"], status,
                         f" ({result['error']})" if result.get("error") else "")
    finally:
        results.close()
        if bar is not None:
            bar.close()
    report = write_report(suite, store)
    failed = sum(n for s, n in outcomes.items() if s not in ("done", "claimed", "skipped"))
    elsewhere = outcomes.get("claimed", 0)
    skipped += outcomes.get("skipped", 0)
    not_done = ", ".join(f"{n} {s}" for s, n in outcomes.items() if s not in ("done", "claimed", "skipped"))
    print(f"{suite.name}: {outcomes.get('done', 0)} done, {failed} not done ({not_done or 'none'}), "
          f"{skipped} skipped (already done), {elsewhere} being computed by another runner. Report: {report}")
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report import write_report

    suite, store = _suite_and_store(args)
    if not store.records_for([s.run_id for s in suite.runs]):
        raise ResultsError(f"report: no records of suite '{suite.name}' under {store.results_root} "
                           "(run it first: topk-bench run SUITE)")
    print(f"Report: {write_report(suite, store)}")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    suite, store = _suite_and_store(args)
    expected = {s.run_id for s in suite.runs}
    table = collect([r for r in store.records() if r["run_id"] in expected])
    out = Path(args.out) if args.out else store.root / "runs.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"{len(table)} records -> {out}")
    return 0


def _add_suite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", help="suite file (.yaml or .toml)")
    p.add_argument("--results-dir", help="results root (default: $TOPK_BENCH_RESULTS or ./results)")


def _optional_command(sub, name: str, module: str, help_text: str) -> None:
    """Sub-commands whose implementation lives in its own module (loaded on use)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        log.debug("%s unavailable: %s", name, exc)
        return
    p = sub.add_parser(name, help=help_text)
    mod.add_arguments(p)
    p.set_defaults(func=mod.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="topk-bench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered losses, datasets and models").set_defaults(func=cmd_list)
    p = sub.add_parser("run", help="run every missing or not-done run of a suite, then report")
    _add_suite_args(p)
    p.add_argument("--dry-run", action="store_true", help="show the expanded runs and their status only")
    p.add_argument("--force", action="store_true", help="recompute runs that are already done")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (overrides the suite)")
    p.add_argument("--executor", choices=["inline", "local", "slurm"], help="overrides the suite")
    p.add_argument("--workers", type=int, help="local executor: parallel processes")
    p.set_defaults(func=cmd_run)
    for name, func, text in (("status", cmd_status, "status of each run of a suite"),
                             ("report", cmd_report, "rebuild leaderboards and report from the records"),
                             ("collect", cmd_collect, "all records of a suite as one CSV table")):
        p = sub.add_parser(name, help=text)
        _add_suite_args(p)
        if name == "collect":
            p.add_argument("--out", help="CSV path (default <results>/<suite>/runs.csv)")
        p.set_defaults(func=func)
    _optional_command(sub, "bench-loss", "harness.lossbench", "loss-only forward+backward time and memory")
    _optional_command(sub, "extract-features", "harness.extract", "embed images into a features file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"topk-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("topk-bench: interrupted; finished runs are saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
