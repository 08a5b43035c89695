"""Fast soft ranks (Blondel, Teboul, Berthet, Djolonga, ICML 2020) and a top-k loss on the label's rank.

M. Blondel et al. "Fast Differentiable Sorting and Ranking", ICML 2020. The soft rank of scores θ is a
regularised projection onto the permutahedron P(ρ), ρ = (n, n−1, …, 1):

* ``l2``: r(θ) = P_Q(−θ/ε, ρ) = argmin_{μ ∈ P(ρ)} ½‖μ + θ/ε‖²,
* ``kl``: r(θ) = argmin_{μ ∈ P(ρ)} KL(μ, e^{−θ/ε}),

computed by isotonic optimisation (PAV, ``losses.isotonic``) in O(n log n) with an exact O(n)
backward. Ranks are descending: rank 1 is the largest score; ε → 0 gives the hard ranks, ε → ∞ the
constant (n+1)/2 (``l2``).

Choices the paper leaves open, and ours:
* Classification loss: the paper's top-k experiment follows Cuturi et al. (2019) by putting a
  function of the label's soft rank r_y into the loss; we use the hinge ψ_k(r_y) = (r_y − k)_+ — zero
  exactly when the label's (soft) rank is within the top k, linear in how far outside it is (our
  reading; the hard limit is (rank − k)_+). Mean over the batch.
* ε = 1 (``epsilon``) in logit units; the ranks of scores a few ε apart are nearly hard.
* Top-m preselection (``m``) ranks the label among itself and the m − 1 largest other scores (the
  rank is the same as among all classes whenever it is < m).
"""
from __future__ import annotations

import torch
from torch import nn

from harness.registry import Log, Param, register_loss
from losses.common import check_k
from losses.isotonic import permutahedron_projection, projection_at
from losses.topk_ce import prepare_inputs

REGULARIZATIONS = ("l2", "kl")


def soft_rank(theta: torch.Tensor, epsilon: float = 1.0, regularization: str = "l2") -> torch.Tensor:
    """Descending soft ranks [B, n] of scores θ [B, n] (rank 1 = largest)."""
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"regularization must be one of {REGULARIZATIONS}, got {regularization!r}")
    n = theta.shape[1]
    rho = torch.arange(n, 0, -1, dtype=theta.dtype, device=theta.device)
    if regularization == "l2":
        return permutahedron_projection(-theta / epsilon, rho, "l2")
    return permutahedron_projection(-theta / epsilon, rho.log(), "kl")


def soft_rank_at(theta: torch.Tensor, index: torch.Tensor, epsilon: float = 1.0,
                 regularization: str = "l2") -> torch.Tensor:
    """``soft_rank(theta, epsilon, regularization)`` at one class per row (index [B]), [B]; cheaper backward."""
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"regularization must be one of {REGULARIZATIONS}, got {regularization!r}")
    n = theta.shape[1]
    rho = torch.arange(n, 0, -1, dtype=theta.dtype, device=theta.device)
    if regularization == "l2":
        return projection_at(-theta / epsilon, rho, index, "l2")
    return projection_at(-theta / epsilon, rho.log(), index, "kl")


@register_loss(
    "soft_rank",
    family="soft_rank",
    paper="Blondel, Teboul, Berthet, Djolonga. Fast Differentiable Sorting and Ranking. ICML 2020",
    version=1,
    params={
        "k": Param(int, 5, ge=1, doc="k of top-k (k < num_classes)"),
        "epsilon": Param(float, 1.0, gt=0.0, doc="regularisation strength ε", search=Log(1e-2, 10.0)),
        "regularization": Param(str, "l2", choices=REGULARIZATIONS, doc="l2 (quadratic) or kl (entropic)"),
        "m": Param(int, None, optional=True, ge=2, doc="top-m preselection (k < m < n); None = all classes"),
    },
)
class SoftRankLoss(nn.Module):
    """(r_y − k)_+ with r_y the label's descending soft rank."""

    def __init__(self, num_classes: int, k: int = 5, epsilon: float = 1.0, regularization: str = "l2",
                 m: int | None = None) -> None:
        super().__init__()
        check_k(k, num_classes)
        if not epsilon > 0:
            raise ValueError(f"epsilon={epsilon} must be > 0")
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization must be one of {REGULARIZATIONS}, got {regularization!r}")
        if m is not None and not k < m < num_classes:
            raise ValueError(f"m={m} must satisfy k < m < n ({k} < m < {num_classes})")
        self.num_classes, self.k, self.epsilon, self.regularization, self.m = (
            num_classes, k, float(epsilon), regularization, m)

    def extra_repr(self) -> str:
        return f"n={self.num_classes}, k={self.k}, epsilon={self.epsilon}, regularization={self.regularization}"

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s, labels = prepare_inputs(scores, labels, self.num_classes, self.m)
        r_y = soft_rank_at(s, labels, self.epsilon, self.regularization)
        return torch.relu(r_y - self.k).mean()
