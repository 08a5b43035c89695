"""Claims: concurrent runners (two shells, a local pool, Slurm array tasks on a shared filesystem)
split a suite's work instead of computing every run twice.

A worker claims a run before computing it by creating `<root>/claims/<run_id>.claim` exclusively
(`O_CREAT | O_EXCL`, atomic on local filesystems and NFSv3+). The claim holds the owner's id, host
and pid; a heartbeat thread touches it every `HEARTBEAT_SECONDS`. A claim is *live* while its
heartbeat is fresh and, on the same host, its process exists; a dead claim is taken over by renaming
it away (only one of several contenders' renames succeeds) and claiming afresh. Two takers can race
only in the narrow window between a rename and the next claim; the worst outcome is one run
computed twice, which its atomic, deterministic record tolerates.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from harness.store import file_mode

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0  # a claim whose heartbeat is older than this is dead, wherever its owner ran


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class ClaimInfo:
    owner: str
    host: str
    pid: int
    heartbeat_age: float

    def live(self, stale_seconds: float = STALE_SECONDS) -> bool:
        if self.heartbeat_age > stale_seconds:
            return False
        if self.host == socket.gethostname():
            return _pid_alive(self.pid)
        return True

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}, heartbeat {self.heartbeat_age:.0f} s ago"


def read_claim(path: Path) -> ClaimInfo | None:
    """The claim at `path`, None when absent; an unreadable claim counts as dead."""
    try:
        stat = path.stat()
        data = json.loads(path.read_text())
        return ClaimInfo(str(data["owner"]), str(data["host"]), int(data["pid"]), time.time() - stat.st_mtime)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        with contextlib.suppress(OSError):
            return ClaimInfo("?", "?", -1, time.time() - path.stat().st_mtime + STALE_SECONDS * 10)
        return None


class Claims:
    """Claim files of one results root."""

    def __init__(self, claims_dir: Path, stale_seconds: float = STALE_SECONDS) -> None:
        self.dir = Path(claims_dir)
        self.stale_seconds = stale_seconds

    def path(self, run_id: str) -> Path:
        return self.dir / f"{run_id}.claim"

    def holder(self, run_id: str) -> ClaimInfo | None:
        """The live claim on `run_id`, if any."""
        info = read_claim(self.path(run_id))
        return info if info is not None and info.live(self.stale_seconds) else None

    def try_claim(self, run_id: str) -> str | None:
        """Claim `run_id`; returns the owner id, or None when a live owner holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(run_id)
        for _ in range(3):
            owner = uuid.uuid4().hex
            body = json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                               "claimed": time.time()})
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
            except FileExistsError:
                info = read_claim(path)
                if info is not None and info.live(self.stale_seconds):
                    return None
                self._take_over(path, info)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
            return owner
        return None

    def _take_over(self, path: Path, info: ClaimInfo | None) -> None:
        tomb = path.with_name(f".{path.name}.{uuid.uuid4().hex}.dead")
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, tomb)  # only one contender's rename finds the file
            log.info("taking over the dead claim on %s (%s)", path.stem, info.describe() if info else "unreadable")
            tomb.unlink(missing_ok=True)

    def owns(self, run_id: str, owner: str) -> bool:
        try:
            return json.loads(self.path(run_id).read_text()).get("owner") == owner
        except (OSError, ValueError, AttributeError):
            return False

    def release(self, run_id: str, owner: str) -> None:
        """Remove the claim if `owner` still holds it."""
        if self.owns(run_id, owner):
            self.path(run_id).unlink(missing_ok=True)

    def heartbeat(self, run_id: str) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.path(run_id))

    @contextlib.contextmanager
    def held(self, run_id: str) -> Iterator[str | None]:
        """Claim `run_id` for the duration of the block (yields None when someone else holds it)."""
        owner = self.try_claim(run_id)
        if owner is None:
            yield None
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(min(HEARTBEAT_SECONDS, self.stale_seconds / 4)):
                self.heartbeat(run_id)

        thread = threading.Thread(target=beat, name=f"claim-{run_id}", daemon=True)
        thread.start()
        try:
            yield owner
        finally:
            stop.set()
            thread.join(timeout=5)
            self.release(run_id, owner)
