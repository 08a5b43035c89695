"""`topk-bench run` for a suite with a `tune:` block: the trials, then the selected configurations."""
from __future__ import annotations

import argparse
import logging
from collections import Counter

from tabulate import tabulate

from harness.spec import RunSpec
from harness.store import RunStore
from harness.suite import Suite
from harness.tune import Tuner, replay, tune
from harness.tune_report import format_values

log = logging.getLogger("topk_bench")


def plan_rows(suite: Suite, store: RunStore, tuners: list[Tuner]) -> tuple[list[list], list[list]]:
    """(trial rows, final-run rows) for the dry-run listing."""
    plan = suite.tune
    trial_rows, final_rows = [], []
    for tuner in tuners:
        label = tuner.group.label
        if not tuner.group.dims:
            trial_rows.append([label, "—", "nothing to tune (no search space)", "", "", ""])
        for trial in tuner.trials:
            for spec in trial.specs:
                trial_rows.append([label, trial.number, format_values(trial.values), spec.seed, spec.run_id,
                                   store.status(spec.run_id)])
        pending = tuner.pending()
        if pending is not None:
            for spec in pending.specs:
                trial_rows.append([label, pending.number, format_values(pending.values), spec.seed, spec.run_id,
                                   f"next: {store.status(spec.run_id)}"])
            left = tuner.budget - len(tuner.trials) - 1
            if left:
                trial_rows.append([label, "…", f"to propose: {left}", "", "", ""])
        finals = tuner.finals()
        if finals:
            best = tuner.best()
            for spec in finals:
                final_rows.append([label, format_values(best.values), spec.seed, spec.run_id,
                                   store.status(spec.run_id)])
        elif tuner.complete:
            final_rows.append([label, "no trial finished: nothing to select", "", "", ""])
        else:
            final_rows.append([label, f"to select after {tuner.budget - len(tuner.trials)} more trials",
                               ", ".join(map(str, plan.final_seeds)), "", ""])
    return trial_rows, final_rows


def dry_run(suite: Suite, store: RunStore) -> int:
    plan = suite.tune
    trial_rows, final_rows = plan_rows(suite, store, replay(plan, store.load))
    print(f"{suite.name}: tuning {len(plan.groups)} rows, {plan.budget} trials each ({plan.sampler}, seeds "
          f"{plan.seeds}), selecting on validation {plan.metric} ({plan.direction})\n")
    print("Trials:")
    print(tabulate(trial_rows, headers=["row", "trial", "hyperparameters", "seed", "run_id", "status"],
                   tablefmt="simple"))
    print("\nSelected configurations on every seed:")
    print(tabulate(final_rows, headers=["row", "hyperparameters", "seed", "run_id", "status"], tablefmt="simple"))
    counts = Counter(r[-1] for r in trial_rows + final_rows if r[-1])
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.most_common()))
    return 0


def run(args: argparse.Namespace, suite: Suite, store: RunStore) -> int:
    """Tune, run the selected configurations, write the report; exit 1 when a selected run failed."""
    from harness.executors import EXECUTORS
    from harness.report import write_report

    if args.dry_run:
        return dry_run(suite, store)
    resources = suite.model.resources
    device = args.device or resources.device
    executor = EXECUTORS[args.executor or resources.executor]
    store.check_writable()
    store.sweep_temp_files()
    outcomes: Counter = Counter()
    forced: set[str] = set()

    def execute(specs: list[RunSpec]) -> set[str]:
        """Run the specs; return the ids another runner holds (the tuner waits for those)."""
        if args.force:  # recompute each run once per invocation
            specs = [s for s in specs if s.run_id not in forced]
            forced.update(s.run_id for s in specs)
            for spec in specs:
                for ckpt in store.checkpoints_dir.glob(f"{spec.run_id}.*"):
                    ckpt.unlink(missing_ok=True)
        claimed = set()
        results = executor(specs, store.results_root, suite.name, device, resources.timeout_min,
                           workers=args.workers or resources.workers, slurm=resources.slurm, force=args.force)
        try:
            for result in results:
                status = result["status"] if result.get("computed", True) or result["status"] == "claimed" \
                    else "skipped"
                outcomes[status] += 1
                if status == "claimed":
                    claimed.add(result["run_id"])
                log.info("%s %s%s", result["run_id"], status, f" ({result['error']})" if result.get("error") else "")
        finally:
            results.close()
        return claimed

    load = (lambda run_id: None if args.force and run_id not in forced else store.load(run_id))
    tuners = tune(suite.tune, load, execute)
    report = write_report(suite, store, tuners)
    finals = [s for t in tuners for s in t.finals()]
    not_done = [s for s in finals if store.status(s.run_id) != "done"]
    unselected = [t.group.label for t in tuners if t.best() is None]
    computed = sum(n for s, n in outcomes.items() if s not in ("skipped", "claimed"))
    print(f"{suite.name}: {computed} runs computed ({dict(outcomes) or 'none'}); "
          f"{len(finals) - len(not_done)}/{len(finals)} selected runs done"
          + (f"; no configuration selected for {', '.join(unselected)}" if unselected else "")
          + f". Report: {report}")
    return 1 if not_done or unselected else 0
