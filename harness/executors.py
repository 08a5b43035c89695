"""Where runs execute: inline (in this process), local (process pool with GPU slots), slurm.

Workers write their own records, so a dead front end loses nothing that finished.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Iterator

from harness.spec import RunSpec
from harness.store import RunStore

log = logging.getLogger(__name__)


def execute(spec_dict: dict, results_dir: str, suite: str, device: str, timeout_min: float) -> dict:
    """Picklable entry point: run one spec and return a short summary of its record."""
    from harness.train import run_one  # imported in the worker

    record = run_one(RunSpec.from_dict(spec_dict), RunStore(Path(results_dir), suite), device, timeout_min)
    return {"run_id": record["run_id"], "status": record["status"], "error": record.get("error")}


def _init_worker(slots: "mp.Queue[str]") -> None:
    """Pin each pool worker to one GPU (round-robin slots) before torch initialises CUDA."""
    slot = slots.get()
    if slot:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_inline(jobs: list[RunSpec], results_dir: Path, suite: str, device: str, timeout_min: float,
               **_: object) -> Iterator[dict]:
    for spec in jobs:
        yield execute(spec.to_dict(), str(results_dir), suite, device, timeout_min)


def run_local(jobs: list[RunSpec], results_dir: Path, suite: str, device: str, timeout_min: float,
              workers: int = 1, **_: object) -> Iterator[dict]:
    """A spawn-based process pool; with GPUs, worker i sees only GPU i mod #GPUs."""
    ctx = mp.get_context("spawn")
    gpus = _gpu_count() if device in ("auto", "cuda") else 0
    slots: mp.Queue = ctx.Queue()
    for i in range(workers):
        slots.put(str(i % gpus) if gpus else "")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(slots,)) as pool:
        futures = [pool.submit(execute, s.to_dict(), str(results_dir), suite, device, timeout_min) for s in jobs]
        for fut in as_completed(futures):
            yield fut.result()


def run_slurm(jobs: list[RunSpec], results_dir: Path, suite: str, device: str, timeout_min: float,
              slurm: dict | None = None, **_: object) -> Iterator[dict]:
    """One Slurm array job per suite through submitit; results are the records the jobs write."""
    import submitit

    params = dict(slurm or {})
    cluster = params.pop("cluster", None)  # "debug" runs in-process (tests), "local" as subprocesses
    executor = submitit.AutoExecutor(folder=Path(results_dir) / suite / "slurm" / "%j", cluster=cluster)
    executor.update_parameters(timeout_min=int(timeout_min) + 5, **params)
    n = len(jobs)
    submitted = executor.map_array(
        execute, [s.to_dict() for s in jobs], [str(results_dir)] * n, [suite] * n, [device] * n, [timeout_min] * n
    )
    log.info("submitted %d Slurm jobs (first id %s)", n, submitted[0].job_id if submitted else "-")
    for job in submitted:
        yield job.result()


EXECUTORS: dict[str, Callable[..., Iterator[dict]]] = {
    "inline": run_inline, "local": run_local, "slurm": run_slurm,
}
