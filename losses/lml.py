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


def _label_rows(e: np.ndarray, k: float, lo: np.ndarray, hi: np.ndarray, ey: np.ndarray, out: np.ndarray,
                state: np.ndarray) -> None:
    """Per row of e = exp(x − max x) [B, n] (float64): t = e^{ν − max x} with Σ_i e_i/(e_i + t) = k by Halley's
    method on log Σ in u = log t, kept inside the bracket [lo, hi] (bisection where a step leaves it), to
    |Σ − k| ≤ 1e−12·n (or one last step once a step is ≤ 1e−4 in u, where the logistic's unit width makes
    the cubically convergent next one exact to rounding; not evaluated); the label's probability
    e_y/(e_y + t) into out, t into state [B].

    Σ_i σ(x_i − ν) = Σ e_i/(e_i + t): one division per score and step, no exp (the exps are the caller's
    one vectorised pass), a loop numba vectorises (error_model="numpy": no zero-division branch). log Σ
    is nearly linear in u where the masses are small, so Halley on it from the upper end of the bracket
    takes two to six steps."""
    batch, n = e.shape
    tol = 1e-12 * n
    for row in range(batch):
        x = e[row]
        a, b = lo[row], hi[row]
        u = b
        for _ in range(MAX_STEPS):
            t = np.exp(u)
            f, slope, curve = 0.0, 0.0, 0.0  # F, −F', F''
            for i in range(n):
                p = x[i] / (x[i] + t)
                q = p - p * p
                f += p
                slope += q
                curve += q - 2 * p * q
            if abs(f - k) <= tol:
                break
            if f > k:
                a = u
            else:
                b = u
            if slope > 0 and f > 0:  # Halley on g(u) = log F − log k: g' = −slope/F, g'' = curve/F − g'²
                g, g1 = np.log(f / k), -slope / f
                g2 = curve / f - g1 * g1
                step = u - 2 * g * g1 / (2 * g1 * g1 - g * g2)
            else:
                step = 0.5 * (a + b)
            last = a < step < b and abs(step - u) <= 1e-4  # Halley from |Δu| ≤ 1e−4 (unit logistic width): exact
            u = step if a < step < b else 0.5 * (a + b)
            if last or b - a <= 1e-15 * max(1.0, abs(u)):
                break
        t = np.exp(u)
        out[row] = ey[row] / (ey[row] + t)
        state[row] = t


def _label_backward(e: np.ndarray, state: np.ndarray, g: np.ndarray, p_y: np.ndarray, out: np.ndarray) -> None:
    """(Jᵀg)_j = d_j·(δ_jy·g − d_y·g/Σd), d = p(1 − p), p_j = e_j/(e_j + t_b), for g[b] at the label only (the
    label's own term is the caller's); out in its dtype, Σd in float64."""
    batch, n = e.shape
    for row in range(batch):
        t = state[row]
        total = 0.0
        for j in range(n):
            p = e[row, j] / (e[row, j] + t)
            d = p - p * p
            total += d
            out[row, j] = d
        d_y = p_y[row] - p_y[row] * p_y[row]
        c = -(d_y * g[row] / total) if total > 0 else 0.0
        for j in range(n):
            out[row, j] *= c


_LABEL_KERNELS: dict = {}


def _label_kernels() -> dict:
    if not _LABEL_KERNELS:
        import numba

        # error_model="numpy": no zero-division checks, so the division loops vectorise (no divisor is 0 here)
        options = {"cache": True, "nogil": True, "error_model": "numpy", "fastmath": {"reassoc", "contract"}}
        _LABEL_KERNELS["rows"] = numba.njit(**options)(_label_rows)
        _LABEL_KERNELS["backward"] = numba.njit(**options)(_label_backward)
    return _LABEL_KERNELS


class _LMLAt(torch.autograd.Function):
    """(x [B, n] float32/64 on the CPU, rows spanning ≤ FAST_RANGE, k, index [B]) -> LML_k(x)[b, index[b]], [B].

    Backward (implicit function, as ``_LML``) for a gradient at the label only: with d = p(1 − p),
    (Jᵀg)_j = d_j·(δ_jy·g − d_y·g/Σd), from the saved e = exp(x − max x) and t (two passes over the row)."""

    @staticmethod
    def forward(ctx, x, k: float, index, top, low):  # type: ignore[override]
        kernels = _label_kernels()
        x64 = x.detach().numpy().astype(np.float64)
        top, low = top.astype(np.float64), low.astype(np.float64)
        x64 -= top[:, None]
        np.exp(x64, out=x64)  # e = exp(x − max): one vectorised pass
        n = x64.shape[1]
        rows = np.arange(x64.shape[0])
        idx = index.numpy()
        log_ratio = np.log(k / (n - k))
        lo = low - top - log_ratio  # u = ν − max x within [min x, max x] − logit(k/n)
        hi = np.minimum(-log_ratio, np.log(x64.sum(1) / k))  # Σ e/(e+t) ≤ Σ e/t: an upper bound too
        lo = np.minimum(lo, hi)
        out = np.empty(x64.shape[0])
        state = np.empty(x64.shape[0])
        kernels["rows"](x64, float(k), lo, hi, np.ascontiguousarray(x64[rows, idx]), out, state)
        ctx.save_for_backward(torch.from_numpy(x64), torch.from_numpy(state), torch.from_numpy(out), index)
        ctx.dtype = x.dtype
        return torch.from_numpy(out).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        e, state, p_y, index = ctx.saved_tensors
        g = np.ascontiguousarray(grad.detach().double().numpy())
        out = np.empty(tuple(e.shape), dtype=np.float32 if ctx.dtype == torch.float32 else np.float64)
        _label_kernels()["backward"](e.numpy(), state.numpy(), g, p_y.numpy(), out)
        p = p_y.numpy()
        out[np.arange(out.shape[0]), index.numpy()] += p * (1 - p) * g
        return torch.from_numpy(out), None, None, None, None


def lml_at(x: torch.Tensor, k: float, index: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``lml(x, k, tau)`` at one class per row (index [B]), [B]; on the CPU without the [B, n] output."""
    n = x.shape[1]
    if not 0 < k < n:
        raise ValueError(f"LML needs 0 < k < n={n}, got k={k}")
    y = x if tau == 1 else x / tau
    if y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64):
        values = y.detach().numpy()
        top, low = values.max(1), values.min(1)
        if float((top - low).max()) <= FAST_RANGE:  # (NaN fails too) else the general path
            return _LMLAt.apply(y, float(k), index.long(), top, low)
    return _LML.apply(y, float(k)).gather(1, index.view(-1, 1)).squeeze(1)


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
        return sum(w * lml_at(s, k, labels, self.tau) for k, w in zip(ks, weights))
