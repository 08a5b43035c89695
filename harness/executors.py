"""Where runs execute: inline (in this process), local (worker processes with GPU slots), slurm.

Every executor goes through `execute`, which claims a run before computing it (so concurrent
runners split a suite) and skips runs that are done or claimed by a live owner. Workers write their
own records, so a dead front end loses nothing that finished. Every executor enforces a hard time
limit of `hard_limit_seconds(timeout_min)` per run and records `timeout` when it strikes: inline
with SIGALRM, local by killing the worker, Slurm through the job's time limit.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from harness.claims import Claims, read_claim
from harness.spec import RunSpec
from harness.store import RunStore

log = logging.getLogger(__name__)


def hard_limit_seconds(timeout_min: float) -> float:
    """The wall-clock limit after which a run is stopped from outside: budget + max(5 s, 10 %)."""
    budget = timeout_min * 60
    return budget + max(5.0, 0.1 * budget)


def execute(spec_dict: dict, results_dir: str, suite: str, device: str, timeout_min: float,
            force: bool = False) -> dict:
    """Claim, run and record one spec; returns a short summary (`status` `claimed` when someone else has it)."""
    from harness.train import run_one  # imported in the worker

    spec = RunSpec.from_dict(spec_dict)
    store = RunStore(Path(results_dir), suite)
    summary = {"run_id": spec.run_id, "label": spec.loss.label(), "seed": spec.seed}
    if not force and store.status(spec.run_id) == "done":
        return {**summary, "status": "done", "error": None, "computed": False}
    with Claims(store.claims_dir).held(spec.run_id) as owner:
        if owner is None:
            holder = Claims(store.claims_dir).holder(spec.run_id)
            return {**summary, "status": "claimed", "computed": False,
                    "error": f"being computed by {holder.describe() if holder else 'another runner'}"}
        if not force and store.status(spec.run_id) == "done":  # finished by another runner meanwhile
            return {**summary, "status": "done", "error": None, "computed": False}
        record = run_one(spec, store, device, timeout_min)
    return {**summary, "status": record["status"], "error": record.get("error"), "computed": True}


def write_stopped_record(spec: RunSpec, results_dir: Path, suite: str, status: str, error: str) -> dict:
    """A record for a run stopped from outside (hard limit, crashed worker), unless one was written."""
    from harness.train import new_record

    store = RunStore(results_dir, suite)
    if store.status(spec.run_id) == "done":
        return {"run_id": spec.run_id, "status": "done", "error": None, "computed": True}
    record = new_record(spec, status, error)
    store.write(record)
    return {"run_id": spec.run_id, "label": spec.loss.label(), "seed": spec.seed, "status": status,
            "error": error, "computed": True}


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise RunTimeout in this (main) thread after `seconds`; a no-op off the main thread."""
    from harness.train import RunTimeout

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum: int, frame: object) -> None:
        raise RunTimeout(f"hard time limit of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_inline(jobs: list[RunSpec], results_dir: Path, suite: str, device: str, timeout_min: float,
               force: bool = False, **_: object) -> Iterator[dict]:
    for spec in jobs:
        with _alarm(hard_limit_seconds(timeout_min)):
            result = execute(spec.to_dict(), str(results_dir), suite, device, timeout_min, force)
        yield result


# ---------------------------------------------------------------------------------- local
def _die_with_parent(parent_pid: int) -> None:
    """Exit when the front end dies: PR_SET_PDEATHSIG on Linux, and a watchdog thread everywhere."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _worker_loop(conn: "mp.connection.Connection", gpu_slot: str, parent_pid: int) -> None:
    """A local worker: receive (spec, …) tuples, run them, send summaries; None ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front end's to handle
    _die_with_parent(parent_pid)
    if gpu_slot:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_slot
    logging.basicConfig(level=logging.WARNING)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        conn.send(execute(*job))


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: "mp.connection.Connection"
    slot: str
    job: RunSpec | None = None
    started: float = 0.0


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _release_claim_of(results_dir: Path, run_id: str, pid: int | None) -> None:
    """Remove the claim a killed worker (`pid`) held on `run_id`."""
    path = Claims(Path(results_dir) / "claims").path(run_id)
    info = read_claim(path)
    if info is not None and (pid is None or info.pid == pid):
        path.unlink(missing_ok=True)


def run_local(jobs: list[RunSpec], results_dir: Path, suite: str, device: str, timeout_min: float,
              workers: int = 1, force: bool = False, **_: object) -> Iterator[dict]:
    """`workers` spawned processes; with GPUs, worker i sees only GPU i mod #GPUs.

    A worker past the hard limit is killed (its run recorded `timeout`) and replaced; a worker that
    dies is recorded `failed` and replaced. Workers exit when the front end dies (PR_SET_PDEATHSIG and
    a watchdog), and on Ctrl-C or any exit of the front end they are stopped and the runs they had
    in hand are left unrecorded, to be recomputed.
    """
    ctx = mp.get_context("spawn")
    gpus = _gpu_count() if device in ("auto", "cuda") else 0
    limit = hard_limit_seconds(timeout_min)
    pool: list[_Worker] = []

    def start(slot: str) -> _Worker:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_worker_loop, args=(child, slot, os.getpid()), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent, slot)

    def stop(worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=10)
        if worker.job is not None:
            _release_claim_of(results_dir, worker.job.run_id, worker.process.pid)
        worker.conn.close()

    pending = deque(jobs)
    try:
        pool = [start(str(i % gpus) if gpus else "") for i in range(max(1, min(workers, len(jobs))))]
        while pending or any(w.job for w in pool):
            for w in pool:
                if w.job is None and pending:
                    w.job, w.started = pending.popleft(), time.monotonic()
                    w.conn.send((w.job.to_dict(), str(results_dir), suite, device, timeout_min, force))
            busy = [w for w in pool if w.job is not None]
            mp.connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy], timeout=1.0)
            for i, w in enumerate(pool):
                if w.job is None:
                    continue
                if w.conn.poll():
                    try:
                        result = w.conn.recv()
                    except EOFError:
                        result = None
                    if result is not None:
                        w.job = None
                        yield result
                        continue
                overdue = time.monotonic() - w.started > limit
                if w.process.is_alive() and not overdue:
                    continue
                spec = w.job
                status, error = (("timeout", f"hard time limit of {limit:.0f} s reached; worker killed") if overdue
                                 else ("failed", f"worker died (exit code {w.process.exitcode})"))
                w.job = None
                _release_claim_of(results_dir, spec.run_id, w.process.pid)
                stop(w)
                pool[i] = start(w.slot)
                yield write_stopped_record(spec, Path(results_dir), suite, status, error)
    finally:
        for w in pool:
            with contextlib.suppress(OSError, ValueError):
                if w.job is None and w.process.is_alive():
                    w.conn.send(None)
            stop(w)


# ---------------------------------------------------------------------------------- slurm
def run_slurm(jobs: list[RunSpec], results_dir: Path, suite: str, device: str, timeout_min: float,
              slurm: dict | None = None, force: bool = False, **_: object) -> Iterator[dict]:
    """One Slurm array job per suite through submitit; results are the records the jobs write.

    Array tasks claim runs like any runner, so several arrays (or shells) on a shared filesystem
    split the work. The job's time limit is the hard limit; a task Slurm stops is recorded `timeout`.
    """
    import submitit

    params = dict(slurm or {})
    cluster = params.pop("cluster", None)  # "debug" runs in-process (tests), "local" as subprocesses
    executor = submitit.AutoExecutor(folder=Path(results_dir) / "slurm" / "%j", cluster=cluster)
    executor.update_parameters(timeout_min=max(1, round(hard_limit_seconds(timeout_min) / 60)), **params)
    n = len(jobs)
    submitted = executor.map_array(
        execute, [s.to_dict() for s in jobs], [str(results_dir)] * n, [suite] * n, [device] * n,
        [timeout_min] * n, [force] * n,
    )
    log.info("submitted %d Slurm jobs (first id %s)", n, submitted[0].job_id if submitted else "-")
    for spec, job in zip(jobs, submitted):
        try:
            yield job.result()
        except Exception as exc:  # submitit's UncompletedJobError and friends: the task never wrote a record
            state = str(getattr(job, "state", ""))
            status = "timeout" if "TIMEOUT" in state.upper() else "failed"
            yield write_stopped_record(spec, Path(results_dir), suite, status, f"Slurm job {job.job_id}: {exc}")


EXECUTORS: dict[str, Callable[..., Iterator[dict]]] = {
    "inline": run_inline, "local": run_local, "slurm": run_slurm,
}
