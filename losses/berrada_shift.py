"""Around berrada_smooth's compiled kernel (losses/berrada_esp.py): its input pass, and its outputs as autograd nodes.

The input pass: e = exp((s − max_{j≠y} s_j)·scale), e_y = 0, in one pass.

Replaces scatter (a masked copy of the scores) + amax + sub + mul + clamp + scatter on [B, n] by one
compiled pass that writes the clamped exponent straight into a reused scratch buffer, then NumPy's exp
in place. Values are those of ``berrada_esp.exp_shifted`` (the same float operations in the same
dtype). Fresh [B, n] buffers cost page faults on every step (~0.1 ms per MB on the CPUs we measured),
which is why the buffer is kept per thread and shape: it is read only inside the forward.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import torch

from losses.berrada_esp import FLOAT64, LOG_SPACE, OK, esp_ratio, exp_shifted

RESIDUES = 64  # lanes of the vectorised maximum
_KERNEL = None
_LOCAL = threading.local()
_LO = {dt: math.log(torch.finfo(dt).tiny) + 2.0 for dt in (torch.float32, torch.float64)}  # exp_shifted's clamp


def _shift_rows(s, labels, scale, lo, scale64, out, m_out, a_y):  # pragma: no cover - compiled
    """m_out[b] = max_{j≠y} s[b, j] (NaN if the row has a NaN, as torch.amax), out[b, j] = max((s − m)·scale,
    lo) in s's dtype (NaN stays NaN), out[b, y] = −inf, a_y[b] = (s_y − m)·scale in float64. The maximum
    runs over residue lanes (vectorised); the block holding the label and the tail after the last full
    block are scanned one by one."""
    batch, n = s.shape
    ng = n - n % RESIDUES
    mx = np.empty(RESIDUES, dtype=s.dtype)
    for b in range(batch):
        row = s[b]
        y = labels[b]
        orow = out[b]
        nan = 0
        mx[:] = -np.inf
        for g in range(0, ng, RESIDUES):
            if g <= y and y < g + RESIDUES:
                continue
            blk = row[g:g + RESIDUES]
            for q in range(RESIDUES):
                x = blk[q]
                nan += x != x
                mx[q] = x if x > mx[q] else mx[q]
        m = mx[0]
        for q in range(1, RESIDUES):
            m = mx[q] if mx[q] > m else m
        start = y - y % RESIDUES
        if start < ng:
            for j in range(start, start + RESIDUES):
                x = row[j]
                if j != y:
                    nan += x != x
                    m = x if x > m else m
        for j in range(ng, n):
            x = row[j]
            if j != y:
                nan += x != x
                m = x if x > m else m
        if nan > 0:
            mx[0] = np.nan  # through the array: m keeps s's dtype
            m = mx[0]
        m_out[b] = m
        a_y[b] = (np.float64(row[y]) - np.float64(m)) * scale64
        for j in range(n):
            v = (row[j] - m) * scale
            orow[j] = lo if v < lo else v
        orow[y] = -np.inf


def _scratch(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A [B, n] buffer reused across calls of this thread (grown, never shrunk)."""
    buf = getattr(_LOCAL, "buf", None)
    need = shape[0] * shape[1]
    if buf is None or buf.dtype != dtype or buf.numel() < need:
        buf = torch.empty(need, dtype=dtype)
        _LOCAL.buf = buf
    return buf[:need].view(shape)


def exp_shifted_masked(s: torch.Tensor, labels: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(e [B, n], m [B], a_y [B] float64 = (s_y − m)·scale) for contiguous CPU scores s (float32/float64):
    m = max_{j≠y} s_j, e = exp((s − m)·scale) clamped below at the smallest normal number·e² as in
    berrada_esp.exp_shifted, e_y = 0, in s's dtype. e is a scratch buffer: valid until the next call in this
    thread."""
    global _KERNEL
    if _KERNEL is None:
        import numba

        _KERNEL = numba.njit(cache=True, nogil=True)(_shift_rows)
    arr = s.detach().contiguous().numpy()
    typ = arr.dtype.type
    e = _scratch(tuple(arr.shape), s.dtype)
    m = np.empty(arr.shape[0], dtype=arr.dtype)
    a_y = np.empty(arr.shape[0])
    buf = e.numpy()
    _KERNEL(arr, labels.numpy().astype(np.int64, copy=False), typ(scale), typ(_LO[s.dtype]), float(scale), buf, m, a_y)
    np.exp(buf, out=buf)
    return e, m, a_y


def _softplus_rows(ratio, a_y, c, tau, slope_scale, value, slope):  # pragma: no cover - compiled
    """value[b] = τ·softplus(u), slope[b] = softplus'(u)·slope_scale with u = c + ratio[b] − a_y[b], softplus and
    its slope as torch has them (u above its threshold 20 passes through, else log1p(exp(u)))."""
    for b in range(ratio.shape[0]):
        u = c + (ratio[b] - a_y[b])
        if u > 20.0:
            value[b], slope[b] = tau * u, slope_scale
        else:
            eu = np.exp(u)
            value[b], slope[b] = tau * np.log1p(eu), eu / (eu + 1.0) * slope_scale


_SOFTPLUS = None

LossParts = tuple[np.ndarray, np.ndarray, "torch.Tensor | None"]  # loss [B], its slope [B], ∂r/∂a [B, n] or None
MarginParts = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # esp_margin's (z, ok, ∂r/∂a)


def esp_loss(scores: torch.Tensor, labels: torch.Tensor, k: int, scale: float, alpha: float, tau: float,
             want: bool) -> tuple[LossParts | None, MarginParts | None]:
    """The kernel's pass and the per-row loss in one go: ((loss τ·softplus(α/τ + z) [B] float64, its slope
    ∂L/∂z·scale [B], ∂r/∂a [B, n] or None), None) when every row is ok (after the float64 redo of the rows
    that need it), else (None, ``esp_margin``'s outputs) for the caller's log-space fix."""
    global _SOFTPLUS
    if _SOFTPLUS is None:
        import numba

        _SOFTPLUS = numba.njit(cache=True, nogil=True)(_softplus_rows)
    e, m, a_y = exp_shifted_masked(scores, labels, scale)  # e: a scratch buffer, read by the kernel only
    ratio, status, grad = esp_ratio(e, k, want)
    if status.any():
        z, ok, grad = esp_margin(scores, labels, k, scale, want, raw=(m, a_y, ratio, status, grad))
        if not ok.numpy().all():
            return None, (z, ok, grad)
        ratio, a_y = z.numpy(), np.zeros_like(a_y)
    value, slope = np.empty(len(ratio)), np.empty(len(ratio))
    _SOFTPLUS(ratio, a_y, alpha / tau, tau, tau * scale, value, slope)
    return (value, slope, grad), None


def esp_margin(scores: torch.Tensor, labels: torch.Tensor, k: int, scale: float, want: bool,
               raw: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(z [B] float64, ok [B], ∂r/∂a [B, n] or None) from the compiled kernel, without autograd (see EspMargin);
    raw: the kernel's outputs (m, a_y, ratio, status, ∂r/∂a) for these arguments, if it ran already."""
    if raw is None:
        e, m, a_y = exp_shifted_masked(scores, labels, scale)  # e: a scratch buffer, read by the kernel only
        ratio, status, grad = esp_ratio(e, k, want)
    else:
        m, a_y, ratio, status, grad = raw
    m = torch.from_numpy(m)[:, None]
    redo = status == FLOAT64
    if redo.any() and scores.dtype == torch.float64:
        status[redo] = LOG_SPACE
    elif redo.any():
        redo = np.flatnonzero(redo)
        rows = torch.from_numpy(redo)
        masked = scores.detach()[rows].scatter(1, labels[rows, None], float("-inf"))
        r64, s64, g64 = esp_ratio(exp_shifted(masked, m[rows], labels[rows], scale, torch.float64), k, want)
        ratio[redo], status[redo] = r64, np.where(s64 == OK, OK, LOG_SPACE)
        if want:
            grad[rows] = g64.to(grad.dtype)
    ok = status == OK
    return torch.from_numpy(np.where(ok, ratio - a_y, 0.0)), torch.from_numpy(ok), grad


class EspMargin(torch.autograd.Function):
    """z [B] float64 as an autograd node of the scores, from ``esp_margin``'s outputs (z, ok, ∂r/∂a):
    z = log σ_k(e) − log σ_{k−1}(e) − a_y with a = (s − max_{j≠y} s_j)·scale, e = exp(a) over j ≠ y
    (the loss is invariant to the shift). e is float32 for float32 scores, and float64 for the rows
    that need it (status 1) and for float64 scores. Rows with ok False (status 2) have z = 0 and no
    gradient: the caller computes them in log space.
    """

    @staticmethod
    def forward(ctx, scores, labels, z, ok, grad, scale: float):  # type: ignore[override]
        ctx.save_for_backward(grad, labels, ok)
        ctx.scale = scale
        return z.clone()  # a new tensor: returning an input as-is would alias it

    @staticmethod
    def backward(ctx, grad_z):  # type: ignore[override]
        grad, labels, ok = ctx.saved_tensors
        coef = torch.where(ok, grad_z * ctx.scale, 0.0).to(grad.dtype)
        out = grad * coef[:, None]
        out.scatter_(1, labels[:, None], -coef[:, None])
        return out, None, None, None, None, None


class EspLoss(torch.autograd.Function):
    """Per-sample loss τ·softplus(α/τ + z) [B] (in scores' dtype) as one autograd node, from ``esp_loss``'s
    LossParts (every row ok): the loss, its slope ∂L/∂z·scale [B] and ∂r/∂a [B, n] (or None without
    gradient). The backward is ∂L/∂s = scale·softplus'(u)·(∂r/∂a − onehot(y)).
    The first backward scales the kernel's fresh ∂r/∂a buffer in place and hands it to autograd (which
    keeps it as the gradient: no second [B, n] buffer and pass); a further backward through the same
    graph (retain_graph, gradcheck) recomputes ∂r/∂a from the saved scores."""

    @staticmethod
    def forward(ctx, scores, labels, value, slope, grad, scale: float, k: int):  # type: ignore[override]
        ctx.save_for_backward(scores, labels)
        ctx.slope, ctx.grad, ctx.scale, ctx.k = slope, grad, scale, k  # grad: released by the first backward
        return torch.from_numpy(value).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        scores, labels = ctx.saved_tensors
        out, ctx.grad = ctx.grad, None
        if out is None:  # a second backward: the first one took the buffer
            out = esp_margin(scores.detach(), labels, ctx.k, ctx.scale, True)[2]
        coef = (grad_out.detach().numpy().astype(np.float64) * ctx.slope).astype(out.numpy().dtype)
        out.mul_(torch.from_numpy(coef)[:, None])
        out.numpy()[np.arange(len(coef)), labels.numpy()] = -coef
        return out, None, None, None, None, None, None
