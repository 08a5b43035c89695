"""One run: build data, model and loss from a RunSpec, train, evaluate every epoch, measure."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from harness import checkpoint, measure
from harness.data.base import DataBundle, Split
from harness.metrics import summarize, true_label_rank
from harness.progress import EpochProgress, short_label
from harness.record import SCHEMA_VERSION
from harness.registry import DATASETS, LOSSES, MODELS, TrainingProgress
from harness.spec import RunSpec
from harness.store import RunStore

log = logging.getLogger(__name__)


WARMUP_STEPS = 5  # first steps of a run (compilation, allocator, caches) are not timed
CPU_OOM_MESSAGES = ("can't allocate memory", "not enough memory", "DefaultCPUAllocator", "std::bad_alloc")


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class RunTimeout(RuntimeError):
    """The run exceeded its time budget."""


@dataclass
class History:
    """Per-epoch metrics (curves kept in memory for the selected epochs only)."""

    epochs: list[dict] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)  # {"val": [...], "test": [...]} per epoch


def _optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    opt = cfg["optimizer"]
    if opt["name"] == "sgd":
        return torch.optim.SGD(params, lr=opt["lr"], momentum=opt["momentum"], weight_decay=opt["weight_decay"])
    cls = torch.optim.Adam if opt["name"] == "adam" else torch.optim.AdamW
    return cls(params, lr=opt["lr"], weight_decay=opt["weight_decay"])


def _scheduler(optimizer: torch.optim.Optimizer, cfg: dict):
    sched, epochs = cfg["schedule"], cfg["epochs"]
    if sched["name"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if sched["name"] == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=sched["step_size"], gamma=sched["gamma"])
    return None


def _autocast(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def _ranks(model: torch.nn.Module, split: Split, device: torch.device, cfg: dict) -> np.ndarray:
    model.eval()
    out = []
    for xb, yb in split.batches(cfg["eval_batch_size"], device):
        if cfg["channels_last"] and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(device, cfg["amp"]):
            scores = model(xb)
        out.append(true_label_rank(scores.float(), yb).cpu())
    return torch.cat(out).numpy()


class Trainer:
    """Trains one RunSpec on one device; checkpoints every epoch when asked to."""

    def __init__(self, spec: RunSpec, device: torch.device, checkpoint: Path | None, deadline: float) -> None:
        self.spec, self.device, self.checkpoint_path, self.deadline = spec, device, checkpoint, deadline
        self.cfg = spec.train
        torch.manual_seed(spec.seed)
        self.generator = torch.Generator().manual_seed(spec.seed)
        ds = DATASETS.get(spec.dataset.name)
        self.data: DataBundle = ds.obj(seed=spec.seed, **spec.dataset.params)
        self.splits = {
            "train": self.data.train.to(device),
            "val": self.data.val.to(device),
            "test": (self.data.test or self.data.val).to(device),
        }
        n = self.data.num_classes
        self.model = MODELS.get(spec.model.name).obj(self.data.input_shape, n, **spec.model.params).to(device)
        if self.cfg["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss_fn = LOSSES.get(spec.loss.name).obj(num_classes=n, **spec.loss.params).to(device)
        self.optimizer = _optimizer(list(self.model.parameters()) + list(self.loss_fn.parameters()), self.cfg)
        self.scheduler = _scheduler(self.optimizer, self.cfg)
        self.forward = torch.compile(self.model) if self.cfg["compile"] else self.model
        self.history = History()
        self.step_timer = measure.StepTimer(device)
        self.step = 0
        self.start_epoch = 0
        self.train_rank_hist = torch.zeros(n + 1, device=device)
        self.resumed_from: int | None = None
        self._maybe_resume()

    # ---- checkpointing (format and safety: harness/checkpoint.py) ------------------------
    def _state(self, epoch: int) -> dict:
        """Tensors and plain values only, so that loading needs no unpickling of code."""
        return {
            **checkpoint.stamp(self.spec), "epoch": epoch, "step": self.step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "loss": self.loss_fn.state_dict(), "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "history": json.dumps(asdict(self.history)), "train_rank_hist": self.train_rank_hist.cpu(),
        }

    def _save_checkpoint(self, epoch: int) -> None:
        if self.checkpoint_path is not None and not checkpoint.save(self.checkpoint_path, self._state(epoch)):
            self.checkpoint_path = None

    def _apply(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss_fn.load_state_dict(state["loss"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history = json.loads(state["history"])
        self.history = History(epochs=list(history["epochs"]), curves=list(history["curves"]))
        self.step = state["step"]
        self.train_rank_hist = state["train_rank_hist"].to(self.device, torch.float32)

    def _maybe_resume(self) -> None:
        """Resume from this run's checkpoint; a corrupt, foreign or unsafe file is ignored (logged)."""
        if self.checkpoint_path is None:
            return
        state = checkpoint.load(self.checkpoint_path, self.spec)
        if state is None:
            return
        fresh = copy.deepcopy(self._state(-1))
        try:
            self._apply(state)
            if len(self.history.epochs) != state["epoch"] + 1:
                raise ValueError(f"history has {len(self.history.epochs)} epochs, expected {state['epoch'] + 1}")
        except Exception as exc:  # shapes or fields that do not fit this run's model: start over
            log.warning("ignoring checkpoint %s: it does not fit run %s (%s: %s); starting over",
                        self.checkpoint_path, self.spec.run_id, type(exc).__name__, " ".join(str(exc).split())[:200])
            self._apply(fresh)
            return
        self.start_epoch = self.resumed_from = state["epoch"] + 1
        log.info("resumed %s from epoch %d", self.spec.run_id, state["epoch"])

    # ---- training ------------------------------------------------------------------------
    def _progress(self, epoch: int, steps_per_epoch: int) -> TrainingProgress:
        hist = self.train_rank_hist[1:].cpu()
        total = float(hist.sum())
        acc = (hist.cumsum(0) / total).tolist() if total else []
        return TrainingProgress(epoch, self.cfg["epochs"], self.step, steps_per_epoch,
                                {k + 1: a for k, a in enumerate(acc)})

    def _train_epoch(self, epoch: int) -> tuple[float, float, torch.Tensor]:
        self.model.train()
        train = self.splits["train"]
        steps_per_epoch = math.ceil(len(train) / self.cfg["batch_size"])
        wants_progress = hasattr(self.loss_fn, "on_progress")
        total_loss, batches, timing_batch = 0.0, 0, None
        measure.synchronize(self.device)
        start = time.perf_counter()
        self.step_timer.start()
        for xb, yb in train.batches(self.cfg["batch_size"], self.device, self.generator):
            if self.data.train_transform is not None:
                xb = self.data.train_transform(xb, self.generator)
            if self.cfg["channels_last"] and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            if wants_progress:
                self.loss_fn.on_progress(self._progress(epoch, steps_per_epoch))
            with _autocast(self.device, self.cfg["amp"]):
                scores = self.forward(xb)
            scores = scores.float()
            loss = self.loss_fn(scores, yb)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"loss became {loss.item()} at epoch {epoch}, step {self.step}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
            self.optimizer.step()
            if wants_progress:
                ranks = true_label_rank(scores.detach(), yb)
                self.train_rank_hist += torch.bincount(ranks, minlength=self.train_rank_hist.numel())
            total_loss += loss.detach()
            batches += 1
            self.step += 1
            self.step_timer.lap()
            if timing_batch is None:  # a full batch (the last one may be a small remainder)
                timing_batch = (scores.detach(), yb)
            if time.monotonic() > self.deadline:
                raise RunTimeout(f"time budget exhausted at epoch {epoch}, step {self.step}")
        if self.scheduler:
            self.scheduler.step()
        measure.synchronize(self.device)
        seconds = time.perf_counter() - start
        if wants_progress:  # running accuracy restarts each epoch
            self.train_rank_hist.zero_()
        return float(total_loss) / max(1, batches), seconds, timing_batch

    def _evaluate(self) -> tuple[dict, dict]:
        n, ks = self.data.num_classes, self.spec.eval["k"]
        out, curves = {}, {}
        for name in ("val", "test"):
            split = self.splits[name]
            ranks = _ranks(self.model, split, self.device, self.cfg)
            summary = summarize(ranks, split.y.cpu().numpy(), n, ks)
            curves[name] = summary.pop("curve")
            out[name] = summary
        return out, curves

    def fit(self, on_epoch: Callable[[EpochProgress], None] | None = None) -> tuple[dict, torch.Tensor | None]:
        """Train every remaining epoch; after each, `on_epoch` (if given) gets an EpochProgress, which
        is also logged (INFO, `extra={"epoch_progress": ...}`) for progress displays."""
        timing_batch = None
        started, label = time.monotonic(), short_label(self.spec.loss)
        for epoch in range(self.start_epoch, self.cfg["epochs"]):
            train_loss, seconds, timing_batch = self._train_epoch(epoch)
            metrics, curves = self._evaluate()
            steps = math.ceil(len(self.splits["train"]) / self.cfg["batch_size"])
            self.history.epochs.append({"epoch": epoch, "train_loss": train_loss, "epoch_seconds": seconds,
                                        "step_seconds": seconds / steps, **metrics})
            self.history.curves.append(curves)
            done = epoch + 1 - self.start_epoch
            progress = EpochProgress(self.spec.run_id, label, self.spec.seed, epoch + 1, self.cfg["epochs"],
                                     train_loss, self.spec.eval["primary"],
                                     metrics["val"].get(self.spec.eval["primary"], float("nan")),
                                     (time.monotonic() - started) / done)
            log.info("%s", progress.describe(), extra={"epoch_progress": progress})
            if on_epoch is not None:
                on_epoch(progress)
            self._save_checkpoint(epoch)
            if time.monotonic() > self.deadline:
                raise RunTimeout(f"time budget exhausted after epoch {epoch} (evaluation included)")
        return self._selected_metrics(), timing_batch

    def _selected_metrics(self) -> dict:
        """Test metrics at the last epoch and at the best validation epoch of each metric."""
        epochs = self.history.epochs
        keys = [k for k in epochs[-1]["val"] if k != "k99"] + ["k99"]
        best_epoch = {}
        for key in keys:
            values = [e["val"][key] for e in epochs]
            best_epoch[key] = int(np.argmin(values) if key == "k99" else np.argmax(values))
        primary = self.spec.eval["primary"]
        return {
            "test": {
                "last": epochs[-1]["test"],
                "best_val": {k: epochs[best_epoch[k]]["test"][k] for k in keys},
            },
            "val": {"last": epochs[-1]["val"], "best": {k: epochs[best_epoch[k]]["val"][k] for k in keys}},
            "best_val_epoch": best_epoch,
            "last_epoch": epochs[-1]["epoch"],
            "curve_test_last": self.history.curves[-1]["test"],
            "curve_test_best_val": self.history.curves[best_epoch[primary]]["test"],
        }

    def timings(self, batch: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
        """Step times (warm-up steps dropped) and the loss's fwd+bwd beside F.cross_entropy's."""
        steps = self.step_timer.collect()
        steps = steps[min(WARMUP_STEPS, len(steps) // 2):]
        step = measure.TimingStats.from_seconds(steps)
        epochs = [e["epoch_seconds"] for e in self.history.epochs]
        out: dict = {"step": step.to_dict(), "median_step_ms": step.median_ms, "step_reliable": step.reliable,
                     "median_epoch_s": float(np.median(epochs)) if epochs else 0.0}
        if batch is None:
            return out
        scores, labels = batch
        inputs = (scores.clone().requires_grad_(True), labels)
        # at most ~2 % of the training time (and 0.2 s) goes to this side-by-side measurement
        budget = min(0.2, 0.02 * sum(epochs))
        loss, ce = measure.time_interleaved_stats([self.loss_fn, F.cross_entropy], [inputs, inputs], self.device,
                                                  repeats=15, warmup=5, min_seconds=budget, max_repeats=500)
        out.update(loss_fwd_bwd=loss.to_dict(), ce_fwd_bwd=ce.to_dict(), loss_fwd_bwd_ms=loss.median_ms,
                   ce_fwd_bwd_ms=ce.median_ms, loss_vs_ce=loss.median_ms / ce.median_ms if ce.median_ms else 0.0,
                   loss_vs_ce_reliable=loss.reliable and ce.reliable and ce.median_ms > 0)
        return out


def _is_oom(exc: BaseException) -> bool:
    """An allocation failure on any device (CUDA's own error, or the CPU allocator's)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in CPU_OOM_MESSAGES)


def new_record(spec: RunSpec, status: str = "failed", error: str | None = None) -> dict:
    """The fields every record has, before or without training (a front end's `timeout`, say)."""
    return {"schema_version": SCHEMA_VERSION, "run_id": spec.run_id, "spec": spec.to_dict(), "status": status,
            "error": error, "started": datetime.now(timezone.utc).isoformat(),
            "computed_by": {"host": socket.gethostname(), "pid": os.getpid()}}


def run_one(spec: RunSpec, store: RunStore, device: str = "auto", timeout_min: float = 60.0) -> dict:
    """Train one run and write its record (whatever happens); returns the record."""
    dev = measure.resolve_device(device)
    started = time.time()
    record = new_record(spec)
    record["environment"] = measure.environment(dev)
    record["provenance"] = {part: registry.get(getattr(spec, part).name).provenance()
                            for part, registry in (("loss", LOSSES), ("dataset", DATASETS), ("model", MODELS))}
    trainer = None
    try:
        measure.reset_peak_memory(dev)
        ckpt = store.checkpoints_dir / f"{spec.run_id}.pt" if spec.train["checkpoint"] else None
        trainer = Trainer(spec, dev, ckpt, time.monotonic() + timeout_min * 60)
        metrics, timing_batch = trainer.fit()
        record["metrics"] = metrics
        record["timings"] = trainer.timings(timing_batch)
        record["status"] = "done"
        checkpoint.remove(ckpt)
    except NonFiniteLoss as exc:
        record.update(status="nan", error=str(exc))
    except RunTimeout as exc:
        record.update(status="timeout", error=str(exc))
    except Exception as exc:  # the suite goes on; the record says why
        if _is_oom(exc):
            record.update(status="oom", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        else:
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                          traceback=traceback.format_exc(limit=8))
            log.warning("run %s failed: %s: %s", spec.run_id, type(exc).__name__, exc)
    if trainer is not None:
        record["curves"] = trainer.history.epochs
        record["resumed_from_epoch"] = trainer.resumed_from
        record["data_info"] = {**trainer.data.info, **trainer.data.describe()}
    peak, kind = measure.peak_memory_mb(dev)
    record.update(peak_memory_mb=peak, peak_memory_kind=kind, wall_seconds=time.time() - started,
                  finished=datetime.now(timezone.utc).isoformat())
    store.write(record)
    return record
