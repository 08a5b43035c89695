"""The run pool: one content-addressed folder of records per results root, suites as views on it.

    <root>/runs/<run_id>.json       one record per run, written once (temp file, fsync, os.replace)
    <root>/claims/<run_id>.claim    who is computing a run now (see harness.claims)
    <root>/checkpoints/<run_id>.*   per-epoch checkpoints of runs that ask for them
    <root>/<suite>/                 a suite's view: report.md, leaderboards, plots

The same run in two suites is one record. Nothing read from the pool is trusted: a file counts as
a record only when `harness.record.validate_record` accepts it; anything else is skipped with one
warning naming it, listed by `problems()`, and its run is recomputed.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import ResultsError
from harness.record import RecordProblem, validate_record

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

RESERVED = ("runs", "claims", "checkpoints", "quarantine")
TEMP_SUFFIX = ".partial"  # never *.json, so no reader mistakes a half-written file for a record
STALE_TEMP_SECONDS = 600.0


def default_results_dir() -> Path:
    return Path(os.environ.get("TOPK_BENCH_RESULTS", "results"))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode for files the harness writes: rw for everyone the umask lets read (as `open` would)."""
    return 0o666 & ~_umask()


def atomic_write_text(target: Path, text: str) -> None:
    """Write `text` to `target` atomically: temp file in the same folder, fsync, os.replace."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{socket.gethostname()}.{os.getpid()}{TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, file_mode())
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def confined(root: Path, name: str, what: str) -> Path:
    """`root / name`, refused unless it resolves to a folder strictly inside `root`."""
    base = root.resolve()
    path = (root / name).resolve()
    if path == base or base not in path.parents or name in RESERVED or name.startswith("."):
        raise ResultsError(f"{what} '{name}' would write outside its own folder of the results root {root} "
                           f"(use a plain name; reserved: {', '.join(RESERVED)})")
    return path


class RunStore:
    """The run pool under `results_dir` seen through one suite (`suite` names its report folder)."""

    def __init__(self, results_dir: Path, suite: str) -> None:
        self.results_root = Path(results_dir)
        self.root = confined(self.results_root, suite, "suite")  # the suite's view: report, plots
        self.runs_dir = self.results_root / "runs"
        self.claims_dir = self.results_root / "claims"
        self.checkpoints_dir = self.results_root / "checkpoints"
        self._problems: dict[str, str] = {}

    # ---- checks --------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Refuse, before any run starts, a results root that cannot hold records."""
        for folder in (self.results_root, self.runs_dir, self.claims_dir, self.root):
            if folder.exists() and not folder.is_dir():
                raise ResultsError(f"results: {folder} exists and is not a folder")
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ResultsError(f"results: cannot create {folder}: {exc.strerror or exc}") from None
            probe = folder / f".probe.{socket.gethostname()}.{os.getpid()}{TEMP_SUFFIX}"
            try:
                probe.write_text("")
                probe.unlink()
            except OSError as exc:
                raise ResultsError(f"results: cannot write in {folder}: {exc.strerror or exc}") from None

    def sweep_temp_files(self, older_than: float = STALE_TEMP_SECONDS) -> int:
        """Remove temp files that a killed writer left behind; returns how many."""
        removed = 0
        now = time.time()
        for folder in (self.runs_dir, self.claims_dir):
            if not folder.is_dir():
                continue
            for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
                try:
                    if now - tmp.stat().st_mtime > older_than:
                        tmp.unlink()
                        removed += 1
                except OSError:
                    continue
        return removed

    # ---- records -------------------------------------------------------------------------
    def path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.json"

    def load(self, run_id: str) -> dict | None:
        """The record of `run_id`, or None when absent or not a valid record (noted in problems())."""
        path = self.path(run_id)
        try:
            if not path.is_file():
                if path.exists():
                    raise RecordProblem("not a regular file")
                return None
            data = json.loads(path.read_bytes())
            record = validate_record(data, run_id)
        except (OSError, ValueError, RecursionError) as exc:
            problem = exc if isinstance(exc, RecordProblem) else f"unreadable ({type(exc).__name__})"
            self._note(run_id, str(problem))
            return None
        self._problems.pop(run_id, None)
        return record

    def _note(self, run_id: str, problem: str) -> None:
        if self._problems.get(run_id) != problem:
            log.warning("ignoring %s: %s", self.path(run_id), problem)
        self._problems[run_id] = problem

    def problems(self) -> dict[str, str]:
        """run_id -> why its file in the pool was ignored (for the runs looked up so far)."""
        return dict(self._problems)

    def status(self, run_id: str) -> str:
        record = self.load(run_id)
        if record is None:
            return "invalid" if run_id in self._problems else "missing"
        return record["status"]

    def write(self, record: dict) -> Path:
        """Write a record atomically (readable as the umask allows)."""
        target = self.path(record["run_id"])
        atomic_write_text(target, json.dumps(record, indent=1, sort_keys=True, allow_nan=True))
        self._problems.pop(record["run_id"], None)
        return target

    def records_for(self, run_ids: list[str]) -> dict[str, dict]:
        """Valid records of these runs, by run id."""
        out = {}
        for run_id in run_ids:
            record = self.load(run_id)
            if record is not None:
                out[run_id] = record
        return out

    def records(self) -> list[dict]:
        """Every valid record in the pool (files that fail validation are skipped)."""
        if not self.runs_dir.is_dir():
            return []
        return list(self.records_for(sorted(p.stem for p in self.runs_dir.glob("*.json"))).values())


def flatten(record: dict) -> dict:
    """One table row per record: spec labels, status, selected metrics and timings (numbers only)."""
    spec = record["spec"]
    row = {"run_id": record["run_id"], "status": record["status"], "seed": spec["seed"]}
    for part in ("loss", "dataset", "model"):
        row[part] = spec[part]["name"]
        row[f"{part}_params"] = json.dumps(spec[part]["params"], sort_keys=True)
    metrics = record.get("metrics") or {}
    for selection in ("best_val", "last"):
        for key, value in (metrics.get("test", {}).get(selection) or {}).items():
            row[f"test_{selection}_{key}"] = value
    for key, value in (record.get("timings") or {}).items():
        if isinstance(value, dict):
            row.update({f"{key}_{field}": v for field, v in value.items() if field != "note"})
        else:
            row[key] = value
    row["peak_memory_mb"] = record.get("peak_memory_mb")
    return row


def collect(records: list[dict]) -> "pd.DataFrame":
    import pandas as pd

    return pd.DataFrame([flatten(r) for r in records])
