"""Loss micro-benchmark: forward+backward time and peak memory of losses vs F.cross_entropy.

Usage (through the main CLI)::

    topk-bench bench-loss --loss 'difftopk:sorter=bitonic,m=16' --loss softmax \
        --classes 100 1000 --batch-size 128 --threads 1 --device cpu --out results/lossbench/cpu.md

A config is ``name`` or ``name:key=value,key=value`` (values parsed with
``yaml.safe_load``; commas inside ``[...]`` are kept, e.g. ``p_k=[0.5,0,0,0,0.5]``).

Timing: median over ``repeats`` forward+backward passes on random scores
(``requires_grad``) after ``warmup`` passes; ``torch.cuda.synchronize`` around each
pass on GPU, ``torch.set_num_threads(threads)`` on CPU.

Peak memory (a separate pass, never overlapping with timing):
  * CUDA: ``torch.cuda.max_memory_allocated`` during one pass minus the memory
    allocated before it (so scores/labels are excluded), after ``reset_peak_memory_stats``.
  * CPU: one pass in a fresh subprocess; reported is its peak RSS during the pass
    minus its RSS just before it.  On Linux the child resets its high-water mark
    (``/proc/self/clear_refs`` <- 5) and reads ``VmHWM``; elsewhere it falls back to
    the growth of ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (0 when setup peaked higher).  Allocator caching makes this an upper
    bound of the pass's working set; small losses may read ~0.

Every class count gets a ``cross_entropy`` row (``F.cross_entropy``); configs with a
reference equivalent in the installed ``difftopk`` package get reference rows too
(``difftopk`` -> ``difftopk.TopKCrossEntropyLoss`` with the same arguments; ``bitonic``
is run both as the reference's sparse ``bitonic`` and its dense ``bitonic__non_sparse``;
``berrada_smooth`` -> ``difftopk.SmoothTopKLoss`` and ``difftopk.SmoothHardTopKLoss``).
A row that cannot run gets a ``status`` (``unavailable``, ``oom`` or the error text).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F

COLUMNS = ["loss", "config", "classes", "batch", "device", "median_ms", "ratio_vs_ce", "peak_mem_mb", "status"]
CE = "cross_entropy"


# ----------------------------------------------------------------------------- configs
def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets/braces/quotes."""
    parts, depth, cur, quote = [], 0, [], None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_config(text: str) -> tuple[str, dict[str, Any]]:
    """'name' or 'name:key=value,key=value' -> (name, params)."""
    import yaml

    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in _split_top(rest):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"bad loss config item {item!r} in {text!r} (expected key=value)")
        params[key.strip()] = yaml.safe_load(value.strip())
    return name.strip(), params


def format_config(name: str, params: dict[str, Any]) -> str:
    if not params:
        return name
    return name + ":" + ",".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
                                 for k, v in params.items())


# ----------------------------------------------------------------------------- reference
def install_torch_sparse_shim() -> None:
    """Provide a pure-torch stand-in for the `torch_sparse.spmm` that difftopk's sparse networks use."""
    shim = types.ModuleType("torch_sparse")

    def spmm(index, value, m, n, matrix):  # out[row] += value * matrix[col]
        out = torch.zeros(m, matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
        return out.index_add(0, index[0], value.unsqueeze(1).to(matrix.dtype) * matrix.index_select(0, index[1]))

    shim.spmm = spmm
    shim.__pure_torch_shim__ = True
    sys.modules.setdefault("torch_sparse", shim)
    mod = sys.modules.get("difftopk.functional")
    if mod is not None and not getattr(mod, "SPARSE_INSTALLED", False):
        mod.torch_sparse = sys.modules["torch_sparse"]
        mod.SPARSE_INSTALLED = True


def import_reference():
    """The reference `difftopk` package (its import prints to stdout), or None."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import difftopk  # noqa: PLC0415
        return difftopk
    except Exception:  # noqa: BLE001
        return None


def reference_specs(name: str, params: dict[str, Any], n: int) -> list[tuple[str, dict[str, Any]]]:
    """[(label, spec)] for the reference equivalents of a config (may be empty)."""
    if name == "difftopk":
        import harness

        ours = harness.build_loss(name, n, **params)
        methods = {"odd_even": ["odd_even"], "bitonic": ["bitonic", "bitonic__non_sparse"],
                   "splitter_selection": ["splitter_selection"], "neuralsort": ["neuralsort"],
                   "softsort": ["softsort"]}.get(ours.sorter, [])
        return [(f"ref:TopKCrossEntropyLoss[{meth}]",
                 {"cls": "TopKCrossEntropyLoss",
                  "kwargs": dict(diffsort_method=meth, inverse_temperature=ours.inverse_temperature,
                                 p_k=list(ours.p_k), n=n, m=ours.m, distribution=ours.distribution,
                                 art_lambda=ours.art_lambda, top1_mode=ours.top1_mode)})
                for meth in methods]
    if name == "berrada_smooth":
        k, tau = params.get("k", 5), params.get("tau", 1.0)
        return [(f"ref:{cls}", {"cls": cls, "kwargs": dict(num_classes=n, k=k, tau=tau)})
                for cls in ("SmoothTopKLoss", "SmoothHardTopKLoss")]
    return []


def _build(kind: str, name: str, params: dict[str, Any], n: int, device: torch.device) -> Callable:
    if kind == "ce":
        return F.cross_entropy
    if kind == "ours":
        import harness
        import losses  # noqa: F401  (registers the built-in losses)

        return harness.build_loss(name, n, **params).to(device)
    ref = import_reference()
    if ref is None:
        raise ModuleNotFoundError("reference package difftopk is not installed")
    kwargs = dict(params["kwargs"])
    with contextlib.redirect_stdout(io.StringIO()):
        return getattr(ref, params["cls"])(device=str(device), **kwargs).to(device)


def _inputs(n: int, batch: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, n, (batch,), generator=g).to(device)
    return scores, labels


def _pass(fn: Callable, scores: torch.Tensor, labels: torch.Tensor) -> None:
    scores.grad = None
    loss = fn(scores, labels)
    loss.backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_of(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:160]
    low = text.lower()
    if isinstance(exc, MemoryError) or "out of memory" in low or "can't allocate memory" in low:
        return "oom"
    if "torch-sparse" in low or "torch_sparse" in low or isinstance(exc, ModuleNotFoundError):
        return "unavailable: " + text
    return "error: " + text


def _time_interleaved(fns: list[Callable], inputs: list[tuple], device, repeats: int, warmup: int) -> list[float]:
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
                _pass(fn, scores, labels)
        for _ in range(repeats):
            shuffle(order)
            for i in order:
                fn, (scores, labels) = fns[i], inputs[i]
                _sync(device)
                t0 = time.perf_counter()
                _pass(fn, scores, labels)
                _sync(device)
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def _cuda_peak_mb(fn: Callable, scores, labels, device) -> float:
    _sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with contextlib.redirect_stdout(io.StringIO()):
        _pass(fn, scores, labels)
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _cpu_peak_mb(spec: dict[str, Any], timeout: float = 600) -> float:
    """Peak-RSS growth of one pass in a fresh subprocess (see module doc)."""
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run(
        [sys.executable, "-c", "from harness.lossbench import _child; _child()", json.dumps(spec)],
        capture_output=True, text=True, timeout=timeout, cwd=root,
        env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    resource.getrusage(resource.RUSAGE_CHILDREN)  # parent-side high-water mark (informational)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOSSBENCH ")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        if proc.returncode < 0 or "memory" in err.lower():
            raise MemoryError(err)
        raise RuntimeError(err)
    out = json.loads(lines[-1][len("LOSSBENCH "):])
    if "error" in out:
        raise RuntimeError(out["error"])
    return out["peak_mb"]


def _child() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("shim"):
        install_torch_sparse_shim()
    device = torch.device("cpu")
    fn = _build(spec["kind"], spec["name"], spec["params"], spec["n"], device)
    scores, labels = _inputs(spec["n"], spec["batch"], device)
    hwm = _linux_reset_hwm()
    before = _linux_status_kb("VmRSS") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with contextlib.redirect_stdout(io.StringIO()):
        _pass(fn, scores, labels)
    after = _linux_status_kb("VmHWM") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 / 2**20 if (sys.platform == "darwin" and not hwm) else 1 / 1024  # bytes on macOS, KiB on Linux
    print("LOSSBENCH " + json.dumps({"peak_mb": max(after - before, 0) * scale}))


def _linux_reset_hwm() -> bool:
    """Reset this process's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _linux_status_kb("VmHWM") > 0
    except OSError:
        return False


def _linux_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# ----------------------------------------------------------------------------- main API
SLOW_PASS_MS = 1000.0  # a pass slower than this is timed alone, with at most 3 repeats


def _jobs(configs: list[tuple[str, dict]], n: int, reference: bool, ref_available: bool,
          torch_sparse_shim: bool) -> list[tuple[str, str, str, dict[str, Any], str | None]]:
    """(row label, config text, kind, build params, fixed status) for one class count, CE first."""
    jobs: list[tuple[str, str, str, dict[str, Any], str | None]] = [(CE, CE, "ce", {}, None)]
    for name, params in configs:
        cfg = format_config(name, params)
        jobs.append((name, cfg, "ours", params, None))
        if not reference:
            continue
        try:
            specs = reference_specs(name, params, n)
        except Exception:  # noqa: BLE001  (our own build error shows on our row)
            specs = []
        for label, spec in specs:
            if not ref_available:
                jobs.append((label, cfg, "ref", {}, "unavailable: difftopk not installed"))
                continue
            if torch_sparse_shim and spec["kwargs"].get("diffsort_method") in ("bitonic", "splitter_selection"):
                label += "(shim)"
            jobs.append((label, cfg, "ref", spec, None))
    return jobs


def _memory_pass(row: dict[str, Any], fn: Callable, inputs: tuple, child: dict[str, Any],
                 device: torch.device) -> None:
    """Peak memory of one pass: CUDA allocator stats here, or peak RSS of a fresh subprocess on CPU."""
    try:
        if device.type == "cuda":
            row["peak_mem_mb"] = _cuda_peak_mb(fn, *inputs, device)
        else:
            row["peak_mem_mb"] = _cpu_peak_mb(child)
    except Exception as exc:  # noqa: BLE001
        row["status"] = "memory pass " + _status_of(exc)


def bench_losses(
    configs: list[tuple[str, dict]],
    classes: list[int],
    batch_size: int,
    device: str,
    threads: int | None,
    repeats: int,
    warmup: int,
    reference: bool = True,
    memory: bool = True,
    torch_sparse_shim: bool = False,
) -> pd.DataFrame:
    """Time forward+backward of each config (and CE, and reference equivalents) per class count.

    ``memory=False`` skips the peak-memory pass (column NaN).  ``torch_sparse_shim``
    installs a pure-torch ``torch_sparse.spmm`` so the reference's sparse networks run
    (their rows are then labelled ``(shim)``).
    """
    dev = torch.device(device)
    if threads and dev.type == "cpu":
        torch.set_num_threads(threads)
    if torch_sparse_shim:
        install_torch_sparse_shim()
    ref_available = reference and import_reference() is not None
    rows: list[dict[str, Any]] = []
    for n in classes:
        timed: list[tuple[dict[str, Any], Callable, tuple, dict[str, Any]]] = []
        for label, cfg, kind, params, fixed in _jobs(configs, n, reference, ref_available, torch_sparse_shim):
            row = {"loss": label, "config": cfg, "classes": n, "batch": batch_size, "device": str(dev),
                   "median_ms": math.nan, "ratio_vs_ce": math.nan, "peak_mem_mb": math.nan, "status": "ok"}
            rows.append(row)
            if fixed:
                row["status"] = fixed
                continue
            child = {"kind": kind, "name": cfg.partition(":")[0], "params": params, "n": n, "batch": batch_size,
                     "threads": threads, "shim": torch_sparse_shim}
            try:
                fn = _build(kind, child["name"], params, n, dev)
                inputs = _inputs(n, batch_size, dev)
                (first,) = _time_interleaved([fn], [inputs], dev, repeats=1, warmup=warmup)
                if first > SLOW_PASS_MS:  # seconds per pass (the reference at full n): time it on its own
                    (row["median_ms"],) = _time_interleaved([fn], [inputs], dev, min(repeats, 3), warmup=0)
            except Exception as exc:  # noqa: BLE001
                row["status"] = _status_of(exc)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if math.isnan(row["median_ms"]):
                timed.append((row, fn, inputs, child))
            elif memory:
                _memory_pass(row, fn, inputs, child, dev)
            del fn, inputs
        medians = _time_interleaved([t[1] for t in timed], [t[2] for t in timed], dev, repeats, warmup=0)
        for (row, fn, inputs, child), ms in zip(timed, medians):
            row["median_ms"] = ms
            if memory:
                _memory_pass(row, fn, inputs, child, dev)
        del timed
        ce_ms = next((r["median_ms"] for r in rows if r["classes"] == n and r["loss"] == CE), math.nan)
        for r in rows:
            if r["classes"] == n:
                r["ratio_vs_ce"] = r["median_ms"] / ce_ms if ce_ms and not math.isnan(ce_ms) else math.nan
    return pd.DataFrame(rows, columns=COLUMNS)


def header(device: str, threads: int | None, batch_size: int) -> str:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (os.uname().machine if hasattr(os, "uname") else "cpu")
    return (f"device: {device} ({name}), torch {torch.__version__}, "
            f"threads: {threads if threads else torch.get_num_threads()}, batch: {batch_size}")


def to_markdown(df: pd.DataFrame) -> str:
    from tabulate import tabulate

    return tabulate(df, headers="keys", tablefmt="github", showindex=False, floatfmt=".3g")


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loss", action="append", default=[], metavar="CONFIG",
                        help="'name' or 'name:key=value,...' (repeatable)")
    parser.add_argument("--suite", help="YAML file with 'losses: [config, ...]' (and optional defaults)")
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-reference", action="store_true", help="skip reference-package rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--torch-sparse-shim", action="store_true",
                        help="run the reference's sparse networks on a pure-torch torch_sparse stand-in")
    parser.add_argument("--out", help="write markdown here (and CSV next to it)")


def _suite_configs(path: str) -> tuple[list[str], dict[str, Any]]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    items = data.get("losses", [])
    out = []
    for it in items:
        if isinstance(it, str):
            out.append(it)
        elif isinstance(it, dict) and "name" in it:
            out.append(format_config(it["name"], it.get("params", {}) or {}))
        else:
            raise ValueError(f"{path}: bad loss entry {it!r}")
    return out, {k: v for k, v in data.items() if k != "losses"}


def run(args: argparse.Namespace) -> int:
    texts = list(args.loss)
    if getattr(args, "suite", None):
        more, defaults = _suite_configs(args.suite)
        texts += more
        for key in ("classes", "batch_size", "threads", "repeats", "warmup"):
            if key in defaults and getattr(args, key) == argparse.ArgumentParser().get_default(key):
                setattr(args, key, defaults[key])
    configs = [parse_config(t) for t in texts]
    df = bench_losses(configs, args.classes, args.batch_size, args.device, args.threads, args.repeats,
                      args.warmup, reference=not args.no_reference, memory=not args.no_memory,
                      torch_sparse_shim=args.torch_sparse_shim)
    text = header(args.device, args.threads, args.batch_size) + "\n\n" + to_markdown(df) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        df.to_csv(out.with_suffix(".csv"), index=False)
        print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m harness.lossbench")
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
