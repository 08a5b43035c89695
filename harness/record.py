"""The run record: its schema, version and validation.

A record is one JSON file, `<results root>/runs/<run_id>.json`, written once by the worker that
computed the run. Everything read back is untrusted: `validate_record` accepts a record only when
its file name equals its `run_id`, that id equals the hash of its spec, its status is known and
its metrics are in range (accuracies in [0, 1], finite non-negative timings). Records of an older
schema are upgraded in memory when that is lossless, and told apart from corrupt ones otherwise.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from harness.spec import RunSpec

SCHEMA_VERSION = 2


class Status(str, Enum):
    """How a run ended. Only `done` records feed leaderboards; the others are retried."""

    DONE = "done"
    FAILED = "failed"
    NAN = "nan"
    OOM = "oom"
    TIMEOUT = "timeout"


STATUSES = tuple(s.value for s in Status)


class SplitMetrics(BaseModel):
    """Metrics of one split at one epoch: top{k}, macro_top{k} in [0, 1], k99 ≥ 1."""

    model_config = ConfigDict(extra="allow")
    k99: int = Field(ge=1)

    def model_post_init(self, _context: Any) -> None:
        for key, value in (self.model_extra or {}).items():
            if not (key.startswith("top") or key.startswith("macro_top")):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"{key} is not a number")
            if not (0.0 <= value <= 1.0) and not (key.startswith("macro") and math.isnan(value)):
                raise ValueError(f"{key}={value!r} is outside [0, 1]")


class Selected(BaseModel):
    model_config = ConfigDict(extra="forbid")
    last: SplitMetrics
    best_val: SplitMetrics


class ValSelected(BaseModel):
    model_config = ConfigDict(extra="forbid")
    last: SplitMetrics
    best: SplitMetrics


def _check_curve(curve: list[float]) -> list[float]:
    if any(not (0.0 <= float(a) <= 1.0) for a in curve):
        raise ValueError("a top-k curve value is outside [0, 1]")
    return curve


class Metrics(BaseModel):
    """Test metrics at the last epoch and at the best validation epoch (per metric), val metrics."""

    model_config = ConfigDict(extra="allow")
    test: Selected
    val: ValSelected | None = None
    best_val_epoch: dict[str, int] = Field(default_factory=dict)
    last_epoch: int | None = Field(None, ge=0)
    curve_test_last: list[float] = Field(default_factory=list)
    curve_test_best_val: list[float] = Field(default_factory=list)

    @field_validator("curve_test_last", "curve_test_best_val")
    @classmethod
    def _curves(cls, curve: list[float]) -> list[float]:
        return _check_curve(curve)


class Timing(BaseModel):
    """A timed quantity: median, interquartile range, sample count, and whether to trust it."""

    model_config = ConfigDict(extra="forbid")
    median_ms: float = Field(ge=0, allow_inf_nan=False)
    q25_ms: float = Field(ge=0, allow_inf_nan=False)
    q75_ms: float = Field(ge=0, allow_inf_nan=False)
    samples: int = Field(ge=0)
    reliable: bool
    note: str = ""


class Record(BaseModel):
    """One run record (schema version 2)."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = SCHEMA_VERSION
    run_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    spec: dict
    status: Status
    error: str | None = None
    started: str | None = None
    finished: str | None = None
    wall_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    environment: dict = Field(default_factory=dict)
    provenance: dict = Field(default_factory=dict)
    data_info: dict = Field(default_factory=dict)
    metrics: Metrics | None = None
    timings: dict[str, Any] = Field(default_factory=dict)
    peak_memory_mb: float | None = Field(None, ge=0, allow_inf_nan=False)
    peak_memory_kind: str | None = None

    @field_validator("timings")
    @classmethod
    def _timings(cls, timings: dict[str, Any]) -> dict[str, Any]:
        for key, value in timings.items():
            if isinstance(value, dict):
                Timing.model_validate(value)
            elif isinstance(value, bool) or value is None:
                continue
            elif not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"timings.{key}={value!r} is not a finite non-negative number")
        return timings


class RecordProblem(ValueError):
    """Why a file in the run pool is not a usable record (one line)."""


def upgrade(data: dict) -> dict:
    """A record of schema 1 (no `schema_version`) as schema 2; the numbers are unchanged."""
    if "schema_version" in data:
        return data
    out = dict(data, schema_version=SCHEMA_VERSION)
    out.setdefault("provenance", {})
    return out


def validate_record(data: Any, file_stem: str) -> dict:
    """The record as a plain dict when it can be trusted, else RecordProblem saying why."""
    if not isinstance(data, dict):
        raise RecordProblem(f"not a JSON object (a {type(data).__name__})")
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise RecordProblem(f"schema_version {version!r} is not an integer")
    if version > SCHEMA_VERSION:
        raise RecordProblem(f"written by a newer topk-bench (schema {version} > {SCHEMA_VERSION})")
    data = upgrade(data)
    try:
        record = Record.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "record"
        raise RecordProblem(f"{where}: {err['msg']}") from None
    if record.run_id != file_stem:
        raise RecordProblem(f"file name {file_stem}.json does not match its run_id {record.run_id}")
    try:
        spec_id = RunSpec.from_dict(record.spec).run_id
    except (KeyError, TypeError, ValueError) as exc:
        raise RecordProblem(f"spec is malformed ({type(exc).__name__}: {exc})") from None
    if spec_id != record.run_id:
        raise RecordProblem(f"run_id {record.run_id} is not the hash of its spec ({spec_id})")
    if record.status is Status.DONE and record.metrics is None:
        raise RecordProblem("status done but no metrics")
    return data
