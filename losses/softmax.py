"""Softmax cross-entropy: the baseline every other loss is compared (and timed) against."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.registry import Linear, Param, register_loss
from losses.common import working_precision


@register_loss(
    "softmax",
    aliases=("ce", "cross_entropy"),
    family="softmax",
    paper="baseline",
    version=1,
    params={"label_smoothing": Param(float, 0.0, ge=0.0, lt=1.0, doc="label smoothing ε",
                                       search=Linear(0.0, 0.3))},
)
class SoftmaxCE(nn.Module):
    """Softmax cross-entropy (optionally label-smoothed)."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(working_precision(scores), labels, label_smoothing=self.label_smoothing)
