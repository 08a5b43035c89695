"""Noised (stochastically smoothed) top-k calibrated hinge of Garcin et al. (2022), via `pytopk`.

C. Garcin, M. Servajean, A. Joly, J. Salmon. "Stochastic smoothing of the top-K calibrated hinge
loss for deep imbalanced classification", ICML 2022. With Z ~ N(0, I) (n_sample draws per
sample) the (k+1)-th largest score is smoothed as φ(s) = E_Z[(s + εZ)_[k+1]] (Monte-Carlo mean;
its gradient is the mean one-hot indicator of the (k+1)-th noised entry), and

* balanced:   ℓ = (1 + φ(s) − s_y)_+                      (pytopk.BalNoisedTopK),
* imbalanced: ℓ = scale·(m_y + φ(s) − s_y)_+              (pytopk.ImbalNoisedTopK),

with per-class margins m_c ∝ n_c^{−1/4} rescaled so that the largest is max_m (LDAM-style);
n_c are the class counts (uniform when not given, i.e. m_c = max_m). The package's own default
scale=50 assumes normalised features and weights; here scale defaults to 1.
The loss draws fresh noise with torch.randn at every call (seed torch for reproducibility).
"""
from __future__ import annotations

import importlib
import logging

import torch
from torch import nn

from harness.registry import Log, Param, register_loss
from losses.common import check_k, working_precision

log = logging.getLogger(__name__)


@register_loss(
    "noised_topk",
    family="noised",
    paper="Garcin, Servajean, Joly, Salmon. Stochastic smoothing of the top-K calibrated hinge "
    "loss for deep imbalanced classification. ICML 2022",
    version=1,
    contract={"gradcheck": False},  # Monte-Carlo smoothing: its gradient is tested in tests/unit/test_noised.py
    requires=("pytopk",),
    params={
        "k": Param(int, 5, ge=1, doc="k of top-k (k < num_classes)"),
        "epsilon": Param(float, 1.0, gt=0.0, doc="noise scale ε of the smoothed top-k",
                         search=Log(1e-2, 10.0)),
        "n_sample": Param(int, 5, ge=1, doc="Gaussian draws per sample and evaluation"),
        "imbalanced": Param(bool, False, doc="use the class-dependent margins (ImbalNoisedTopK)"),
        "max_m": Param(float, 0.2, gt=0.0, doc="'imbalanced': largest class margin",
                       search=Log(0.05, 1.0, when={"imbalanced": True})),
        "scale": Param(float, 1.0, gt=0.0, doc="'imbalanced': scale of the hinge",
                       search=Log(0.1, 10.0, when={"imbalanced": True})),
        "class_counts": Param(
            (list, tuple), None, optional=True, doc="'imbalanced': training examples per class"
        ),
    },
)
class NoisedTopK(nn.Module):
    """Garcin et al. noised top-k hinge (1 + E[(s+εZ)_[k+1]] − s_y)_+ (or its imbalanced form)."""

    def __init__(
        self,
        num_classes: int,
        k: int = 5,
        epsilon: float = 1.0,
        n_sample: int = 5,
        imbalanced: bool = False,
        max_m: float = 0.2,
        scale: float = 1.0,
        class_counts: list[int] | tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        check_k(k, num_classes)
        if not epsilon > 0:
            raise ValueError(f"epsilon={epsilon} must be > 0")
        if n_sample < 1:
            raise ValueError(f"n_sample={n_sample} must be >= 1")
        if class_counts is not None:
            if len(class_counts) != num_classes or any(c <= 0 for c in class_counts):
                raise ValueError(f"class_counts must hold {num_classes} positive counts")
        pytopk = importlib.import_module("pytopk")
        self.num_classes, self.k, self.imbalanced = num_classes, k, imbalanced
        if imbalanced:
            counts = list(class_counts) if class_counts is not None else [1] * num_classes
            self.impl: nn.Module = pytopk.ImbalNoisedTopK(
                k=k, epsilon=epsilon, max_m=max_m, cls_num_list=counts, scale=scale,
                n_sample=n_sample,
            )
        else:
            self.impl = pytopk.BalNoisedTopK(k=k, epsilon=epsilon, n_sample=n_sample)

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = working_precision(scores)
        return self.impl(s, labels)
