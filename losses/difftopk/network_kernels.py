"""The label's top-K mass through a relaxed sorting network, compiled for the CPU (numba).

The same computation as the torch path of ``losses.difftopk.label_mass`` (see there for the
formulas): at m = 16 a network has ≤ 120 comparators, so the torch path is hundreds of tiny ops (a
gather, a relaxation and two index_copy per layer, forward and backward) whose overhead is all of
its time. Here the comparators of all layers run as one flat list (a layer's comparators touch
disjoint wires, so running them one after another is the layer), each over the whole batch at once
(wire-major state ``[n, B]``), so that the relaxation — the costly part — is a loop over samples that
LLVM vectorises: the logistic relaxations use `_exp`, a polynomial exp (≤ 2 ulp from libm's; libm's
scalar exp would stop the vectorisation). The forward saves α, F'(v) and the two differences
z_a − z_b (values and label mass) per comparator and sample; the backward is the exact reverse
sweep of the torch path. float32 scores are computed in float64 and rounded once at the end (so
float32 results are closer to float64 than the torch path's; the difference is float32 rounding).
This module imports numba; ``label_mass`` imports it only on the first CPU call.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from losses.difftopk.relaxations import _ART_EPS, DISTRIBUTIONS

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")  # numpy: x / 0 = inf, no zero-division branches
_inline = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")

_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # fdlibm's split of ln 2: k·_LN2_HI is exact for |k| < 2^11
_LN2_LO = 1.90821492927058770002e-10
_C = tuple(1.0 / math.factorial(i) for i in range(14))  # Taylor to r^13: error < 1e-17 on |r| ≤ ln2/2
_SQRT2 = math.sqrt(2.0)
_SQRT2PI = math.sqrt(2.0 * math.pi)


@intrinsic
def _bits_as_float(typingctx, bits):
    """Reinterpret an int64 as the float64 with the same bits (vectorisable, unlike math.ldexp)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@_inline
def _exp(x: float) -> float:
    """e^x to ≤ 2 ulp: x = k·ln2 + r (Cody–Waite), e^r by its Taylor polynomial, 2^k from the exponent
    bits. Arguments are clamped to [−708, 709] (so e^x never over/underflows: 3e−308 and 8e307 stand
    for 0 and ∞, which the sigmoids below turn into α = 1 and α ≈ 1e−308 instead of 0); NaN stays NaN."""
    xc = min(max(x, -708.0), 709.0)
    k = math.floor(xc * _LOG2E + 0.5)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    p = _C[13]
    p = p * r + _C[12]
    p = p * r + _C[11]
    p = p * r + _C[10]
    p = p * r + _C[9]
    p = p * r + _C[8]
    p = p * r + _C[7]
    p = p * r + _C[6]
    p = p * r + _C[5]
    p = p * r + _C[4]
    p = p * r + _C[3]
    p = p * r + _C[2]
    p = p * r + 1.0
    p = p * r + 1.0
    e = p * _bits_as_float((np.int64(k) + 1023) << 52)
    return e if x == x else x


@_inline
def _art(v: float, w: float, base: float, steepness: float, lam: float) -> tuple[float, float]:
    """logistic_phi: α = σ(β v w), w = (|v|+ε)^-λ, dα/dv = α(1−α)·w·(1 − λ(1 − ε/base))·β (torch's order)."""
    alpha = 1.0 / (1.0 + _exp(-(v * steepness * w)))
    return alpha, alpha * (1.0 - alpha) * w * (1.0 - lam * (1.0 - _ART_EPS / base)) * steepness


@_inline
def _relax(code: int, v: np.ndarray, steepness: float, lam: float, alpha: np.ndarray, slope: np.ndarray) -> None:
    """(α, dα/dv) of ``relaxations.swap_probability_and_slope`` for every v (code: index in DISTRIBUTIONS).
    One loop per case, each free of libm calls where the formula allows, so that it vectorises."""
    size = v.shape[0]
    if code == 2 and lam == 0.5:  # logistic_phi, the default λ: w = 1/√base (torch's pow(-0.5) is rsqrt)
        for s in range(size):
            base = abs(v[s]) + _ART_EPS
            alpha[s], slope[s] = _art(v[s], 1.0 / math.sqrt(base), base, steepness, lam)
    elif code == 2 and lam == 1.0:
        for s in range(size):
            base = abs(v[s]) + _ART_EPS
            alpha[s], slope[s] = _art(v[s], 1.0 / base, base, steepness, lam)
    elif code == 2 and lam == 0.0:
        for s in range(size):
            alpha[s], slope[s] = _art(v[s], 1.0, abs(v[s]) + _ART_EPS, steepness, lam)
    elif code == 2:
        for s in range(size):
            base = abs(v[s]) + _ART_EPS
            alpha[s], slope[s] = _art(v[s], base ** (-lam), base, steepness, lam)
    elif code == 1:  # logistic
        for s in range(size):
            a = 1.0 / (1.0 + _exp(-(v[s] * steepness)))
            alpha[s] = a
            slope[s] = steepness * a * (1.0 - a)
    elif code == 4:  # reciprocal
        for s in range(size):
            x = v[s] * steepness
            d = 2.0 + abs(x)
            alpha[s] = 0.5 + 0.5 * x / d
            slope[s] = steepness / (d * d)
    elif code == 5:  # optimal: x + 1/2 on |x| ≤ 1/4, 1 − 1/(16x) above, 1/(16|x|) below
        for s in range(size):
            x = v[s] * steepness
            outer = max(abs(x), 0.25)
            alpha[s] = 1.0 - 1.0 / (16.0 * outer) if x > 0.25 else (1.0 / (16.0 * outer) if x < -0.25 else x + 0.5)
            slope[s] = steepness * (1.0 / (16.0 * outer * outer)) if abs(x) > 0.25 else steepness
    elif code == 3:  # gaussian, written as the reference does (libm erf)
        for s in range(size):
            x = v[s] * steepness
            alpha[s] = 0.5 + 0.5 * math.erf(v[s] / (1.0 / steepness) / _SQRT2)
            slope[s] = steepness * math.exp(-0.5 * x * x) / _SQRT2PI
    else:  # cauchy (libm atan)
        for s in range(size):
            x = v[s] * steepness
            alpha[s] = math.atan(x) / math.pi + 0.5
            slope[s] = steepness / (math.pi * (1.0 + x * x))


@_jit
def _forward(zx: np.ndarray, labels: np.ndarray, ca: np.ndarray, cb: np.ndarray, cmin: np.ndarray,
             cmax: np.ndarray, weights: np.ndarray, code: int, steepness: float, lam: float,
             saved: np.ndarray, out: np.ndarray) -> int:
    """zx: the values [n, B] (overwritten). out[s] = Σ_j weights[j]·q[n−K+j, s] after the network;
    saved[c] = (α, F'(v), x_a − x_b, q_a − q_b) of comparator c, each [B]. Returns −1, or the first
    sample whose label is not in 0..n−1 (then nothing is computed)."""
    n, batch = zx.shape
    k = weights.shape[0]
    for s in range(batch):
        if labels[s] < 0 or labels[s] >= n:
            return s
    zq = np.zeros((n, batch))
    v = np.empty(batch)
    for s in range(batch):
        zq[labels[s], s] = 1.0
    for c in range(ca.shape[0]):
        a, b, lo, hi = ca[c], cb[c], cmin[c], cmax[c]
        for s in range(batch):
            v[s] = zx[b, s] - zx[a, s]  # = −(x_a − x_b) exactly
        _relax(code, v, steepness, lam, saved[c, 0], saved[c, 1])
        for s in range(batch):
            xa = zx[a, s]
            xb = zx[b, s]
            qa = zq[a, s]
            qb = zq[b, s]
            alpha = saved[c, 0, s]
            dx = xa - xb
            dq = qa - qb
            shift = alpha * dx
            zx[lo, s] = xb + shift  # α·x_a + (1−α)·x_b
            zx[hi, s] = xa - shift
            shift = alpha * dq
            zq[lo, s] = qb + shift
            zq[hi, s] = qa - shift
            saved[c, 2, s] = dx
            saved[c, 3, s] = dq
    for s in range(batch):
        acc = 0.0
        for j in range(k):
            acc += weights[j] * zq[n - k + j, s]
        out[s] = acc
    return -1


@_jit
def _backward(grad_out: np.ndarray, ca: np.ndarray, cb: np.ndarray, cmin: np.ndarray, cmax: np.ndarray,
              weights: np.ndarray, saved: np.ndarray, gx: np.ndarray) -> None:
    """gx [n, B] = d out / d x · grad_out: the reverse sweep over the saved comparators."""
    n, batch = gx.shape
    k = weights.shape[0]
    gq = np.zeros((n, batch))
    gx[:] = 0.0
    for j in range(k):
        for s in range(batch):
            gq[n - k + j, s] = weights[j] * grad_out[s]
    for c in range(ca.shape[0] - 1, -1, -1):
        a, b, lo, hi = ca[c], cb[c], cmin[c], cmax[c]
        for s in range(batch):
            alpha = saved[c, 0, s]
            gx_min = gx[lo, s]
            gx_max = gx[hi, s]
            gq_min = gq[lo, s]
            gq_max = gq[hi, s]
            gdx = gx_min - gx_max
            gdq = gq_min - gq_max
            gv = (saved[c, 2, s] * gdx + saved[c, 3, s] * gdq) * saved[c, 1, s]  # g_α·F'(v)
            shift = alpha * gdx
            gx[a, s] = (gx_max + shift) - gv  # α·G_min + (1−α)·G_max, and v = x_b − x_a
            gx[b, s] = (gx_min - shift) + gv
            shift = alpha * gdq
            gq[a, s] = gq_max + shift
            gq[b, s] = gq_min - shift


class CompiledLabelMass(torch.autograd.Function):
    """``Σ_j w_j·P[b, n−K+j, y_b]`` for CPU float32/float64 scores, one compiled call forward and backward."""

    @staticmethod
    def forward(ctx, x, labels, comparators, weights, steepness: float, distribution: str,
                art_lambda: float):  # type: ignore[override]
        zx = np.array(x.detach().to(torch.float64).numpy().T, order="C")  # a copy: the kernel overwrites it
        w = np.ascontiguousarray(weights.detach().to(torch.float64).numpy())
        batch = zx.shape[1]
        saved = np.empty((comparators[0].shape[0], 4, batch))
        out = np.empty(batch)
        labels_np = np.ascontiguousarray(labels.numpy(), dtype=np.int64)
        bad = _forward(zx, labels_np, *comparators, w, DISTRIBUTIONS.index(distribution), float(steepness),
                       float(art_lambda), saved, out)
        if bad >= 0:
            raise IndexError(f"label {labels_np[bad]} of sample {bad} is out of range for {zx.shape[0]} classes")
        ctx.comparators, ctx.w, ctx.saved, ctx.n = comparators, w, saved, zx.shape[0]
        return torch.from_numpy(out).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        g = np.ascontiguousarray(grad_out.detach().to(torch.float64).numpy())
        gx = np.empty((ctx.n, g.shape[0]))
        _backward(g, *ctx.comparators, ctx.w, ctx.saved, gx)
        return torch.from_numpy(gx).t().to(grad_out.dtype), None, None, None, None, None, None
