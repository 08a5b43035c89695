"""Top-k SVMs (α, β and their Moreau-smoothed versions) and top-k entropy losses of Lapin et al.

References: M. Lapin, M. Hein, B. Schiele. "Top-k Multiclass SVM", NIPS 2015 (top-k SVM α,
top-k simplex, projection); "Loss functions for top-k error: analysis and insights", CVPR 2016
(top-k SVM β, smoothing, top-k entropy, truncated top-k entropy); "Analysis and optimization of
loss functions for multiclass, top-k, and multilabel classification", TPAMI 2018 (SDCA paper).

Notation (one sample): a_j = s_j − s_y, h_j = 1 + a_j for the N = n − 1 non-target classes j ≠ y,
v_[j] the j-th largest entry of v. Sets over x ∈ ℝ^N:

* top-k simplex      Δ_k^α = {x : 0 ≤ x_i ≤ (1/k)Σ_j x_j, Σ_j x_j ≤ 1},
* capped simplex     Δ_k^β = {x : 0 ≤ x_i ≤ 1/k,        Σ_j x_j ≤ 1}.

max_{x∈Δ_k^α} ⟨h,x⟩ = max{0, (1/k)Σ_{j≤k} h_[j]} and max_{x∈Δ_k^β} ⟨h,x⟩ = (1/k)Σ_{j≤k} (h_[j])_+
are the hard losses. Their Moreau (γ-strongly-convex conjugate) smoothing is

    L_γ(h) = max_{x∈Δ} ⟨h,x⟩ − (γ/2)‖x‖² = ⟨h,x*⟩ − (γ/2)‖x*‖²,  x* = proj_Δ(h/γ),

identical to the papers' (1/γ)(⟨h,p⟩ − ½‖p‖²) with p = proj_{Δ(γ)}(h); ∇_h L_γ = x* (Danskin),
which is what autograd returns here because x* enters detached. The projection is exact (up to
rounding): x = clip(v − t, 0, u) and the candidate (number m of capped entries, number l of free
entries) among the sorted entries is found by solving the KKT equations in closed form for every
candidate and keeping the one with the smallest constraint violation. The support is first
sought among the top max(4k, 32) entries (partial sort); rows that fail the KKT check (e.g. many
near-equal scores) are redone with a full sort. Cost O(B·(N + k·max(4k, 32))) in the common case.

CPU fast path (``losses.lapin_kernels``, ``losses.lapin_entropy_kernels``): on CPU, every loss here
(the SVMs with and without smoothing, both entropies) runs as compiled per-row kernels (numba) that
return the loss and its gradient together (the gradient in s_j is x*_j by Danskin, in s_y −Σx*; the
hard SVMs and the truncated entropy give the subgradient autograd gives), wrapped in an autograd
Function; the torch code below stays as ``torch_forward``, used on other devices (CUDA) and as the
tests' reference for the kernels.
Why: the torch version sorts or top-k-selects every row (torch's CPU sort and topk cost more than the
whole of cross-entropy) and builds up to ~30 [B, n] temporaries (float64 for the projections): 4–65×
the cost of cross-entropy at n = 1000; the kernels select the top k in one pass over each row and sort
only the few entries that can be in the support (≤ 3× cross-entropy at logit scales 1–30, ~1–2.5×).
Choices: the kernels compute in float64 scalars whatever the input precision (float32 inputs give
float32 losses and gradients, from float64 arithmetic); the entropies' exponentials come from torch's
vectorised softmax (the top-k entropy's exponents clamped below at −60 (float32) / −600 (float64)
relative to the k-th largest margin: this changes nothing above the working precision and keeps
subnormals out); at tied scores the hard SVMs and the truncated entropy pick the first columns (torch's
topk picks any); a NaN score gives its row a NaN loss and gradient; labels outside [0, n) raise
ValueError; the gradient is not differentiable again (double backward raises). The kernels are
single-threaded (torch's thread count does not apply).
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from harness.registry import Linear, Param, register_loss
from losses import lapin_entropy_kernels, lapin_kernels
from losses.common import check_k, working_precision

log = logging.getLogger(__name__)

_K = Param(int, 5, ge=1, doc="k of top-k (k < num_classes)")
_GAMMA = Param(float, 0.0, ge=0.0, doc="Moreau smoothing γ (0 = non-smooth)", search=Linear(0.0, 2.0))
_LAPIN16 = "Lapin, Hein, Schiele. Loss functions for top-k error: analysis and insights. CVPR 2016"
_LAPIN15 = "Lapin, Hein, Schiele. Top-k Multiclass SVM. NIPS 2015"


def _check_gamma(gamma: float) -> None:
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma={gamma!r} must be a finite float >= 0")


def _without_target(v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The [B, n−1] entries of v[B, n] other than the label column (order kept)."""
    cols = torch.arange(v.shape[1] - 1, device=v.device)[None, :]
    return v.gather(1, cols + (cols >= labels[:, None]).long())


def _margins(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """a\\y: the [B, n−1] differences s_j − s_y for j ≠ y."""
    s = working_precision(scores)
    return _without_target(s - s.gather(1, labels[:, None]), labels)


def _kkt_threshold(
    vs: torch.Tensor, k: int, cone: bool, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, t, violation): x = clip(v − t, 0, u) is the projection of each row of v.

    vs: the largest entries of each row, sorted descending; only the first n may be nonzero (if
    vs has n + 1 columns the last one is the next entry, and a violation > 0 then says that the
    true support is larger than n).

    cone=True: onto the top-k cone {0 ≤ x_i ≤ Σx/k} (u = Σx/k unknown).
    cone=False: onto {0 ≤ x_i ≤ 1/k, Σx = 1} (u = 1/k).
    With sorted v, the top m entries are capped (x = u), the next l free (x = v − t), the rest 0;
    the equations: cone: (k−m)u + l·t = S_M, m·u − (k−m)t = S_U; capped: m·u + S_M − l·t = 1.
    """
    v, b = vs, vs.shape[0]
    prefix = F.pad(vs[:, :n].cumsum(1), (1, 0))
    # vp[:, i] = v_[i] (1-based), +inf before the first and −inf after the last entry
    vp = F.pad(F.pad(vs, (1, 0), value=float("inf")), (0, 1), value=float("-inf"))
    best = torch.full((b,), float("inf"), dtype=v.dtype, device=v.device)
    best_u = torch.zeros(b, dtype=v.dtype, device=v.device)
    best_t = torch.zeros(b, dtype=v.dtype, device=v.device)
    for m in range(0, min(k, n) + 1):
        lf = torch.arange(0, n - m + 1, device=v.device, dtype=v.dtype)[None, :]
        s_u = prefix[:, m : m + 1]
        s_m = prefix[:, m:] - s_u
        if cone:
            det = -((k - m) ** 2) - lf * m
            if m == k:
                det[:, 0] = 1.0
            u = (-(k - m) * s_m - lf * s_u) / det
            t = ((k - m) * s_u - m * s_m) / det
            if m == k:  # l = 0: x = mean of the top k on k entries, t anywhere in an interval
                u[:, 0] = s_u[:, 0] / k
                t[:, 0] = vs[:, k - 1] - u[:, 0]
            bad = -u
        else:
            u = torch.full_like(s_m, 1.0 / k)
            t = (s_m + (m / k - 1.0)) / lf.clamp(min=1.0)
            bad = torch.zeros_like(s_m)
            if m == k:
                t[:, 0] = vs[:, k - 1] - 1.0 / k
            else:  # with no free entry the sum m/k cannot be 1
                bad[:, 0] = float("inf")
        if m >= 1:  # smallest capped entry above the cap
            bad = torch.maximum(bad, u + t - vs[:, m - 1 : m])
        if m < vs.shape[1]:  # largest uncapped entry below the cap
            bad = torch.maximum(bad, vs[:, m : m + 1] - t - u)
        # last free entry v_[m+l] above t (vacuous for l = 0), first zero v_[m+l+1] below t
        bad = torch.maximum(bad, t - vp[:, m : n + 1])
        bad = torch.maximum(bad, vp[:, m + 1 : n + 2] - t)
        val, idx = bad.min(dim=1, keepdim=True)
        better = val.squeeze(1) < best
        best = torch.where(better, val.squeeze(1), best)
        best_u = torch.where(better, u.gather(1, idx).squeeze(1), best_u)
        best_t = torch.where(better, t.gather(1, idx).squeeze(1), best_t)
    return best_u, best_t, best


Kernel = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _KernelLoss(torch.autograd.Function):
    """Per-row losses [B] from a CPU kernel that also returns their gradient [B, n] (saved for backward)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, labels: torch.Tensor, kernel: Kernel) -> torch.Tensor:  # type: ignore[override]
        loss, grad = kernel(scores.detach().contiguous(), labels)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype)[:, None], None, None


def _kernel_loss(scores: torch.Tensor, labels: torch.Tensor, kernel: Kernel) -> torch.Tensor | None:
    """Mean of the kernel's per-row losses for CPU scores [B ≥ 1, n]; None where the kernel does not apply
    (another device, an empty batch). Labels are checked here: the compiled kernels do not bound-check."""
    if scores.device.type != "cpu" or scores.dim() != 2 or scores.shape[0] == 0 or labels.device.type != "cpu":
        return None
    lab = labels.detach().to(torch.int64).contiguous()
    n = scores.shape[1]
    if lab.shape != (scores.shape[0],) or int(lab.min()) < 0 or int(lab.max()) >= n:
        raise ValueError(f"labels must be {scores.shape[0]} class indices in [0, {n}), got {_describe_labels(lab)}")
    return _KernelLoss.apply(working_precision(scores), lab, kernel).mean()


def _describe_labels(lab: torch.Tensor) -> str:
    return f"shape {tuple(lab.shape)}, range [{int(lab.min())}, {int(lab.max())}]" if lab.numel() else "none"


def _clip(v: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.minimum(torch.clamp(v - t[:, None], min=0.0), u[:, None])


def _project_rows(w: torch.Tensor, k: int, cone: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, t) from `_kkt_threshold` for every row of w (x = clip(w − t, 0, u)), exact.

    Sorting is the cost (torch's CPU sort is slow), so the support is first assumed to lie in the
    top max(4k, 32) entries (a partial sort by topk); rows whose KKT check fails with that
    assumption are redone with a full sort.
    """
    n = w.shape[1]
    width = min(n, max(4 * k, 32))
    vs = w.topk(min(n, width + 1), dim=1).values
    u, t, bad = _kkt_threshold(vs, k, cone, width)
    if width < n:
        tol = 1e-9 * (1.0 + w.abs().amax(1))
        redo = torch.nonzero(bad > tol).squeeze(1)
        if redo.numel():
            full = w.index_select(0, redo).sort(dim=1, descending=True).values
            ur, tr, _ = _kkt_threshold(full, k, cone, n)
            u, t = u.index_copy(0, redo, ur), t.index_copy(0, redo, tr)
    return u, t


@torch.no_grad()
def project_topk_simplex(v: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean projection of each row of v onto Δ_k^α = {0 ≤ x_i ≤ Σx/k, Σx ≤ 1}.

    First with the budget active, i.e. onto the capped simplex {0 ≤ x_i ≤ 1/k, Σx = 1}; that is
    the answer (KKT) when the budget multiplier ρ = t + (1/k)Σ_i (v_i − t − 1/k)_+ is ≥ 0. Rows
    with ρ < 0 have an inactive budget: their projection is the one onto the top-k cone
    {0 ≤ x_i ≤ Σx/k}.
    """
    w = v.double()
    u, t = _project_rows(w, k, cone=False)
    rho = t + torch.clamp(w - (t + u)[:, None], min=0.0).sum(1) / k
    rows = torch.nonzero(rho < 0).squeeze(1)
    if rows.numel():
        uc, tc = _project_rows(w.index_select(0, rows), k, cone=True)
        u, t = u.index_copy(0, rows, uc), t.index_copy(0, rows, tc)
    return _clip(w, t, u).to(v.dtype)


@torch.no_grad()
def project_capped_simplex(v: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean projection of each row of v onto Δ_k^β = {0 ≤ x_i ≤ 1/k, Σx ≤ 1}."""
    w = v.double()
    x = torch.clamp(w, 0.0, 1.0 / k)
    over = x.sum(1) > 1.0
    if bool(over.any()):
        u, t = _project_rows(w, k, cone=False)
        x = torch.where(over[:, None], _clip(w, t, u), x)
    return x.to(v.dtype)


class _TopKSVM(nn.Module):
    """Shared construction and smoothing of the top-k SVMs."""

    def __init__(self, num_classes: int, k: int = 5, gamma: float = 0.0) -> None:
        super().__init__()
        check_k(k, num_classes)
        _check_gamma(gamma)
        self.num_classes, self.k, self.gamma = num_classes, k, float(gamma)

    def _hard(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _project(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    _alpha = False

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.gamma > 0.0:
            kernel = partial(lapin_kernels.svm_rows, k=self.k, gamma=self.gamma, alpha=self._alpha)
        else:
            kernel = partial(lapin_kernels.hard_svm_rows, k=self.k, alpha=self._alpha)
        out = _kernel_loss(scores, labels, kernel)
        return self.torch_forward(scores, labels) if out is None else out

    def torch_forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The pure-torch path (any device; CUDA uses it, and the tests check the CPU kernel against it)."""
        h = 1.0 + _margins(scores, labels)
        if self.gamma == 0.0:
            return self._hard(h).mean()
        x = self._project(h.detach() / self.gamma)
        return ((h * x).sum(1) - 0.5 * self.gamma * (x * x).sum(1)).mean()


@register_loss(
    "lapin_svm_alpha",
    family="lapin",
    paper=_LAPIN15 + "; " + _LAPIN16,
    version=1,
    params={"k": _K, "gamma": _GAMMA},
)
class TopKSVMAlpha(_TopKSVM):
    """Top-k SVM α: max{0, (1/k)Σ_{j≤k} h_[j]}; γ > 0: Moreau-smoothed over the top-k simplex."""

    _alpha = True

    def _hard(self, h: torch.Tensor) -> torch.Tensor:
        return torch.clamp(h.topk(self.k, dim=1).values.sum(1) / self.k, min=0.0)

    def _project(self, v: torch.Tensor) -> torch.Tensor:
        return project_topk_simplex(v, self.k)


@register_loss(
    "lapin_svm_beta",
    family="lapin",
    paper=_LAPIN16,
    version=1,
    params={"k": _K, "gamma": _GAMMA},
)
class TopKSVMBeta(_TopKSVM):
    """Top-k SVM β: (1/k)Σ_{j≤k} (h_[j])_+; γ > 0: Moreau-smoothed over the capped simplex."""

    def _hard(self, h: torch.Tensor) -> torch.Tensor:
        return torch.clamp(h.topk(self.k, dim=1).values, min=0.0).sum(1) / self.k

    def _project(self, v: torch.Tensor) -> torch.Tensor:
        return project_capped_simplex(v, self.k)


@register_loss(
    "lapin_entropy",
    family="lapin",
    paper=_LAPIN16,
    version=1,
    params={"k": _K},
)
class TopKEntropy(nn.Module):
    """Top-k entropy: max_{x∈Δ_k^α} ⟨a\\y, x⟩ − (1−s)log(1−s) − ⟨x, log x⟩, s = Σx (k=1: softmax).

    The target class carries probability 1 − s, the N = n−1 others x ∈ Δ_k^α (Lapin 2016, eq. for
    the top-k entropy loss; for k = 1 the cap is vacuous and the value is log(1 + Σ_j e^{a_j})).
    Closed form (derived from the KKT conditions): if the m largest a_j (m < k) sit at the cap
    x = s/k and the others are x_j = (1−s)·e^{a_j + c}, then with S_m = Σ_{j≤m} a_[j] and
    Z_m = Σ_{j>m} e^{a_[j]},
        w = (S_m + (k−m)(log Z_m − log(k−m)))/k,  c = (S_m − m·w)/(k−m),  τ = w − c,
    and the consistent m is the one with a_[m] ≥ τ ≥ a_[m+1]; the loss is then log(1 + k·e^w)
    (= −log(1 − s)). Only the top k entries are sorted: O(B·(n + k log k)).
    """

    def __init__(self, num_classes: int, k: int = 5) -> None:
        super().__init__()
        check_k(k, num_classes)
        self.num_classes, self.k = num_classes, k

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = _kernel_loss(scores, labels, partial(lapin_entropy_kernels.entropy_rows, k=self.k))
        return self.torch_forward(scores, labels) if out is None else out

    def torch_forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The pure-torch path (any device; CUDA uses it, and the tests check the CPU kernel against it)."""
        a = _margins(scores, labels)
        k, n = self.k, a.shape[1]
        top, idx = a.topk(k, dim=1)  # sorted, descending
        rev = top.flip(1).logcumsumexp(1).flip(1)  # rev[:, m] = log Σ_{m ≤ j < k} e^{top_j}
        if n > k:
            tail = a.scatter(1, idx, float("-inf")).logsumexp(1, keepdim=True)
            log_z = torch.logaddexp(rev, tail)
        else:
            log_z = rev
        ms = torch.arange(k, device=a.device, dtype=a.dtype)[None, :]
        s_u = F.pad(top.cumsum(1), (1, 0))[:, :k]
        w = (s_u + (k - ms) * (log_z - torch.log(k - ms))) / k
        tau = w - (s_u - ms * w) / (k - ms)
        with torch.no_grad():
            bad = torch.clamp(top - tau, min=0.0)  # a_[m+1] ≤ τ
            above = F.pad(top[:, :-1], (1, 0), value=float("inf"))
            bad = torch.maximum(bad, torch.clamp(tau - above, min=0.0))  # a_[m] ≥ τ
            m_star = bad.argmin(dim=1, keepdim=True)
        w_star = w.gather(1, m_star).squeeze(1)
        return torch.logaddexp(torch.zeros_like(w_star), w_star + math.log(k)).mean()


@register_loss(
    "lapin_truncated_entropy",
    family="lapin",
    paper=_LAPIN16,
    version=1,
    params={"k": _K},
)
class TruncatedTopKEntropy(nn.Module):
    """Truncated top-k entropy log(1 + Σ_{j≥k} e^{(a\\y)_[j]}): the k−1 largest a_j are dropped.

    Non-convex but top-k calibrated (Lapin 2016); k = 1 is softmax cross-entropy. Computed as
    logsumexp of s over y and the kept classes, minus s_y (the dropped set gets no gradient).
    """

    def __init__(self, num_classes: int, k: int = 5) -> None:
        super().__init__()
        check_k(k, num_classes)
        self.num_classes, self.k = num_classes, k

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = _kernel_loss(scores, labels, partial(lapin_entropy_kernels.truncated_entropy_rows, k=self.k))
        return self.torch_forward(scores, labels) if out is None else out

    def torch_forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The pure-torch path (any device; CUDA uses it, and the tests check the CPU kernel against it)."""
        s = working_precision(scores)
        s_y = s.gather(1, labels[:, None]).squeeze(1)
        if self.k > 1:
            with torch.no_grad():
                others = s.detach().scatter(1, labels[:, None], float("-inf"))
                drop = others.topk(self.k - 1, dim=1).indices
                mask = torch.zeros_like(s, dtype=torch.bool).scatter(1, drop, True)
            s = s.masked_fill(mask, float("-inf"))
        return (s.logsumexp(1) - s_y).mean()
