"""Top-k transition loss of Sawada, Kaneko, Sagi (2020), implemented from the paper's abstract.

"Trade-offs in Top-k Classification Accuracies on Losses for Deep Learning" (arXiv 2007.15359)
describes the loss only as "CE modified by grouping temporal top-k classes as a single class" with
"an adaptive transition from normal CE to our loss". This module implements that reading:

* T = the k classes with the highest current scores (selected without gradient).
* Grouped loss: if y ∈ T, −log Σ_{j∈T} softmax(s)_j (the merged class is the target);
  otherwise ordinary CE (merging classes other than y leaves −log softmax(s)_y unchanged).
* L = (1 − λ)·CE + λ·L_grouped, with λ set by `on_progress` before every optimisation step.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from harness.registry import Linear, Param, TrainingProgress, register_loss
from losses.common import check_k, working_precision
from losses.transition_kernel import KMAX as FUSED_KMAX
from losses.transition_kernel import FusedTransition

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "step", "adaptive", "constant")


def grouped_topk_ce(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample grouped loss: −log Σ_{j∈T} softmax(s)_j if y ∈ T (top-k of s), else CE."""
    with torch.no_grad():
        top = scores.detach().topk(k, dim=1).indices
        in_top = (top == labels[:, None]).any(dim=1)
    # from one log_softmax (fused backward): a separate logsumexp over [B, n] runs its backward through
    # exp(s − lse), which at trained-logit scales (≥ 10) is mostly subnormal floats and 5–10× slower on a CPU
    logp = torch.log_softmax(scores, dim=1)
    grouped = -logp.gather(1, top).logsumexp(1)
    ce = -logp.gather(1, labels[:, None]).squeeze(1)
    return torch.where(in_top, grouped, ce)


@register_loss(
    "topk_transition",
    family="transition",
    paper="Sawada, Kaneko, Sagi. Trade-offs in top-k classification accuracies on losses for deep "
    "learning. arXiv:2007.15359, 2020 (implemented from the abstract)",
    version=1,
    params={
        "k": Param(int, 5, ge=1, doc="size of the grouped top-k set (k < num_classes)"),
        "schedule": Param(str, "linear", choices=SCHEDULES, doc="how λ moves from 0 to 1"),
        # start ≤ end always holds for the searched ranges (the schedule needs it)
        "start": Param(float, 0.0, ge=0.0, le=1.0, doc="training fraction where λ starts rising",
                       search=Linear(0.0, 0.5, when={"schedule": "linear"})),
        "end": Param(float, 0.5, ge=0.0, le=1.0, doc="training fraction where λ reaches 1",
                     search=Linear(0.5, 1.0, when={"schedule": ("linear", "step")})),
        "lambda_value": Param(float, 1.0, ge=0.0, le=1.0, doc="λ of the 'constant' schedule",
                              search=Linear(0.0, 1.0, when={"schedule": "constant"})),
        "adaptive_target": Param(
            float, 0.9, gt=0.0, le=1.0, doc="'adaptive': λ = train top-k accuracy / target",
            search=Linear(0.5, 1.0, when={"schedule": "adaptive"}),
        ),
    },
)
class TopKTransition(nn.Module):
    """(1−λ)·CE + λ·grouped top-k CE, λ following a schedule over training.

    Schedules (f = progress.fraction, the fraction of training steps done):
    * "linear":   λ = clip((f − start)/(end − start), 0, 1)  (a step at `start` if end == start);
    * "step":     λ = 0 for f < end, 1 from `end` on;
    * "adaptive": λ = max(λ_prev, min(1, acc_k/adaptive_target)) with acc_k the running training
      top-k accuracy (progress.train_topk_accuracy[k], 0 while unknown); monotone, so λ never
      falls back when the running accuracy dips at the start of an epoch;
    * "constant": λ = lambda_value throughout.
    λ starts at 0 (lambda_value for "constant") until the first `on_progress` call.
    """

    def __init__(
        self,
        num_classes: int,
        k: int = 5,
        schedule: str = "linear",
        start: float = 0.0,
        end: float = 0.5,
        lambda_value: float = 1.0,
        adaptive_target: float = 0.9,
    ) -> None:
        super().__init__()
        check_k(k, num_classes)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} must be one of {list(SCHEDULES)}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"start={start}, end={end} must satisfy 0 <= start <= end <= 1")
        if not 0.0 <= lambda_value <= 1.0:
            raise ValueError(f"lambda_value={lambda_value} must be in [0, 1]")
        if not 0.0 < adaptive_target <= 1.0:
            raise ValueError(f"adaptive_target={adaptive_target} must be in (0, 1]")
        self.num_classes, self.k, self.schedule = num_classes, k, schedule
        self.start, self.end = float(start), float(end)
        self.lambda_value, self.adaptive_target = float(lambda_value), float(adaptive_target)
        self.lam = self.lambda_value if schedule == "constant" else 0.0

    def on_progress(self, progress: TrainingProgress) -> None:
        """Update λ from the training progress (called before every optimisation step)."""
        f = progress.fraction
        if self.schedule == "constant":
            lam = self.lambda_value
        elif self.schedule == "linear":
            if self.end > self.start:
                lam = (f - self.start) / (self.end - self.start)
            else:
                lam = 1.0 if f >= self.start else 0.0
        elif self.schedule == "step":
            lam = 1.0 if f >= self.end else 0.0
        else:
            acc = float(progress.train_topk_accuracy.get(self.k, 0.0))
            lam = max(self.lam, acc / self.adaptive_target)
        self.lam = min(1.0, max(0.0, float(lam)))

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = working_precision(scores)
        if self.lam == 0.0:
            return F.cross_entropy(s, labels)
        if s.device.type == "cpu" and self.k <= FUSED_KMAX:  # compiled selection, one exp (same values)
            return FusedTransition.apply(s, labels, self.k, self.lam).mean()
        grouped = grouped_topk_ce(s, labels, self.k).mean()
        if self.lam == 1.0:
            return grouped
        return (1.0 - self.lam) * F.cross_entropy(s, labels) + self.lam * grouped
