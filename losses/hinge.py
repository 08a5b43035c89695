"""Multiclass hinge losses: Crammer & Singer (2001) and the top-k calibrated hinge of Yang & Koyejo (2020)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from harness.registry import Param, register_loss
from losses.common import check_k, working_precision

log = logging.getLogger(__name__)


@register_loss(
    "crammer_singer",
    family="hinge",
    paper="Crammer, Singer. On the algorithmic implementation of multiclass kernel-based vector machines. JMLR 2001",
    version=1,
    params={},
)
class CrammerSinger(nn.Module):
    """Crammer-Singer hinge: max{0, max_{j≠y} (1 + s_j − s_y)}, mean over the batch."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        check_k(1, num_classes)
        self.num_classes = num_classes

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = working_precision(scores)
        s_y = s.gather(1, labels[:, None]).squeeze(1)
        best_other = s.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
        return torch.clamp(1.0 + best_other - s_y, min=0.0).mean()


@register_loss(
    "calibrated_hinge",
    family="hinge",
    paper="Yang, Koyejo. On the Consistency of Top-k Surrogate Losses. ICML 2020",
    version=1,
    params={"k": Param(int, 5, ge=1, doc="k of top-k (k < num_classes)")},
)
class CalibratedHinge(nn.Module):
    """Top-k calibrated hinge (1 + s_[k+1] − s_y)_+, mean over the batch.

    s_[k+1] is the (k+1)-th largest entry of the full score vector s (the label's score included),
    as in Yang & Koyejo's consistent hinge: the loss is zero iff s_y exceeds the (k+1)-th largest
    score by a margin of 1, i.e. y is safely inside the top k. Unlike the Lapin/Berrada top-k hinge
    it does not remove y before ranking, which is what makes it top-k calibrated.
    """

    def __init__(self, num_classes: int, k: int = 5) -> None:
        super().__init__()
        check_k(k, num_classes)
        self.num_classes, self.k = num_classes, k

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = working_precision(scores)
        s_y = s.gather(1, labels[:, None]).squeeze(1)
        kth1 = s.topk(self.k + 1, dim=1).values[:, self.k]
        return torch.clamp(1.0 + kth1 - s_y, min=0.0).mean()
