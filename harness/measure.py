"""Timing, peak memory and environment capture."""
from __future__ import annotations

import contextlib
import io
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(fn: Callable, scores: torch.Tensor, labels: torch.Tensor) -> None:
    """One loss pass: forward on (scores, labels), backward into scores.grad (reset first)."""
    scores.grad = None
    fn(scores, labels).backward()


def time_interleaved(fns: list[Callable], inputs: list[tuple], device: torch.device, repeats: int,
                     warmup: int) -> list[float]:
    """Median ms of a forward+backward pass of each fn, timed in interleaved rounds.

    Each round times every fn once, in a freshly shuffled order (fixed seed), so slow drifts of the
    machine (frequency, other load) and the cache state left by the previous pass hit all of them
    alike and the ratios to the cross-entropy row stay honest.
    """
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    shuffle = random.Random(0).shuffle
    with contextlib.redirect_stdout(io.StringIO()):
        for fn, (scores, labels) in zip(fns, inputs):
            for _ in range(warmup):
                forward_backward(fn, scores, labels)
        for _ in range(repeats):
            shuffle(order)
            for i in order:
                synchronize(device)
                start = time.perf_counter()
                forward_backward(fns[i], *inputs[i])
                synchronize(device)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cap_address_space(limit_gb: float | None) -> float | None:
    """Cap this process's (and its children's) address space at its current size + `limit_gb`.

    None: what is available now (MemAvailable). Returns the cap's headroom in GiB, or None where
    /proc is missing (not Linux: no cap).
    """
    if not Path("/proc/meminfo").is_file():
        return None
    if limit_gb is None:
        meminfo = Path("/proc/meminfo").read_text()
        limit_gb = int(meminfo.split("MemAvailable:")[1].split()[0]) / 2**20
    current = status_kb("VmSize") * 1024
    cap = int(current + limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return limit_gb


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MB, what was measured): CUDA max allocated, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def git_sha() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model (Linux: /proc/cpuinfo) with the number of logical cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} logical cores"


def environment(device: torch.device) -> dict:
    """Where and with what a run was made (recorded beside the spec, never hashed)."""
    from harness import __version__

    return {
        "topk_bench": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "git_sha": git_sha(),
    }


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{requested}' requested but CUDA is not available")
    return device
