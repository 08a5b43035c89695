"""Top-k cross-entropy over a soft top-k operator, shared by the operator losses (soft_topk, lapsum, …).

Petersen et al. (ICML 2022) turn any differentiable top-k into a classification loss: with a
distribution P_K over k ∈ {1..K} and m_k(s) ∈ [0, 1]^n a soft top-k mask (hard limit: the indicator
of the k largest scores),

    q = Σ_k P_K(k)·m_k(s)_y,     L = −log(q·(1 − 2e−7) + 1e−7),

averaged over the batch (the clamp is the reference code's). ``top1_mode`` as in ``difftopk``:
``sort`` uses the operator for k = 1 too, ``sm`` replaces the k = 1 term by P_K(1)·softmax(s)_y,
``smce`` adds P_K(1)·CE to P_K(k≥2)-weighted −log of the rest. Top-m preselection (``m``) keeps s_y
and the m − 1 largest other scores (the label becomes class 0), as ``difftopk`` does.

A subclass implements ``label_mass(s, labels, ks, weights)``: Σ_j weights[j]·m_{ks[j]}(s)_y, [B].
The P_K mixture Σ_k P_K(k)·1[rank ≤ k] equals Σ_r w_r·1[rank = r] with w_r = Σ_{k ≥ r} P_K(k)
(``rank_weights``), which operators that see every rank at once (permutahedron projections, sorted
OT) use instead of one solve per k.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.registry import Param
from losses.common import check_p_k, working_precision
from losses.select import top_other_indices

TOP1_MODES = ("sort", "sm", "smce")
DEFAULT_P_K = [0.5, 0.0, 0.0, 0.0, 0.5]


def topk_ce_params(p_k: list[float] | None = None, top1_mode: str = "sm") -> dict[str, Param]:
    """The shared parameters (P_K, m, top1_mode) with the given defaults."""
    return {
        "p_k": Param(list, list(p_k or DEFAULT_P_K), doc="P_K over k=1..K (non-negative, sums to 1)"),
        "m": Param(int, None, optional=True, ge=2, doc="top-m preselection (K < m < n); None = all classes"),
        "top1_mode": Param(str, top1_mode, choices=TOP1_MODES, doc="how the k=1 term is computed"),
    }


def preselect(s: torch.Tensor, labels: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[s_y, the m−1 largest other scores (descending)]; the label becomes class 0."""
    idx = top_other_indices(s, labels, m - 1)
    return s.gather(1, torch.cat([labels.unsqueeze(1), idx], 1)), torch.zeros_like(labels)


def prepare_inputs(scores: torch.Tensor, labels: torch.Tensor, num_classes: int,
                   m: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check scores are [B, num_classes], move them to the working precision, and apply top-m
    preselection when ``m`` is set: the scores and labels every preselecting loss computes on."""
    if scores.dim() != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"scores must be [B, {num_classes}], got {tuple(scores.shape)}")
    s, labels = working_precision(scores), labels.long()
    return (s, labels) if m is None else preselect(s, labels, m)


class TopKCrossEntropy(nn.Module):
    """−log Σ_k P_K(k)·m_k(s)_y for a soft top-k operator m_k supplied by the subclass."""

    #: smallest n the operator needs relative to K (K < n by default)
    def __init__(self, num_classes: int, p_k: list | tuple = tuple(DEFAULT_P_K), m: int | None = None,
                 top1_mode: str = "sm") -> None:
        super().__init__()
        if top1_mode not in TOP1_MODES:
            raise ValueError(f"top1_mode must be one of {TOP1_MODES}, got {top1_mode!r}")
        p_k = check_p_k(p_k)
        k = len(p_k)
        if num_classes < 2 or k >= num_classes:
            raise ValueError(f"K=len(p_k)={k} must satisfy K < num_classes={num_classes}")
        if m is not None and not k < m < num_classes:
            raise ValueError(f"m={m} must satisfy K < m < n ({k} < m < {num_classes})")
        self.num_classes, self.p_k, self.m, self.top1_mode, self.k = num_classes, p_k, m, top1_mode, k
        self.n_op = m if m is not None else num_classes  # classes the operator sees
        first = 0 if top1_mode == "sort" else 1  # the k = 1 term: operator or softmax
        self.ks = [j + 1 for j in range(first, k) if p_k[j] > 0]
        self.kweights = [p_k[j - 1] for j in self.ks]
        self.topk_mass = sum(self.kweights)

    def rank_weights(self, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """w_r = Σ_{k ≥ r, k in ks} P_K(k) for ranks r = 1..n (descending order), [n]."""
        w = torch.zeros(n, dtype=torch.float64)
        for k, p in zip(self.ks, self.kweights):
            w[:k] += p
        return w.to(dtype=dtype, device=device)

    def label_mass(self, s: torch.Tensor, labels: torch.Tensor, ks: list[int], weights: list[float]) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"n={self.num_classes}, p_k={self.p_k}, m={self.m}, top1_mode={self.top1_mode}"

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s, labels = prepare_inputs(scores, labels, self.num_classes, self.m)
        if self.topk_mass > 0:
            q = self.label_mass(s, labels, self.ks, self.kweights)
        else:
            q = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
        if self.top1_mode == "sm":
            q = self.p_k[0] * torch.softmax(s, dim=-1).gather(1, labels.unsqueeze(1)).squeeze(1) + q
        nll = -torch.log(q * (1 - 2e-7) + 1e-7)
        if self.top1_mode == "smce":
            return self.p_k[0] * F.cross_entropy(s, labels) + self.topk_mass * nll.mean()
        return nll.mean()
