"""The label's top-K mass through a relaxed sorting network, compiled for the CPU (numba).

The same computation as the torch path of ``losses.difftopk.label_mass`` (see there for the
formulas), one sample at a time: at m = 16 a network has ≤ 120 comparators, so the torch path is
hundreds of tiny ops (a gather, a relaxation and two index_copy per layer, forward and backward)
whose overhead is all of its time. Here the comparators of all layers run as one flat list (a
layer's comparators touch disjoint wires, so running them one after another is the layer), the
forward saves α, F'(v) and the two differences z_a − z_b (values and label mass) per comparator,
and the backward is the exact reverse sweep of the torch path. float32 scores are computed in
float64 and rounded once at the end (so float32 results are closer to float64 than the torch
path's; the difference is float32 rounding).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from losses.difftopk.relaxations import _ART_EPS, DISTRIBUTIONS

_COMPILED = False
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


def _swap(v: float, code: int, steepness: float, lam: float) -> tuple[float, float]:
    """(α, dα/dv) of ``relaxations.swap_probability_and_slope`` for one comparator (code: index in DISTRIBUTIONS)."""
    x = v * steepness
    if code == 2:  # logistic_phi: u = β v w, w = (|v|+ε)^-λ
        base = abs(v) + _ART_EPS
        if lam == 0.5:
            w = 1.0 / math.sqrt(base)
        elif lam == 0.0:
            w = 1.0
        else:
            w = base ** (-lam)
        alpha = 1.0 / (1.0 + math.exp(-(x * w)))
        return alpha, alpha * (1.0 - alpha) * w * (1.0 - lam * (1.0 - _ART_EPS / base)) * steepness
    if code == 1:  # logistic
        alpha = 1.0 / (1.0 + math.exp(-x))
        return alpha, steepness * alpha * (1.0 - alpha)
    if code == 3:  # gaussian, written as the reference does
        return 0.5 + 0.5 * math.erf(v / (1.0 / steepness) / _SQRT2), steepness * math.exp(-0.5 * x * x) / _SQRT2PI
    if code == 4:  # reciprocal
        d = 2.0 + abs(x)
        return 0.5 + 0.5 * x / d, steepness / (d * d)
    if code == 0:  # cauchy
        return math.atan(x) / math.pi + 0.5, steepness / (math.pi * (1.0 + x * x))
    # optimal (Petersen et al. 2022): x + 1/2 on |x| <= 1/4, 1 - 1/(16x) above, 1/(16|x|) below
    ax = abs(x)
    if x > 0.25:
        return 1.0 - 1.0 / (16.0 * ax), steepness * (1.0 / (16.0 * ax * ax))
    if x < -0.25:
        return 1.0 / (16.0 * ax), steepness * (1.0 / (16.0 * ax * ax))
    return x + 0.5, steepness


def _forward_rows(x: np.ndarray, labels: np.ndarray, ca: np.ndarray, cb: np.ndarray, cmin: np.ndarray,
                  cmax: np.ndarray, weights: np.ndarray, code: int, steepness: float, lam: float,
                  saved: np.ndarray, out: np.ndarray) -> None:
    """out[s] = Σ_j weights[j]·q[n−K+j] after the network; saved[s, c] = (α, F'(v), x_a − x_b, q_a − q_b)."""
    batch, n = x.shape
    k = weights.shape[0]
    zx = np.empty(n)
    zq = np.empty(n)
    for s in range(batch):
        for i in range(n):
            zx[i] = x[s, i]
            zq[i] = 0.0
        zq[labels[s]] = 1.0
        for c in range(ca.shape[0]):
            a = ca[c]
            b = cb[c]
            xa = zx[a]
            xb = zx[b]
            qa = zq[a]
            qb = zq[b]
            dx = xa - xb
            dq = qa - qb
            alpha, slope = _swap(-dx, code, steepness, lam)
            shift = alpha * dx
            zx[cmin[c]] = xb + shift  # α·x_a + (1−α)·x_b
            zx[cmax[c]] = xa - shift
            shift = alpha * dq
            zq[cmin[c]] = qb + shift
            zq[cmax[c]] = qa - shift
            saved[s, c, 0] = alpha
            saved[s, c, 1] = slope
            saved[s, c, 2] = dx
            saved[s, c, 3] = dq
        acc = 0.0
        for j in range(k):
            acc += weights[j] * zq[n - k + j]
        out[s] = acc


def _backward_rows(grad_out: np.ndarray, ca: np.ndarray, cb: np.ndarray, cmin: np.ndarray, cmax: np.ndarray,
                   weights: np.ndarray, saved: np.ndarray, grad: np.ndarray) -> None:
    """grad[s] = d out[s] / d x[s] · grad_out[s]: the reverse sweep over the saved comparators."""
    batch, n = grad.shape
    k = weights.shape[0]
    gx = np.empty(n)
    gq = np.empty(n)
    for s in range(batch):
        for i in range(n):
            gx[i] = 0.0
            gq[i] = 0.0
        for j in range(k):
            gq[n - k + j] = weights[j] * grad_out[s]
        for c in range(ca.shape[0] - 1, -1, -1):
            alpha = saved[s, c, 0]
            lo = cmin[c]
            hi = cmax[c]
            gx_min = gx[lo]
            gx_max = gx[hi]
            gq_min = gq[lo]
            gq_max = gq[hi]
            gdx = gx_min - gx_max
            gdq = gq_min - gq_max
            gv = (saved[s, c, 2] * gdx + saved[s, c, 3] * gdq) * saved[s, c, 1]  # g_α·F'(v)
            shift = alpha * gdx
            a = ca[c]
            b = cb[c]
            gx[a] = (gx_max + shift) - gv  # α·G_min + (1−α)·G_max, and v = x_b − x_a
            gx[b] = (gx_min - shift) + gv
            shift = alpha * gdq
            gq[a] = gq_max + shift
            gq[b] = gq_min - shift
        for i in range(n):
            grad[s, i] = gx[i]


def _compile() -> None:
    """Compile the kernels once (numba, cached on disk); imported lazily so `import losses` stays fast."""
    global _COMPILED
    if not _COMPILED:
        import numba

        globals()["_swap"] = numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")(_swap)
        for name in ("_forward_rows", "_backward_rows"):
            globals()[name] = numba.njit(cache=True, nogil=True, error_model="numpy")(globals()[name])
        _COMPILED = True


class CompiledLabelMass(torch.autograd.Function):
    """``Σ_j w_j·P[b, n−K+j, y_b]`` for CPU float32/float64 scores, one compiled call forward and backward."""

    @staticmethod
    def forward(ctx, x, labels, comparators, weights, steepness: float, distribution: str,
                art_lambda: float):  # type: ignore[override]
        _compile()
        x64 = x.detach().to(torch.float64).contiguous().numpy()
        w = np.ascontiguousarray(weights.detach().to(torch.float64).numpy())
        saved = np.empty((x64.shape[0], comparators[0].shape[0], 4))
        out = np.empty(x64.shape[0])
        _forward_rows(x64, np.ascontiguousarray(labels.numpy(), dtype=np.int64), *comparators, w,
                      DISTRIBUTIONS.index(distribution), float(steepness), float(art_lambda), saved, out)
        ctx.comparators, ctx.w, ctx.saved, ctx.n = comparators, w, saved, x64.shape[1]
        return torch.from_numpy(out).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        g = np.ascontiguousarray(grad_out.detach().to(torch.float64).numpy())
        grad = np.empty((g.shape[0], ctx.n))
        _backward_rows(g, *ctx.comparators, ctx.w, ctx.saved, grad)
        return torch.from_numpy(grad).to(grad_out.dtype), None, None, None, None, None, None
