"""Fast, differentiable and sparse top-k (Sander, Puigcerver, Djolonga, Peyré, Blondel, ICML 2023).

M. E. Sander et al. "Fast, Differentiable and Sparse Top-k: a Convex Analysis Perspective", ICML
2023. The top-k mask is the LP argmax_{y ∈ P(w)} ⟨s, y⟩ over the permutahedron of w = (1,…,1,0,…,0)
(k ones); regularised with a p-norm,

    y(s) = argmax_{y ∈ P(w)} ⟨s/ε, y⟩ − (1/p)‖y‖_p^p,   p ∈ {2, 4/3},

which the paper reduces to isotonic optimisation (PAV, ``losses.isotonic``; O(n log n), exact O(n)
backward). The output is *exactly sparse*: classes whose score is far enough below the k-th get
y = 0 (and zero gradient), those far above get 1. ε → 0 gives the hard top-k mask.

Choices the paper leaves open, and ours:
* Classification loss: the top-k cross-entropy of Petersen et al. 2022 (``losses.topk_ce``; the
  paper's top-k classification experiments follow that setup), P_K = [.5, 0, 0, 0, .5] with the k = 1
  term by softmax by default. The P_K mixture Σ_k P_K(k)·topk_k is taken as *one* projection onto
  P(w) with w_r = Σ_{k ≥ r} P_K(k) (the mixture's rank weights; the LP over P(w) is exactly the
  mixture of hard masks, the regularised one its smoothing) instead of one projection per k.
* ε = 1 (``epsilon``) in logit units; p = 4/3 by default (``p`` = "4/3" or "2"), the paper's
  recommended setting (smoother than p = 2 for the same sparsity).
* A label whose mass is exactly 0 contributes −log(1e−7) with zero gradient from the top-k term
  (the softmax term of ``top1_mode=sm`` still trains it), as in the reference's clamp.
"""
from __future__ import annotations

import torch

from harness.registry import Log, Param, register_loss
from losses.isotonic import permutahedron_projection, projection_at
from losses.topk_ce import TopKCrossEntropy, topk_ce_params

P_NORMS = ("4/3", "2")


def sparse_topk(s: torch.Tensor, w: torch.Tensor | int, epsilon: float = 1.0, p: str = "4/3") -> torch.Tensor:
    """Soft top-k mask [B, n] in P(w); ``w`` an int k (w = k ones) or descending rank weights [n]."""
    if p not in P_NORMS:
        raise ValueError(f"p must be one of {P_NORMS}, got {p!r}")
    n = s.shape[1]
    if isinstance(w, int):
        if not 0 < w < n:
            raise ValueError(f"k={w} must satisfy 0 < k < n={n}")
        w = (torch.arange(n, device=s.device) < w).to(s.dtype)
    return permutahedron_projection(s / epsilon, w, "l2" if p == "2" else "p4/3")


@register_loss(
    "sparse_topk",
    family="sparse_topk",
    paper="Sander, Puigcerver, Djolonga, Peyré, Blondel. Fast, Differentiable and Sparse Top-k: "
    "a Convex Analysis Perspective. ICML 2023",
    version=1,
    contract={"params": {"p_k": [0.5, 0.5]}, "min_classes": 3},  # harness.testing: K = len(p_k) < n
    params={
        **topk_ce_params(),
        "epsilon": Param(float, 1.0, gt=0.0, doc="regularisation strength ε", search=Log(1e-2, 10.0)),
        "p": Param(str, "4/3", choices=P_NORMS, doc="p-norm regulariser: 4/3 or 2"),
    },
)
class SparseTopKLoss(TopKCrossEntropy):
    """Top-k cross-entropy over the p-norm-regularised (sparse) top-k of Sander et al."""

    def __init__(self, num_classes: int, p_k: list | tuple = (0.5, 0.0, 0.0, 0.0, 0.5), m: int | None = None,
                 top1_mode: str = "sm", epsilon: float = 1.0, p: str = "4/3") -> None:
        super().__init__(num_classes, p_k, m, top1_mode)
        if not epsilon > 0:
            raise ValueError(f"epsilon={epsilon} must be > 0")
        if p not in P_NORMS:
            raise ValueError(f"p must be one of {P_NORMS}, got {p!r}")
        self.epsilon, self.p = float(epsilon), p

    def label_mass(self, s: torch.Tensor, labels: torch.Tensor, ks: list[int], weights: list[float]) -> torch.Tensor:
        w = self.rank_weights(s.shape[1], s.dtype, s.device)
        # = sparse_topk(s, w, ε, p) at the label, without the index sort (losses.isotonic_label)
        z = s if self.epsilon == 1 else s / self.epsilon
        return projection_at(z, w, labels, "l2" if self.p == "2" else "p4/3")
