"""Progress of a suite: per-epoch and per-run, as tqdm bars on a terminal and as log lines elsewhere.

The trainer logs one INFO line per epoch (`harness.train`) carrying an `EpochProgress` in
`record.epoch_progress`. On a terminal, `SuiteProgress` shows a bar over the suite's runs and one over
the current run's epochs (loss, seed, validation metric, ETA) and hides those lines; elsewhere (a log
file, CI, a Slurm job) the lines themselves are the progress, plus one line per finished run.
Runs in worker processes (`--executor local|slurm`) report per run only.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

from harness.spec import Component

log = logging.getLogger("topk_bench")


@dataclass(frozen=True)
class EpochProgress:
    """Where a run stands after an epoch (for progress bars and log lines)."""

    run_id: str
    loss: str  # loss name with its non-default parameters
    seed: int
    epoch: int  # 1-based: epochs finished
    epochs: int
    train_loss: float
    metric: str  # the suite's primary metric, on validation
    value: float
    seconds_per_epoch: float

    @property
    def eta_seconds(self) -> float:
        return (self.epochs - self.epoch) * self.seconds_per_epoch

    def metric_text(self) -> str:
        return format_metric(f"val {self.metric}", self.metric, self.value)

    def describe(self) -> str:
        return (f"{self.loss} seed {self.seed}: epoch {self.epoch}/{self.epochs}, train loss {self.train_loss:.4g}, "
                f"{self.metric_text()}, {self.seconds_per_epoch:.2f} s/epoch, ETA {duration(self.eta_seconds)}")


def format_metric(title: str, metric: str, value: float | None) -> str:
    """`val top1 45.20 %` for accuracies, `val k99 12` for k99; `—` when missing."""
    if value is None:
        return f"{title} —"
    return f"{title} {value * 100:.2f} %" if metric.startswith("top") else f"{title} {value:g}"


def duration(seconds: float) -> str:
    """h:mm:ss."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def short_label(loss: Component) -> str:
    """The loss with the parameters that differ from its defaults, e.g. `berrada_smooth[tau=0.1]`."""
    from harness.registry import LOSSES

    try:
        defaults = {k: p.default for k, p in LOSSES.get(loss.name).params.items()}
    except ValueError:
        defaults = {}
    return loss.label(show=tuple(k for k, v in loss.params.items() if defaults.get(k, object()) != v))


class _HideEpochLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not hasattr(record, "epoch_progress")


class _EpochHandler(logging.Handler):
    def __init__(self, progress: "SuiteProgress") -> None:
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        info = getattr(record, "epoch_progress", None)
        if isinstance(info, EpochProgress):
            self.progress.epoch(info)


class SuiteProgress:
    """Progress over `total` runs: tqdm bars when stderr is a terminal, log lines otherwise.

    Use as a context manager; call `finished(...)` after each run."""

    def __init__(self, total: int, labels: dict[str, tuple[str, int]], metric: str,
                 tty: bool | None = None) -> None:
        self.total, self.labels, self.metric = total, labels, metric
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.count, self.started = 0, time.monotonic()
        self._bar: Any = None
        self._epochs: Any = None
        self._epochs_run: str | None = None
        self._handler = _EpochHandler(self)
        self._filter = _HideEpochLines()
        self._redirect: Any = None

    def __enter__(self) -> "SuiteProgress":
        if self.tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=self.total, unit="run", dynamic_ncols=True, position=0)
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            for handler in logging.getLogger().handlers:
                handler.addFilter(self._filter)
            logging.getLogger("harness.train").addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tty:
            logging.getLogger("harness.train").removeHandler(self._handler)
            for handler in logging.getLogger().handlers:
                handler.removeFilter(self._filter)
            self._redirect.__exit__(*exc)
            if self._epochs is not None:
                self._epochs.close()
            self._bar.close()

    def epoch(self, info: EpochProgress) -> None:
        """One epoch of the current run finished (terminal: the inner bar)."""
        from tqdm import tqdm

        if self._epochs_run != info.run_id:
            if self._epochs is not None:
                self._epochs.close()
            self._epochs = tqdm(total=info.epochs, initial=info.epoch - 1, unit="epoch", leave=False,
                                dynamic_ncols=True, position=1, desc=f"{info.loss} seed {info.seed}")
            self._epochs_run = info.run_id
        self._epochs.update(1)
        self._epochs.set_postfix_str(f"{info.metric_text()}, loss {info.train_loss:.4g}")

    def finished(self, run_id: str, status: str, value: float | None, error: str | None = None) -> None:
        """A run finished with `status`; `value` is its test value of the primary metric."""
        self.count += 1
        loss, seed = self.labels.get(run_id, (run_id, -1))
        outcome = status if status != "done" else format_metric(f"done, test {self.metric}", self.metric, value)
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.count * (self.total - self.count)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{loss} seed {seed}: {outcome}")
            if status != "done":
                log.warning("%s seed %d: %s%s", loss, seed, status, f" ({error})" if error else "")
        else:
            log.info("[%d/%d] %s seed %d: %s%s (run %s); suite ETA %s", self.count, self.total, loss, seed,
                     outcome, f" ({error})" if error else "", run_id, duration(eta))
