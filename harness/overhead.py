"""bench-overhead: the harness's cost over a bare PyTorch loop doing the same work.

    topk-bench bench-overhead --out results/overhead/overhead-cpu.md

Both sides train a linear softmax head for `epochs` epochs on the same features file (50 k training
samples by default, no test split: the harness holds out validation, the bare loop the same rows),
shuffle with the same seeded permutation, and evaluate val and test every epoch. They run in
alternating pairs (bare, harness, bare, harness, …) in this one process, and the report gives the
median ratio of end-to-end wall time and of the per-step training time. The harness side is a
complete `run_one` (data loading, record written); the bare side is the twin below, the loop a user
would write by hand.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def write_features(path: Path, train: int, test: int, dim: int, classes: int, seed: int = 0) -> Path:
    """A features file in the real on-disk format (.npz), class-conditional Gaussians."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(classes, size=n)
        return (centres[y] + 1.5 * rng.normal(size=(n, dim))).astype(np.float32), y.astype(np.int64)

    xtr, ytr = split(train)
    xva, yva = split(test)
    np.savez(path, train_features=xtr, train_labels=ytr, val_features=xva, val_labels=yva)
    return path


def bare_loop(path: Path, epochs: int, batch_size: int, lr: float, holdout: int, seed: int) -> dict:
    """The hand-written twin: same data, split, model, optimiser, order and evaluation."""
    start = time.perf_counter()
    with np.load(path, allow_pickle=False) as z:
        x, y = torch.from_numpy(z["train_features"]), torch.from_numpy(z["train_labels"])
        x_test, y_test = torch.from_numpy(z["val_features"]), torch.from_numpy(z["val_labels"])
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    held, kept = perm[:holdout].sort().values, perm[holdout:].sort().values
    x_train, y_train, x_val, y_val = x[kept], y[kept], x[held], y[held]
    classes = int(y.max()) + 1
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x.shape[1], classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    step_seconds: list[float] = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for i in range(0, len(order), batch_size):
            t0 = time.perf_counter()
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_seconds.append(time.perf_counter() - t0)
        model.eval()
        with torch.no_grad():
            for xs, ys in ((x_val, y_val), (x_test, y_test)):
                scores = model(xs)
                ranks = (scores >= scores.gather(1, ys.view(-1, 1))).sum(1)
                (ranks <= 1).float().mean().item(), (ranks <= 5).float().mean().item()
    return {"wall_s": time.perf_counter() - start, "step_ms": statistics.median(step_seconds) * 1e3}


def harness_run(path: Path, results: Path, epochs: int, batch_size: int, lr: float, holdout: int,
                seed: int) -> dict:
    """The same work as one harness run (`run_one`, record written)."""
    from harness.registry import DATASETS, LOSSES, MODELS
    from harness.spec import Component, RunSpec
    from harness.store import RunStore
    from harness.suite import Eval, Train
    from harness.train import run_one

    ds_params = DATASETS.get("features").validate_params({"path": str(path), "val_holdout": holdout})
    train = Train(epochs=epochs, batch_size=batch_size, optimizer={"name": "adam", "lr": lr}).model_dump()
    spec = RunSpec(loss=Component("softmax", LOSSES.get("softmax").version,
                                  LOSSES.get("softmax").validate_params({})),
                   dataset=Component("features", 1, ds_params, {**ds_params, "path": f"{path.name}-{time.time()}"}),
                   model=Component("linear", MODELS.get("linear").version, {}),
                   train=train, eval=Eval(k=[1, 5]).model_dump(), seed=seed)
    start = time.perf_counter()
    record = run_one(spec, RunStore(results, "overhead"), "cpu", timeout_min=60)
    wall = time.perf_counter() - start
    if record["status"] != "done":
        raise RuntimeError(f"harness run ended {record['status']}: {record.get('error')}")
    return {"wall_s": wall, "step_ms": record["timings"]["median_step_ms"]}


def measure_overhead(train: int = 50_000, test: int = 10_000, dim: int = 256, classes: int = 100,
                     epochs: int = 5, batch_size: int = 256, pairs: int = 3, threads: int = 1) -> dict:
    """Alternating pairs of (bare loop, harness run); median ratios."""
    torch.set_num_threads(threads)
    holdout = 5_000
    with tempfile.TemporaryDirectory() as tmp:
        path = write_features(Path(tmp) / "features.npz", train, test, dim, classes)
        bare, harness = [], []
        for i in range(pairs + 1):  # pair 0 warms up both sides and is dropped
            b = bare_loop(path, epochs, batch_size, 1e-3, holdout, seed=i)
            h = harness_run(path, Path(tmp) / "results", epochs, batch_size, 1e-3, holdout, seed=i)
            if i:
                bare.append(b)
                harness.append(h)
    wall = [h["wall_s"] / b["wall_s"] for b, h in zip(bare, harness)]
    step = [h["step_ms"] / b["step_ms"] for b, h in zip(bare, harness)]
    return {
        "setup": f"{train} train samples × {dim} features, {classes} classes, linear head, {epochs} epochs, "
                 f"batch {batch_size}, val and test evaluated every epoch, {threads} thread(s), {pairs} pairs",
        "bare_wall_s": [b["wall_s"] for b in bare], "harness_wall_s": [h["wall_s"] for h in harness],
        "bare_step_ms": [b["step_ms"] for b in bare], "harness_step_ms": [h["step_ms"] for h in harness],
        "wall_ratio": statistics.median(wall), "step_ratio": statistics.median(step),
    }


def to_markdown(result: dict, device: str) -> str:
    rows = [f"| {i + 1} | {b:.2f} | {h:.2f} | {h / b:.3f} | {bs:.3f} | {hs:.3f} | {hs / bs:.3f} |"
            for i, (b, h, bs, hs) in enumerate(zip(result["bare_wall_s"], result["harness_wall_s"],
                                                    result["bare_step_ms"], result["harness_step_ms"]))]
    return "\n".join([
        "# Harness overhead vs a bare PyTorch loop", "",
        f"- device: {device}", f"- setup: {result['setup']}",
        f"- **end to end: {result['wall_ratio']:.3f}×** the bare loop's wall time (median over pairs)",
        f"- **per training step: {result['step_ratio']:.3f}×** the bare loop's median step", "",
        "| pair | bare wall s | harness wall s | ratio | bare step ms | harness step ms | ratio |",
        "|---|---|---|---|---|---|---|", *rows, "",
        "Produced by `topk-bench bench-overhead` (harness/overhead.py); pairs alternate bare and harness "
        "in one process after a dropped warm-up pair.", ""])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", type=int, default=50_000, help="training samples in the features file")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="markdown file to write (default: print only)")


def run(args: argparse.Namespace) -> int:
    from harness.errors import UserError
    from harness.measure import device_name

    for name in ("train", "dim", "classes", "epochs", "pairs", "threads"):
        if getattr(args, name) < 1:
            raise UserError(f"bench-overhead: --{name} must be ≥ 1")
    if args.train <= 10_000:
        raise UserError("bench-overhead: --train must be > 10000 (5000 samples are held out for validation)")
    result = measure_overhead(args.train, 10_000, args.dim, args.classes, args.epochs, pairs=args.pairs,
                              threads=args.threads)
    text = to_markdown(result, device_name(torch.device("cpu")))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)
    return 0
