"""Record schema: what counts as a record, and how an older schema is told apart from corruption."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from harness.record import SCHEMA_VERSION, RecordProblem, validate_record

COMMITTED = sorted((Path(__file__).parents[2] / "results" / "runs").glob("*.json"))


@pytest.fixture
def record() -> dict:
    return json.loads(COMMITTED[0].read_text())


def test_committed_records_are_valid():
    assert len(COMMITTED) >= 100
    for path in COMMITTED:
        validate_record(json.loads(path.read_text()), path.stem)


def test_schema_1_is_upgraded_not_rejected(record):
    record.pop("schema_version", None)
    out = validate_record(record, record["run_id"])
    assert out["schema_version"] == SCHEMA_VERSION and out["metrics"] == record["metrics"]


def _broken(record: dict, change) -> dict:
    bad = copy.deepcopy(record)
    change(bad)
    return bad


CASES = {
    "no status": (lambda r: r.pop("status"), "status"),
    "unknown status": (lambda r: r.update(status="great"), "status"),
    "no run_id": (lambda r: r.pop("run_id"), "run_id"),
    "accuracy above 1": (lambda r: r["metrics"]["test"]["best_val"].update(top1=1.5), "outside"),
    "negative accuracy": (lambda r: r["metrics"]["test"]["last"].update(top5=-0.1), "outside"),
    "curve above 1": (lambda r: r["metrics"]["curve_test_last"].__setitem__(0, 2.0), "curve"),
    "nan timing": (lambda r: r["timings"].update(loss_vs_ce=float("nan")), "timings"),
    "negative timing": (lambda r: r["timings"].update(median_step_ms=-1.0), "timings"),
    "spec changed": (lambda r: r["spec"].update(seed=r["spec"]["seed"] + 100), "hash of its spec"),
    "newer schema": (lambda r: r.update(schema_version=SCHEMA_VERSION + 1), "newer"),
    "done without metrics": (lambda r: r.pop("metrics"), "no metrics"),
    "bad k99": (lambda r: r["metrics"]["test"]["best_val"].update(k99=0), "k99"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_records_are_refused_with_a_reason(record, case):
    change, words = CASES[case]
    with pytest.raises(RecordProblem, match=words):
        validate_record(_broken(record, change), record["run_id"])


def test_file_name_must_equal_run_id(record):
    with pytest.raises(RecordProblem, match="does not match"):
        validate_record(record, "0" * 16)


@pytest.mark.parametrize("data", [[1, 2], "text", 3, None])
def test_non_objects_are_refused(data):
    with pytest.raises(RecordProblem, match="not a JSON object"):
        validate_record(data, "0" * 16)
