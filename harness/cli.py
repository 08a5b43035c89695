"""topk-bench: train, evaluate and compare top-k classification losses from declarative suites.

Exit codes: 0 success; 1 some runs did not end `done` (or a contract check failed); 2 a mistake in
the input (one line on stderr) or no command given (the help is printed); 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from harness import __version__
from harness.errors import ResultsError, UserError, short_repr

if TYPE_CHECKING:  # the heavy modules (torch, pandas, matplotlib) load only when a command needs them
    from harness.store import RunStore
    from harness.suite import Suite

log = logging.getLogger("topk_bench")
RESULTS_ENV = "TOPK_BENCH_RESULTS"


class CommandUnavailable(UserError):
    """A sub-command whose module cannot be imported here (a missing optional dependency)."""


# ----------------------------------------------------------------------------- results location
def project_root(suite_file: Path) -> Path:
    """The nearest folder above the suite file holding pyproject.toml or .git, else the suite's folder."""
    suite_file = suite_file.resolve()
    for parent in suite_file.parents:
        if (parent / "pyproject.toml").is_file() or (parent / ".git").exists():
            return parent
    return suite_file.parent


def results_root(suite_file: Path, option: str | None = None) -> Path:
    """`--results-dir`, else $TOPK_BENCH_RESULTS, else `results/` in the suite's project (see project_root)."""
    if option:
        return Path(option)
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    return project_root(suite_file) / "results"


def _suite_and_store(args: argparse.Namespace) -> tuple[Suite, RunStore]:
    from harness.store import RunStore
    from harness.suite import DEFAULT_MAX_RUNS, load_suite

    suite = load_suite(args.suite, max_runs=getattr(args, "max_runs", None) or DEFAULT_MAX_RUNS)
    return suite, RunStore(results_root(Path(args.suite), args.results_dir), suite.name)


# ----------------------------------------------------------------------------- commands
def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from harness.registry import DATASETS, LOSSES, MODELS

    for registry in (LOSSES, DATASETS, MODELS):
        rows = []
        for e in registry.entries():
            params = "; ".join(f"{k}: {p.describe()}" for k, p in e.params.items()) or "—"
            status = "ok" if e.available else f"unavailable: {e.unavailable_reason}"
            source = "" if e.distribution in (None, "topk-loss-bench") else e.distribution
            rows.append([e.name, e.family or "", e.version, status + (f" ({source})" if source else ""), params])
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
    """(run_id, loss, dataset, model, seed, status) with only the parameters that vary in the suite."""
    from harness.leaderboard import varying_label

    losses = [s.loss for s in suite.runs]
    datasets = [s.dataset for s in suite.runs]
    models = [s.model for s in suite.runs]
    return [(s.run_id, varying_label(s.loss, losses), varying_label(s.dataset, datasets),
             varying_label(s.model, models), s.seed, _run_status(store, s.run_id)) for s in suite.runs]


def cmd_status(args: argparse.Namespace) -> int:
    from collections import Counter

    from tabulate import tabulate

    suite, store = _suite_and_store(args)
    if suite.tune is not None:  # trials and selected configurations (harness/tune_cli.py)
        from harness import tune_cli

        return tune_cli.dry_run(suite, store)
    plan = _plan(suite, store)
    print(tabulate(plan, headers=["run_id", "loss", "dataset", "model", "seed", "status"], tablefmt="simple"))
    print("\n" + ", ".join(f"{n} {s}" for s, n in Counter(p[-1] for p in plan).most_common()))
    return 0


def _test_value(store: RunStore, run_id: str, eval_cfg: dict) -> float | None:
    """The run's test value of the suite's primary metric (as the leaderboard selects it), if recorded."""
    try:
        value = (store.load(run_id) or {})["metrics"]["test"][eval_cfg["select"]][eval_cfg["primary"]]
        return float(value)
    except (KeyError, TypeError, ValueError):
        return None


def cmd_run(args: argparse.Namespace) -> int:
    from collections import Counter

    from harness.executors import EXECUTORS
    from harness.progress import SuiteProgress, short_label
    from harness.report import write_report

    suite, store = _suite_and_store(args)
    if args.dry_run:
        log.info("results: %s (suite view: %s/)", store.results_root.resolve(), suite.name)
        return cmd_status(args)
    resources = suite.model.resources
    device = args.device or resources.device
    executor = args.executor or resources.executor
    if executor != "slurm":  # a login node need not have the compute nodes' GPUs
        from harness.resources_check import check_device_available, check_model_memory

        check_device_available(device, "--device" if args.device else f"{suite.path}: resources.device")
        check_model_memory(suite, device)
    if suite.tune is not None:  # trials first, then the selected configurations (harness/tune_cli.py)
        from harness import tune_cli

        return tune_cli.run(args, suite, store)
    store.check_writable()
    store.sweep_temp_files()
    todo = [s for s in suite.runs if args.force or store.status(s.run_id) != "done"]
    skipped = len(suite.runs) - len(todo)
    if args.force:
        for spec in todo:
            for ckpt in store.checkpoints_dir.glob(f"{spec.run_id}.*"):
                ckpt.unlink(missing_ok=True)
    log.info("suite %s: %d runs, %d to compute, %d already done; results: %s", suite.name, len(suite.runs),
             len(todo), skipped, store.results_root.resolve())
    eval_cfg = suite.model.eval.model_dump()
    labels = {s.run_id: (short_label(s.loss), s.seed) for s in todo}
    outcomes: Counter = Counter()
    results = EXECUTORS[executor](
        todo, store.results_root, suite.name, device, resources.timeout_min,
        workers=args.workers or resources.workers, slurm=resources.slurm, force=args.force,
    )
    with SuiteProgress(len(todo), labels, eval_cfg["primary"]) as progress:
        try:
            for result in results:
                status = result["status"] if result.get("computed", True) or result["status"] == "claimed" \
                    else "skipped"
                outcomes[status] += 1
                progress.finished(result["run_id"], status, _test_value(store, result["run_id"], eval_cfg),
                                  result.get("error"))
        finally:
            results.close()
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
    ids, tuners = [s.run_id for s in suite.runs], None
    if suite.tune is not None:  # a tuned suite's records are its trials (and selected runs)
        from harness.tune import replay

        tuners = replay(suite.tune, store.load, retry=False)  # handed on: the report needs the same replay
        ids = [s.run_id for t in tuners for trial in t.trials for s in trial.specs]
    if not store.records_for(ids):
        raise ResultsError(f"report: no records of suite '{suite.name}' under {store.results_root} "
                           "(run it first: topk-bench run SUITE)")
    print(f"Report: {write_report(suite, store, tuners)}")
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from harness.store import collect

    suite, store = _suite_and_store(args)
    expected = {s.run_id for s in suite.runs}
    table = collect([r for r in store.records() if r["run_id"] in expected])
    out = Path(args.out) if args.out else store.root / "runs.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"{len(table)} records -> {out}")
    return 0


# ----------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one-line UserErrors (main prints them; exit 2)."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 1, got {short_repr(text)}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _device(text: str) -> str:
    from harness.resources_check import DEVICE_PATTERN, DEVICES_ALLOWED

    if not DEVICE_PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"unknown device {short_repr(text)}; allowed: {DEVICES_ALLOWED}")
    return text


def _add_suite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", help="suite file (.yaml or .toml); relative paths in it resolve against its folder")
    p.add_argument("--results-dir", help=f"results root (default: ${RESULTS_ENV}, else results/ in the suite's "
                                         "project: the nearest folder above the suite with pyproject.toml or .git)")
    p.add_argument("--max-runs", type=_positive_int, metavar="N",
                   help="refuse a suite that expands to more than N runs (default 10000)")


def _unavailable(name: str, module: str, exc: BaseException) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        raise CommandUnavailable(f"{name} is unavailable: importing {module} failed: {type(exc).__name__}: {exc}")

    return run


def _optional_command(sub: Any, name: str, module: str, help_text: str, parents: list, load: bool = True) -> None:
    """A sub-command whose implementation (`add_arguments(parser)`, `run(args)`) lives in `module`.

    The module is imported only when the command is used (`load`), so `--help` stays fast; when the
    import fails the command stays listed and says why when used (exit 2)."""
    p = sub.add_parser(name, help=help_text, description=help_text, parents=parents)
    if not load:
        return
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        p.set_defaults(func=_unavailable(name, module, exc), any_arguments=True)
        return
    mod.add_arguments(p)
    p.set_defaults(func=mod.run)


OPTIONAL_COMMANDS = (
    ("bench-loss", "harness.lossbench", "loss-only forward+backward time and memory"),
    ("extract-features", "harness.extract", "embed images into a features file"),
    ("check-loss", "harness.testing", "run the loss plugin contract checks on registered losses"),
    ("bench-overhead", "harness.overhead", "harness cost vs a bare PyTorch loop (benchmark)"),
    ("compare", "harness.compare.cli", "one report across suites and results folders"),
)


def _verbosity() -> argparse.ArgumentParser:
    """-v/-q, accepted before and after the sub-command (SUPPRESS: a later parser never resets them)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                       default=argparse.SUPPRESS, help="debug logging")
    group.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                       default=argparse.SUPPRESS, help="warnings and errors only")
    return common


def _command_of(argv: list[str]) -> str | None:
    """The sub-command named in argv (top-level options take no values, so it is the first word)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the module of an optional command is imported only when argv selects it."""
    command = _command_of(sys.argv[1:] if argv is None else argv)
    common = [_verbosity()]
    parser = _Parser(prog="topk-bench", description=__doc__, parents=common,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="registered losses, datasets and models", parents=common).set_defaults(func=cmd_list)
    p = sub.add_parser("run", help="run every missing or not-done run of a suite, then report", parents=common)
    _add_suite_args(p)
    p.add_argument("--dry-run", action="store_true", help="show the expanded runs and their status only")
    p.add_argument("--force", action="store_true", help="recompute runs that are already done")
    p.add_argument("--device", type=_device, help="auto | cpu | cuda | cuda:N (overrides the suite)")
    p.add_argument("--executor", choices=["inline", "local", "slurm"], help="overrides the suite")
    p.add_argument("--workers", type=_positive_int, help="local executor: parallel processes (≥ 1)")
    p.set_defaults(func=cmd_run)
    for name, func, text in (("status", cmd_status, "status of each run of a suite"),
                             ("report", cmd_report, "rebuild leaderboards and report from the records"),
                             ("collect", cmd_collect, "all records of a suite as one CSV table")):
        p = sub.add_parser(name, help=text, parents=common)
        _add_suite_args(p)
        if name == "collect":
            p.add_argument("--out", help="CSV path (default <results>/<suite>/runs.csv)")
        p.set_defaults(func=func)
    for name, module, text in OPTIONAL_COMMANDS:
        _optional_command(sub, name, module, text, common, load=command == name)
    return parser


def _configure_logging(level: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _main(argv: list[str] | None) -> int:
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging(getattr(args, "log_level", logging.INFO))
    code = int(args.func(args) or 0)
    sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of `topk-bench` and `python -m harness`; returns the exit code."""
    try:
        return _main(argv)
    except UserError as exc:
        print(f"topk-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("topk-bench: interrupted; finished runs are saved", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `topk-bench list | head`: the reader left; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 141  # 128 + SIGPIPE, as a tool killed by the signal would report


if __name__ == "__main__":
    sys.exit(main())
