"""Differentiable top-k cross-entropy (Petersen, Borgelt, Kuehne, Deussen, ICML 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.registry import Linear, Log, Param, register_loss
from losses.common import check_p_k
from losses.reference_difftopk import difftopk_reference
from losses.difftopk.label_mass import network_label_mass
from losses.difftopk.networks import NETWORKS, TorchNetwork
from losses.difftopk.relaxations import DISTRIBUTIONS
from losses.difftopk.sinkhorn import sinkhorn_topk
from losses.topk_ce import prepare_inputs, preselect
from losses.difftopk.sorters import (
    SORTERS,
    neuralsort_topk,
    softsort_topk,
)

# Inverse temperature used when ``inverse_temperature=None``: 1.0 (steepness for the networks,
# 1/tau for NeuralSort/SoftSort: the relaxations act on differences of the order of one logit),
# except Sinkhorn: 1/n_sort, i.e. epsilon = n in squared rank units (see losses.difftopk.sinkhorn).
DEFAULT_INVERSE_TEMPERATURE = {s: 1.0 for s in SORTERS if s != "sinkhorn"}
TOP1_MODES = ("sort", "sm", "smce")
# NeuralSort/SoftSort on CPU float32/float64 scores: the whole loss as one compiled call each way
# (losses.difftopk.sorter_kernels); False: the torch path everywhere (tests compare the two).
COMPILED = True


@register_loss(
    "difftopk",
    family="petersen",
    paper="Petersen et al. ICML 2022",
    version=2,  # 2: Sinkhorn solved to tolerance at every ε (Newton on the semi-dual), or an error
    reference=difftopk_reference,
    contract={"params": {"p_k": [0.5, 0.5]}, "min_classes": 4},  # harness.testing: small n needs a short P_K
    params={
        "sorter": Param(str, "odd_even", choices=SORTERS, doc="differentiable sorter / top-k network"),
        "p_k": Param(list, [0.5, 0.0, 0.0, 0.0, 0.5], doc="P_K over k=1..K (non-negative, sums to 1)"),
        "m": Param(int, None, optional=True, ge=2, doc="top-m preselection (K < m < n); None = all classes"),
        "top1_mode": Param(str, "sm", choices=TOP1_MODES, doc="how the k=1 term is computed"),
        "inverse_temperature": Param(float, None, optional=True, gt=0.0, search=Log(1e-2, 1e2),
                                     doc="steepness / 1/tau / 1/eps; None = 1.0 (sinkhorn: 1/n)"),
        "distribution": Param(str, "logistic_phi", choices=DISTRIBUTIONS, doc="sorting-network relaxation"),
        "art_lambda": Param(float, 0.5, ge=0.0, doc="ART exponent λ of logistic_phi",
                            search=Linear(0.1, 1.0, when={"distribution": "logistic_phi", "sorter": NETWORKS})),
        "sinkhorn_iterations": Param(int, 100, ge=1, doc="max Sinkhorn/Newton steps (not converged: the run fails)"),
        "sinkhorn_tolerance": Param(float, 1e-6, gt=0.0, doc="Sinkhorn relative anchor-marginal tolerance"),
    },
)
class DiffTopKLoss(nn.Module):
    """Top-k cross-entropy through a differentiable sorter (only the top-K rows of P)."""

    def __init__(
        self,
        num_classes: int,
        sorter: str = "odd_even",
        p_k: list | tuple = (0.5, 0.0, 0.0, 0.0, 0.5),
        m: int | None = None,
        top1_mode: str = "sm",
        inverse_temperature: float | None = None,
        distribution: str = "logistic_phi",
        art_lambda: float = 0.5,
        sinkhorn_iterations: int = 100,
        sinkhorn_tolerance: float = 1e-6,
    ) -> None:
        super().__init__()
        if sorter not in SORTERS:
            raise ValueError(f"sorter must be one of {SORTERS}, got {sorter!r}")
        if top1_mode not in TOP1_MODES:
            raise ValueError(f"top1_mode must be one of {TOP1_MODES}, got {top1_mode!r}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        p_k = check_p_k(p_k)
        self.k = k = len(p_k)
        if num_classes < 2 * k:
            raise ValueError(f"num_classes={num_classes} < 2K={2 * k}: top-K with K={k} needs n >= 2K")
        if m is not None and not k < m < num_classes:
            raise ValueError(f"m={m} must satisfy K < m < n ({k} < m < {num_classes})")
        n_sort = m if m is not None else num_classes
        if inverse_temperature is None:
            inverse_temperature = DEFAULT_INVERSE_TEMPERATURE.get(sorter, 1.0 / n_sort)
        if inverse_temperature <= 0:
            raise ValueError(f"inverse_temperature must be > 0, got {inverse_temperature}")
        self.num_classes = num_classes
        self.sorter, self.p_k, self.m, self.top1_mode = sorter, p_k, m, top1_mode
        self.inverse_temperature = float(inverse_temperature)
        self.distribution, self.art_lambda = distribution, float(art_lambda)
        self.sinkhorn_iterations, self.sinkhorn_tolerance = sinkhorn_iterations, sinkhorn_tolerance
        self.n_sort = n_sort
        self.network = TorchNetwork(sorter, self.n_sort, k) if sorter in NETWORKS else None
        # weight of ascending top-K column j (rank r = K - j from the top):
        # sort: sum_{k >= r} p_k; sm/smce: the k = 1 term is handled separately.
        lo = 1 if top1_mode == "sort" else 2
        weights = [sum(p_k[max(r, lo) - 1:]) for r in range(k, 0, -1)]
        self.register_buffer("col_weights", torch.tensor(weights, dtype=torch.float64), persistent=False)
        self.topk_mass = sum(p_k) if top1_mode == "sort" else sum(p_k[1:])

    def extra_repr(self) -> str:
        return (f"n={self.num_classes}, sorter={self.sorter}, p_k={self.p_k}, m={self.m}, "
                f"top1_mode={self.top1_mode}, inverse_temperature={self.inverse_temperature}, "
                f"distribution={self.distribution}")

    # ------------------------------------------------------------------
    def topk_probability(self, s: torch.Tensor) -> torch.Tensor:
        """sum_j w_j P[b, j, :]: the (non-top-1-softmax) top-k mass of every class, [B, n].

        NeuralSort, SoftSort and Sinkhorn build the top-K rows of P; the networks need only the
        label's entry, which `network_label_mass` computes without any row of P.
        """
        k, it = self.k, self.inverse_temperature
        if self.sorter == "neuralsort":
            P = neuralsort_topk(s, k, it)
        elif self.sorter == "softsort":
            P = softsort_topk(s, k, it)
        else:
            P = sinkhorn_topk(s, k, it, self.sinkhorn_iterations, self.sinkhorn_tolerance)
        return (P * self.col_weights.to(s.dtype).view(1, -1, 1)).sum(1)

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s, labels = prepare_inputs(scores, labels, self.num_classes, None)
        if COMPILED and self.sorter in ("neuralsort", "softsort"):
            from losses.difftopk import sorter_kernels

            if sorter_kernels.fusable(s, self.sorter, self.n_sort):
                return sorter_kernels.compiled_sorter_loss(s, labels, self.m, self.sorter, self.col_weights,
                                                           self.p_k[0], self.topk_mass, self.top1_mode,
                                                           self.inverse_temperature)
        if self.m is not None:
            s, labels = preselect(s, labels, self.m)
        y = labels.unsqueeze(1)
        if self.topk_mass > 0 and self.network is not None:
            q = network_label_mass(s, labels, self.network, self.col_weights, self.inverse_temperature,
                                   self.distribution, self.art_lambda)
        elif self.topk_mass > 0:
            q = self.topk_probability(s).gather(1, y).squeeze(1)
        else:
            q = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
        if self.top1_mode == "sm":
            q = self.p_k[0] * torch.softmax(s, dim=-1).gather(1, y).squeeze(1) + q
        nll = -torch.log(q * (1 - 2e-7) + 1e-7)
        if self.top1_mode == "smce":
            return self.p_k[0] * F.cross_entropy(s, labels) + self.topk_mass * nll.mean()
        return nll.mean()
