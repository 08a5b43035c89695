"""bench-loss: forward+backward time and peak memory of losses, side by side with F.cross_entropy.

    topk-bench bench-loss --loss 'difftopk:sorter=bitonic,m=16' --loss softmax \\
        --classes 100 1000 --batch-size 128 --threads 1 --device cpu --out results/lossbench/x.md
    topk-bench bench-loss --suite suites/lossbench.yaml --out results/lossbench/losses-cpu.md

A config is ``name`` or ``name:key=value,...`` (values parsed as YAML; commas inside ``[...]`` are
kept, e.g. ``p_k=[0.5,0,0,0,0.5]``). A bench file (``--suite``) holds the same settings as the flags
plus ``losses:`` entries like a suite's, where a list value is a grid axis; flags override it.

Timing: every config of one class count is built, warmed up, then timed in interleaved rounds (each
round runs each config once, in a shuffled order) on random scores with ``requires_grad``; the
median per config is reported with its ratio to the ``cross_entropy`` row measured in the same
rounds. CUDA is synchronised around each pass; on CPU the thread count is fixed (``threads``). A
config slower than 1 s per pass is timed on its own (3 repeats).

Peak memory, in a separate pass: on CUDA ``max_memory_allocated`` during one pass minus what was
allocated before it; on CPU one pass in a fresh subprocess, reporting the growth of its peak RSS
(Linux: the high-water mark is reset through ``/proc/self/clear_refs``), an upper bound of the
pass's working set. On CPU the address space is capped (``--memory-limit-gb``, by default what is
free now) so a config that needs more fails as ``oom`` instead of taking the machine down.

Rows for reference implementations come from the loss itself: a loss registered with
``reference=hook`` (see ``harness.registry.ReferenceImpl``) names its equivalents in other packages;
they are timed beside it, or listed as unavailable when their package is missing.

Every config is validated before anything is timed (unknown loss, bad parameter, a parameter that
does not fit a class count): one line, exit code 2, as ``run`` does.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness import lossbench_scaling as scaling
from harness.errors import BenchError, RegistryError
from harness.measure import cap_address_space, forward_backward, status_kb, synchronize, time_interleaved
from harness.registry import LOSSES, ReferenceImpl

COLUMNS = ["loss", "config", "classes", "scale", "batch", "device", "median_ms", "ratio_vs_ce", "peak_mem_mb", "status"]
CE = "cross_entropy"
SLOW_PASS_MS = 1000.0
Config = tuple[str, dict[str, Any]]


# ----------------------------------------------------------------------------- configs
def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets, braces and quotes."""
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


def parse_config(text: str) -> Config:
    """'name' or 'name:key=value,key=value' -> (name, params)."""
    name, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for item in _split_top(rest):
        key, eq, value = item.partition("=")
        if not eq:
            raise BenchError(f"--loss {text!r}: bad item {item!r} (expected key=value)")
        params[key.strip()] = yaml.safe_load(value.strip())
    return name.strip(), params


def format_config(name: str, params: dict[str, Any]) -> str:
    if not params:
        return name
    return name + ":" + ",".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
                                 for k, v in params.items())


class BenchFile(BaseModel):
    """A bench-loss file: the flags' settings plus the losses (suite-style entries, lists are axes)."""

    model_config = ConfigDict(extra="forbid")
    bench: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    classes: list[int] = Field(default_factory=lambda: [100, 1000], min_length=1)
    # logit scale: scores ~ N(0, scale²); a list is an axis (trained networks emit logits of scale 5–20)
    scale: float | list[float] = Field(1.0)
    batch_size: int = Field(128, ge=1)
    threads: int | None = Field(1, ge=1)
    repeats: int = Field(20, ge=1)
    warmup: int = Field(3, ge=0)
    reference: bool = True
    torch_sparse_shim: bool = False
    # a config whose parameters do not fit a class count (top-m with m ≥ n): a row `n/a: reason` there
    # instead of refusing the bench (a scaling bench from n = 10); it must fit at least one count
    skip_unfit: bool = False
    losses: list[str | dict[str, Any]] = Field(min_length=1)


def load_bench_file(path: str | Path) -> tuple[BenchFile, list[Config]]:
    """Read and validate a bench file; loss entries are expanded and checked like a suite's."""
    from harness.suite import Named, SuiteError, expand_grid, read_mapping

    path = Path(path)
    try:
        bench = BenchFile.model_validate(read_mapping(path))
    except SuiteError as exc:
        raise BenchError(str(exc)) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if p not in ("str", "dict[str,any]"))
        raise BenchError(f"{path}: {key}: {err['msg']}") from None
    try:
        scales_of(bench.scale)
    except BenchError as exc:
        raise BenchError(f"{path}: {exc}") from None
    configs: list[Config] = []
    for i, item in enumerate(bench.losses):
        where = f"losses[{i}]"
        try:
            named = Named(name=item) if isinstance(item, str) else Named.model_validate(item)
            entry = LOSSES.get(named.name, where=f"{where}.name")
            for params in expand_grid(entry.params, named.params, f"{where}.params"):
                entry.validate_params(params, where=f"{where}.params")
                configs.append((entry.name, params))
        except (RegistryError, SuiteError) as exc:
            raise BenchError(f"{path}: {exc}") from None
        except ValidationError as exc:
            raise BenchError(f"{path}: {where}: {exc.errors()[0]['msg']}") from None
    return bench, configs


def validate_configs(configs: list[Config], classes: list[int], skip_unfit: bool = False) -> dict[tuple[str, int], str]:
    """Check every config against the registry and each class count; BenchError (one line) otherwise.

    With ``skip_unfit``, a config that does not fit some class counts (but fits one) is allowed: the
    returned {(config text, n): "n/a: reason"} marks those rows."""
    import harness

    if not classes or min(classes) < 2:
        raise BenchError(f"bench-loss: classes must be at least 2, got {classes}")
    unfit: dict[tuple[str, int], str] = {}
    for name, params in configs:
        where = f"bench-loss --loss {format_config(name, params)!r}"
        try:
            entry = LOSSES.get(name, where=where)
            if entry.unavailable_reason:
                raise BenchError(f"{where}: loss '{name}' is unavailable: {entry.unavailable_reason}")
            entry.validate_params(params, where=f"{where}: params")
            misfits = {}
            for n in classes:
                try:
                    harness.build_loss(name, n, **params)
                except (ValueError, TypeError) as exc:
                    if isinstance(exc, RegistryError):
                        raise
                    if not skip_unfit:
                        raise BenchError(f"{where} with {n} classes: {exc}") from None
                    misfits[(format_config(name, params), n)] = f"n/a: {exc}"
            if len(misfits) == len(classes):
                raise BenchError(f"{where}: fits none of the class counts {classes}: {next(iter(misfits.values()))}")
            unfit.update(misfits)
        except RegistryError as exc:
            raise BenchError(str(exc)) from None
    return unfit


# ----------------------------------------------------------------------------- one pass
def reference_impls(name: str, params: dict[str, Any], n: int, options: dict[str, Any]) -> list[ReferenceImpl]:
    """The reference implementations the loss declares for this config (its `reference=` hook)."""
    import harness

    hook = LOSSES.get(name).extra.get("reference")
    return [] if hook is None else list(hook(harness.build_loss(name, n, **params), n, options))


def _build(kind: str, name: str, params: dict[str, Any], n: int, device: torch.device,
           label: str = "", options: dict[str, Any] | None = None) -> Callable:
    if kind == "ce":
        return F.cross_entropy
    if kind == "ref":
        impl = next((r for r in reference_impls(name, params, n, options or {}) if r.label == label), None)
        if impl is None:
            raise RuntimeError(f"{name}: no reference implementation labelled {label!r}")
        return impl.build(device)
    import harness

    return harness.build_loss(name, n, **params).to(device)


def scales_of(scale: float | list[float]) -> list[float]:
    """The scale setting as a list (a list is an axis); every scale must be > 0."""
    scales = [float(s) for s in (scale if isinstance(scale, list) else [scale])]
    if not scales or any(not s > 0 for s in scales):
        raise BenchError(f"scale: every logit scale must be > 0, got {scale!r}")
    return scales


def _inputs(n: int, batch: int, device: torch.device, seed: int = 0,
            scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ~ N(0, scale²) [batch, n] with requires_grad, and uniform labels (seeded)."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(batch, n, generator=g) * scale).to(device).requires_grad_()
    labels = torch.randint(0, n, (batch,), generator=g).to(device)
    return scores, labels


def _status_of(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:160]
    low = text.lower()
    if isinstance(exc, MemoryError) or "out of memory" in low or "can't allocate memory" in low:
        return "oom"
    if "torch_sparse" in low or "torch-sparse" in low or isinstance(exc, ModuleNotFoundError):
        return "unavailable: " + text
    return "error: " + text


# ----------------------------------------------------------------------------- measurements
def _cuda_peak_mb(fn: Callable, scores: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with contextlib.redirect_stdout(io.StringIO()):
        forward_backward(fn, scores, labels)
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _cpu_peak_mb(job: dict[str, Any], timeout: float = 900) -> float:
    """Peak-RSS growth of one pass in a fresh subprocess (see the module doc)."""
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run(
        [sys.executable, "-c", "from harness.lossbench import _child; _child()", json.dumps(job)],
        capture_output=True, text=True, timeout=timeout, cwd=root,
        env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LOSSBENCH ")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        if proc.returncode < 0 or "memory" in err.lower():
            raise MemoryError(err)
        raise RuntimeError(err)
    return json.loads(lines[-1][len("LOSSBENCH "):])["peak_mb"]


def _child() -> None:
    """Subprocess side of `_cpu_peak_mb`: one pass, then print the peak-RSS growth in MB."""
    job = json.loads(sys.argv[1])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    fn = _build(job["kind"], job["name"], job["params"], job["n"], torch.device("cpu"), job["label"], job["options"])
    scores, labels = _inputs(job["n"], job["batch"], torch.device("cpu"), scale=job.get("scale", 1.0))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = status_kb("VmHWM")
    with contextlib.redirect_stdout(io.StringIO()):
        forward_backward(fn, scores, labels)
    print("LOSSBENCH " + json.dumps({"peak_mb": max(status_kb("VmHWM") - before, 0) / 1024}))


def _memory_pass(row: dict[str, Any], fn: Callable, inputs: tuple, job: dict[str, Any],
                 device: torch.device) -> None:
    try:
        row["peak_mem_mb"] = _cuda_peak_mb(fn, *inputs, device) if device.type == "cuda" else _cpu_peak_mb(job)
    except Exception as exc:  # noqa: BLE001
        row["status"] = "memory pass " + _status_of(exc)


# ----------------------------------------------------------------------------- the table
def _jobs(configs: list[Config], n: int, reference: bool, options: dict[str, Any],
          unfit: dict[tuple[str, int], str] | None = None) -> list[tuple[str, str, str, Any, str | None]]:
    """(row label, config text, kind, params, fixed status) for one class count, CE first."""
    jobs: list[tuple[str, str, str, Any, str | None]] = [(CE, CE, "ce", {}, None)]
    for name, params in configs:
        cfg = format_config(name, params)
        misfit = (unfit or {}).get((cfg, n))
        jobs.append((name, cfg, "ours", params, misfit))
        if not reference or misfit:
            continue
        try:
            impls = reference_impls(name, params, n, options)
        except Exception:  # noqa: BLE001  (our own build error shows on our row)
            impls = []
        jobs += [(impl.label, cfg, "ref", params, impl.unavailable) for impl in impls]
    return jobs


def bench_losses(configs: list[Config], classes: list[int], batch_size: int, device: str, threads: int | None,
                 repeats: int, warmup: int, reference: bool = True, memory: bool = True,
                 torch_sparse_shim: bool = False, scales: list[float] | None = None,
                 unfit: dict[tuple[str, int], str] | None = None) -> pd.DataFrame:
    """Time forward+backward of each config (and CE, and the reference's equivalents) per class count
    and logit scale (scores ~ N(0, scale²); ratios to CE measured at the same scale)."""
    dev = torch.device(device)
    if threads and dev.type == "cpu":
        torch.set_num_threads(threads)
    options = {"torch_sparse_shim": torch_sparse_shim}
    rows: list[dict[str, Any]] = []
    for n, scale in [(n, scale) for n in classes for scale in (scales or [1.0])]:
        timed: list[tuple[dict[str, Any], Callable, tuple, dict[str, Any]]] = []
        for label, cfg, kind, params, fixed in _jobs(configs, n, reference, options, unfit):
            row = {"loss": label, "config": cfg, "classes": n, "scale": scale, "batch": batch_size, "device": str(dev),
                   "median_ms": math.nan, "ratio_vs_ce": math.nan, "peak_mem_mb": math.nan, "status": fixed or "ok"}
            rows.append(row)
            if fixed:
                continue
            job = {"kind": kind, "name": cfg.partition(":")[0], "params": params, "n": n, "batch": batch_size,
                   "threads": threads, "label": label, "options": options, "scale": scale}
            try:
                fn = _build(kind, job["name"], params, n, dev, label, options)
                inputs = _inputs(n, batch_size, dev, scale=scale)
                (first,) = time_interleaved([fn], [inputs], dev, repeats=1, warmup=warmup)
                if first > SLOW_PASS_MS:  # seconds per pass: time it on its own
                    (row["median_ms"],) = time_interleaved([fn], [inputs], dev, min(repeats, 3), warmup=0)
            except Exception as exc:  # noqa: BLE001
                row["status"] = _status_of(exc)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if math.isnan(row["median_ms"]):
                timed.append((row, fn, inputs, job))
            elif memory:
                _memory_pass(row, fn, inputs, job, dev)
            del fn, inputs
        medians = time_interleaved([t[1] for t in timed], [t[2] for t in timed], dev, repeats, warmup=0)
        for (row, fn, inputs, job), ms in zip(timed, medians):
            row["median_ms"] = ms
            if memory:
                _memory_pass(row, fn, inputs, job, dev)
        del timed
        same = [r for r in rows if r["classes"] == n and r["scale"] == scale]
        ce_ms = next(r["median_ms"] for r in same if r["loss"] == CE)
        for r in same:
            r["ratio_vs_ce"] = r["median_ms"] / ce_ms
    return pd.DataFrame(rows, columns=COLUMNS)


def header(device: str, threads: int | None, batch_size: int, memory_cap_gb: float | None = None) -> str:
    from harness.measure import device_name, git_sha

    dev = torch.device(device)
    cap = f", address space capped at +{memory_cap_gb:.1f} GiB" if memory_cap_gb else ""
    return (f"device: {device} ({device_name(dev)}), torch {torch.__version__}, "
            f"threads: {threads if threads else torch.get_num_threads()}, batch: {batch_size}{cap}, "
            f"git {git_sha()}")


def to_markdown(df: pd.DataFrame) -> str:
    """One table, or one per logit scale (under a heading) when the scale is an axis."""
    from tabulate import tabulate

    def table(part: pd.DataFrame) -> str:
        return tabulate(part, headers="keys", tablefmt="github", showindex=False, floatfmt=".3g")

    if "scale" not in df.columns or df["scale"].nunique() <= 1:
        return table(df)
    return "\n\n".join(f"### scores ~ N(0, {scale:g}²)\n\n" + table(df[df["scale"] == scale])
                        for scale in sorted(df["scale"].unique()))


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loss", action="append", default=[], metavar="CONFIG",
                        help="'name' or 'name:key=value,...' (repeatable)")
    parser.add_argument("--suite", help="bench file (YAML): settings and 'losses:' (see suites/lossbench.yaml)")
    parser.add_argument("--classes", type=int, nargs="+", help="class counts (default 100 1000)")
    parser.add_argument("--scale", type=float, nargs="+", help="logit scales: scores ~ N(0, scale²) (default 1)")
    parser.add_argument("--batch-size", type=int, help="default 128")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on CPU (default 1)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, help="untimed passes first (default 3)")
    parser.add_argument("--no-reference", action="store_true", help="skip reference-package rows")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--torch-sparse-shim", action="store_true",
                        help="run the reference's sparse networks on a pure-torch torch_sparse stand-in")
    parser.add_argument("--memory-limit-gb", type=float,
                        help="CPU: cap on the memory a config may take (default: what is free now)")
    parser.add_argument("--out", help="write the markdown table here (and a CSV next to it)")


def run(args: argparse.Namespace) -> int:
    bench, configs = load_bench_file(args.suite) if args.suite else (None, [])
    configs += [parse_config(text) for text in args.loss]
    if not configs:
        raise BenchError("bench-loss: give --loss CONFIG (repeatable) or --suite FILE")
    settings = BenchFile(bench="cli", losses=["softmax"]) if bench is None else bench
    for key in ("classes", "scale", "batch_size", "threads", "repeats", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(settings, key))
    for key, low in (("batch_size", 1), ("threads", 1), ("repeats", 1), ("warmup", 0)):
        value = getattr(args, key)
        if value is not None and value < low:
            raise BenchError(f"bench-loss: --{key.replace('_', '-')} must be at least {low}, got {value}")
    scales = scales_of(args.scale)
    unfit = validate_configs(configs, args.classes, skip_unfit=settings.skip_unfit)
    cap = cap_address_space(args.memory_limit_gb) if torch.device(args.device).type == "cpu" else None
    df = bench_losses(configs, args.classes, args.batch_size, args.device, args.threads, args.repeats,
                      args.warmup, reference=settings.reference and not args.no_reference,
                      memory=not args.no_memory, torch_sparse_shim=settings.torch_sparse_shim or args.torch_sparse_shim,
                      scales=scales, unfit=unfit)
    title = f"# bench-loss: {bench.bench}\n\n{bench.description.strip()}\n\n" if bench else ""
    text = title + header(args.device, args.threads, args.batch_size, cap) + "\n\n" + to_markdown(df) + "\n"
    out = Path(args.out) if args.out else None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    if out is not None and scaling.has_scaling(df):
        text += "\n" + scaling.section(df, scaling.plot(df, out.with_name(out.stem + "-scaling.png")))
    print(text)
    if out is not None:
        out.write_text(text)
        df.to_csv(out.with_suffix(".csv"), index=False)
        print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0
