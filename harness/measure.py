"""Timing, peak memory and environment capture."""
from __future__ import annotations

import contextlib
import functools
import io
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
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


UNRELIABLE_SPREAD = 0.5  # interquartile range / median above which a timing is flagged unreliable
MIN_SAMPLES = 5


@dataclass(frozen=True)
class TimingStats:
    """Median and quartiles of repeated timings (ms), and whether they are stable enough to print."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    samples: int
    reliable: bool
    note: str = ""

    @classmethod
    def from_seconds(cls, seconds: list[float], max_spread: float = UNRELIABLE_SPREAD,
                     min_samples: int = MIN_SAMPLES) -> "TimingStats":
        if not seconds:
            return cls(0.0, 0.0, 0.0, 0, False, "no samples")
        ms = sorted(t * 1e3 for t in seconds)
        q25, med, q75 = (statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3)
        spread = (q75 - q25) / med if med > 0 else float("inf")
        notes = []
        if len(ms) < min_samples:
            notes.append(f"only {len(ms)} samples")
        if spread > max_spread:
            notes.append(f"spread (IQR/median) {spread:.2f} > {max_spread}")
        return cls(med, q25, q75, len(ms), not notes, "; ".join(notes))

    @property
    def spread(self) -> float:
        return (self.q75_ms - self.q25_ms) / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        return asdict(self)


def time_interleaved_stats(fns: list[Callable], inputs: list[tuple], device: torch.device, repeats: int = 10,
                           warmup: int = 3, min_seconds: float = 0.0, max_repeats: int = 1000,
                           clock: Callable[[], float] = time.perf_counter) -> list[TimingStats]:
    """Timing statistics of a forward+backward pass of each fn, measured in interleaved rounds.

    Each fn is first warmed up (`warmup` passes). Then each round times every fn once, in a freshly
    shuffled order (fixed seed), so slow drifts of the machine (frequency, other load) and the cache
    state left by the previous pass hit all of them alike and the ratios stay honest. Rounds go on
    until there are `repeats` of them and the timed passes add up to `min_seconds` (at most
    `max_repeats` rounds). `clock` is injectable so tests can feed a noisy one.
    """
    times: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    shuffle = random.Random(0).shuffle
    total = 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        for fn, (scores, labels) in zip(fns, inputs):
            for _ in range(warmup):
                forward_backward(fn, scores, labels)
        rounds = 0
        while rounds < repeats or (total < min_seconds and rounds < max_repeats):
            shuffle(order)
            for i in order:
                synchronize(device)
                start = clock()
                forward_backward(fns[i], *inputs[i])
                synchronize(device)
                elapsed = clock() - start
                times[i].append(elapsed)
                total += elapsed
            rounds += 1
    return [TimingStats.from_seconds(t) for t in times]


def time_interleaved(fns: list[Callable], inputs: list[tuple], device: torch.device, repeats: int,
                     warmup: int) -> list[float]:
    """Median ms of each fn's forward+backward pass (see `time_interleaved_stats`)."""
    return [s.median_ms for s in time_interleaved_stats(fns, inputs, device, repeats, warmup)]


class StepTimer:
    """Per-step wall times of a training loop, batch fetching included: `start()` at the top of an
    epoch, `lap()` after each optimiser step. CUDA events on GPU (no sync per step), a clock on CPU."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> None:
        self.device, self.clock = device, clock
        self.seconds: list[float] = []
        self._pending: list[tuple] = []
        self._last: object = None

    def _mark(self) -> object:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self.clock()

    def start(self) -> None:
        self._last = self._mark()

    def lap(self) -> None:
        now = self._mark()
        if self.device.type == "cuda":
            self._pending.append((self._last, now))
        else:
            self.seconds.append(now - self._last)  # type: ignore[operator]
        self._last = now

    def collect(self) -> list[float]:
        """All step times so far, in seconds (synchronises CUDA once)."""
        if self._pending:
            synchronize(self.device)
            self.seconds += [a.elapsed_time(b) / 1e3 for a, b in self._pending]
            self._pending.clear()
        return self.seconds


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


@functools.lru_cache(maxsize=1)
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
