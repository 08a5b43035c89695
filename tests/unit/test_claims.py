"""Claims: exclusive, live ones block, dead ones (process gone, stale heartbeat) are taken over."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from harness.claims import Claims


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(claims: Claims, run_id: str, pid: int, host: str | None = None, age: float = 0.0) -> None:
    claims.dir.mkdir(parents=True, exist_ok=True)
    path = claims.path(run_id)
    path.write_text(json.dumps({"owner": "someone", "host": host or socket.gethostname(), "pid": pid}))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))


def test_a_claim_is_exclusive_and_released_by_its_owner_only(tmp_path):
    claims = Claims(tmp_path)
    owner = claims.try_claim("a" * 16)
    assert owner and claims.try_claim("a" * 16) is None
    claims.release("a" * 16, "not-the-owner")
    assert claims.path("a" * 16).exists()
    claims.release("a" * 16, owner)
    assert not claims.path("a" * 16).exists()


def test_claim_of_a_dead_process_is_taken_over(tmp_path):
    claims = Claims(tmp_path)
    _plant(claims, "b" * 16, _dead_pid())
    assert claims.holder("b" * 16) is None
    assert claims.try_claim("b" * 16) is not None


def test_claim_with_a_stale_heartbeat_is_taken_over_even_from_another_host(tmp_path):
    claims = Claims(tmp_path, stale_seconds=60)
    _plant(claims, "c" * 16, 1, host="elsewhere", age=30)
    assert claims.try_claim("c" * 16) is None  # fresh enough: the other host is alive
    _plant(claims, "c" * 16, 1, host="elsewhere", age=120)
    assert claims.try_claim("c" * 16) is not None


def test_unreadable_claim_counts_as_dead(tmp_path):
    claims = Claims(tmp_path)
    claims.dir.mkdir(parents=True, exist_ok=True)
    claims.path("d" * 16).write_bytes(b"\x00garbage")
    assert claims.try_claim("d" * 16) is not None


def test_held_heartbeats_and_releases(tmp_path):
    claims = Claims(tmp_path, stale_seconds=0.2)
    with claims.held("e" * 16) as owner:
        assert owner is not None
        before = claims.path("e" * 16).stat().st_mtime
        time.sleep(0.3)
        assert claims.path("e" * 16).stat().st_mtime > before  # the heartbeat touched it
        assert claims.holder("e" * 16) is not None
    assert not claims.path("e" * 16).exists()
