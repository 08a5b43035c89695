"""The Limited Multi-Label projection (Amos, Koltun, Kolter 2019) and its top-k loss.

B. Amos, V. Koltun, J. Z. Kolter. "The Limited Multi-Label Projection Layer", arXiv:1906.08707
(2019). LML_k(x) projects scores onto {p ∈ [0, 1]ⁿ : Σ p = k} with a binary-entropy regulariser,

    p = argmax_{0 ≤ p ≤ 1, Σp = k} ⟨x/τ, p⟩ + Σ_i H_b(p_i)  =  σ(x/τ − ν)  with Σ_i σ(x_i/τ − ν) = k,

i.e. one scalar ν per sample, the root of a decreasing function: found by Newton's method inside a
bisection bracket [min x/τ − logit(k/n), max x/τ − logit(k/n)] (Newton steps that leave the bracket
become bisection steps), in float64, to |Σp − k| ≤ 1e−12·n; at most 100 steps per sample, compiled
(numba, CPU; each sample stops on its own — a batched torch loop waits for its slowest sample).
Backward by the implicit-function theorem (the paper's): with d = p(1 − p),
Jᵀg = (d∘g − d·⟨d, g⟩/Σd)/τ, O(n).

Choices the paper leaves open, and ours:
* Loss: the paper's top-k classification loss −log LML_k(x)_y, written as the top-k cross-entropy of
  ``losses.topk_ce`` with P_K = one-hot at k = 5 and ``top1_mode=sort`` (so the 1e−7 clamp of that
  module applies); any other P_K mixes one projection per k.
* τ (``tau``) = 1 is the paper's layer; τ → 0 gives the hard top-k mask.
"""
from __future__ import annotations

import numpy as np
import torch

from harness.registry import Log, Param, register_loss
from losses.topk_ce import TopKCrossEntropy, topk_ce_params

MAX_STEPS = 100
FAST_RANGE = 600.0  # rows whose scores span at most this use the exp-free Newton steps (no overflow)


def _newton(y, k: float, lo: float, hi: float, scaled, shift: float, fast: bool) -> float:
    """ν in [lo, hi] with Σ_i σ(y_i − ν) = k: Newton inside the bisection bracket, to |f| ≤ 1e−12·n.

    ``fast``: σ(y_i − ν) = 1/(1 + e^{ν−c}·scaled_i) with scaled_i = e^{c−y_i} precomputed (c = ``shift``),
    so a step is one exp and n divisions (vectorised) instead of n exps; exact to rounding while
    |y_i − c| and |ν − c| stay below 350 (rows spanning ≤ FAST_RANGE).
    """
    n = y.shape[0]
    tol = 1e-12 * n
    nu = 0.5 * (lo + hi)
    for _ in range(MAX_STEPS):
        f, slope = -k, 0.0
        if fast:
            t = np.exp(nu - shift)
            for i in range(n):
                p = 1.0 / (1.0 + t * scaled[i])
                f += p
                slope += p * (1.0 - p)
        else:
            for i in range(n):
                p = 1.0 / (1.0 + np.exp(nu - y[i]))
                f += p
                slope += p * (1.0 - p)
        if abs(f) <= tol:
            break
        if f > 0:
            lo = nu
        else:
            hi = nu
        step = nu + f / slope if slope > 0 else 0.5 * (lo + hi)
        nu = step if lo < step < hi else 0.5 * (lo + hi)
        if hi - lo <= 1e-15 * max(1.0, abs(nu)):
            break
    return nu


def _solve_rows(y: np.ndarray, k: float, scaled: np.ndarray, shift: np.ndarray, out: np.ndarray,
                probs: np.ndarray) -> None:
    """ν per row of y [B, n] (float64) with Σ_i σ(y_i − ν) = k, and σ(y − ν) into probs (its dtype).

    ``scaled`` = e^{shift − y} [B, n] for the rows that span ≤ FAST_RANGE (the others: exact exps).
    """
    batch, n = y.shape
    log_ratio = np.log(k / (n - k))
    for row in range(batch):
        x = y[row]
        lo, hi = x.min() - log_ratio, x.max() - log_ratio  # f(lo) ≥ 0 ≥ f(hi)
        fast = hi - lo <= FAST_RANGE
        nu = _newton(x, k, lo, hi, scaled[row], shift[row], fast)
        out[row] = nu
        if fast:
            t = np.exp(nu - shift[row])
            for i in range(n):
                probs[row, i] = 1.0 / (1.0 + t * scaled[row, i])
        else:
            for i in range(n):
                probs[row, i] = 1.0 / (1.0 + np.exp(nu - x[i]))


_KERNEL = None


def _project(y: torch.Tensor, k: float) -> torch.Tensor:
    """σ(y − ν) [B, n] in y's dtype with Σ_i σ(y_i − ν) = k per row; solved in float64 (compiled, CPU)."""
    global _KERNEL
    if _KERNEL is None:
        import numba

        globals()["_newton"] = numba.njit(cache=True, fastmath={"reassoc", "contract"})(_newton)
        _KERNEL = numba.njit(cache=True)(_solve_rows)
    y64 = np.ascontiguousarray(y.detach().cpu().double().numpy())
    shift = 0.5 * (y64.min(1) + y64.max(1)) - np.log(k / (y64.shape[1] - k))  # the first Newton point
    with np.errstate(over="ignore", invalid="ignore"):  # rows too wide for the fast path do not read it
        scaled = np.exp(np.clip(shift[:, None] - y64, -FAST_RANGE, FAST_RANGE))
    nu = np.empty(y64.shape[0])
    probs = np.empty(y64.shape, dtype=np.float32 if y.dtype == torch.float32 else np.float64)
    _KERNEL(y64, float(k), scaled, shift, nu, probs)
    return torch.from_numpy(probs).to(device=y.device, dtype=y.dtype)


class _LML(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, k: float):  # type: ignore[override]
        p = _project(y, k)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (p,) = ctx.saved_tensors
        d = p * (1 - p)
        total = d.sum(1, keepdim=True)
        coupling = torch.where(total > 0, (d * grad).sum(1, keepdim=True) / total.clamp_min(1e-300), 0)
        return d * (grad - coupling), None


def lml(x: torch.Tensor, k: float, tau: float = 1.0) -> torch.Tensor:
    """LML_k(x/τ): [B, n] in [0, 1] with rows summing to k (0 < k < n)."""
    n = x.shape[1]
    if not 0 < k < n:
        raise ValueError(f"LML needs 0 < k < n={n}, got k={k}")
    return _LML.apply(x / tau, float(k))


@register_loss(
    "lml",
    family="lml",
    paper="Amos, Koltun, Kolter. The Limited Multi-Label Projection Layer. arXiv:1906.08707, 2019",
    version=1,
    contract={"params": {"p_k": [0.5, 0.5]}, "min_classes": 3},  # harness.testing: K = len(p_k) < n
    params={**topk_ce_params([0.0, 0.0, 0.0, 0.0, 1.0], "sort"),
            "tau": Param(float, 1.0, gt=0.0, doc="temperature τ of the entropic projection",
                         search=Log(1e-2, 10.0))},
)
class LMLLoss(TopKCrossEntropy):
    """−log LML_k(s/τ)_y (P_K one-hot at k = 5 by default; other P_K mix one projection per k)."""

    def __init__(self, num_classes: int, p_k: list | tuple = (0.0, 0.0, 0.0, 0.0, 1.0), m: int | None = None,
                 top1_mode: str = "sort", tau: float = 1.0) -> None:
        super().__init__(num_classes, p_k, m, top1_mode)
        if not tau > 0:
            raise ValueError(f"tau={tau} must be > 0")
        self.tau = float(tau)

    def label_mass(self, s: torch.Tensor, labels: torch.Tensor, ks: list[int], weights: list[float]) -> torch.Tensor:
        y = labels.unsqueeze(1)
        return sum(w * lml(s, k, self.tau).gather(1, y).squeeze(1) for k, w in zip(ks, weights))
