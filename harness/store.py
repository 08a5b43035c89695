"""Per-run JSON records: atomic write-once files, status lookup, collection into a table."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

STATUSES = ("done", "failed", "nan", "oom", "timeout")


def default_results_dir() -> Path:
    return Path(os.environ.get("TOPK_BENCH_RESULTS", "results"))


class RunStore:
    """`<results>/<suite>/runs/<run_id>.json`; a record is replaced only atomically."""

    def __init__(self, results_dir: Path, suite: str) -> None:
        self.root = Path(results_dir) / suite
        self.runs_dir = self.root / "runs"
        self.checkpoints_dir = self.root / "checkpoints"

    def path(self, run_id: str) -> Path:
        return self.runs_dir / f"{run_id}.json"

    def load(self, run_id: str) -> dict | None:
        """The record, or None when absent or unreadable (a torn file counts as missing)."""
        try:
            return json.loads(self.path(run_id).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def status(self, run_id: str) -> str:
        record = self.load(run_id)
        return record["status"] if record else "missing"

    def write(self, record: dict) -> Path:
        """Write to a temp file in the same folder, fsync, then os.replace (atomic on POSIX)."""
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        target = self.path(record["run_id"])
        fd, tmp = tempfile.mkstemp(dir=self.runs_dir, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh, indent=1, sort_keys=True, allow_nan=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def records(self) -> list[dict]:
        if not self.runs_dir.is_dir():
            return []
        out = []
        for p in sorted(self.runs_dir.glob("*.json")):
            if p.name.startswith("."):  # a temp file a killed writer left behind
                continue
            rec = self.load(p.stem)
            if rec is not None:
                out.append(rec)
        return out


def flatten(record: dict) -> dict:
    """One table row per record: spec labels, status, selected metrics and timings."""
    spec = record["spec"]
    row = {
        "run_id": record["run_id"],
        "status": record["status"],
        "loss": spec["loss"]["name"],
        "loss_params": json.dumps(spec["loss"]["params"], sort_keys=True),
        "dataset": spec["dataset"]["name"],
        "dataset_params": json.dumps(spec["dataset"]["params"], sort_keys=True),
        "model": spec["model"]["name"],
        "model_params": json.dumps(spec["model"]["params"], sort_keys=True),
        "seed": spec["seed"],
    }
    metrics = record.get("metrics") or {}
    for selection in ("best_val", "last"):
        for key, value in (metrics.get("test", {}).get(selection) or {}).items():
            if not isinstance(value, list):
                row[f"test_{selection}_{key}"] = value
    for key, value in (record.get("timings") or {}).items():
        row[key] = value
    row["peak_memory_mb"] = record.get("peak_memory_mb")
    return row


def collect(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([flatten(r) for r in records])
