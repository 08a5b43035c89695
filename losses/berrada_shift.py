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
                       scale: float) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(e [B, n], m [B, 1], a_y [B] float64 = (s_y − m)·scale) for contiguous CPU scores s (float32/float64):
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
    return e, torch.from_numpy(m)[:, None], a_y


def esp_margin(scores: torch.Tensor, labels: torch.Tensor, k: int, scale: float,
               want: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(z [B] float64, ok [B], ∂r/∂a [B, n] or None) from the compiled kernel, without autograd (see EspMargin)."""
    e, m, a_y = exp_shifted_masked(scores, labels, scale)  # e: a scratch buffer, read by the kernel only
    ratio, status, grad = esp_ratio(e, k, want)
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
    """Per-sample loss τ·softplus(α/τ + z) [B] (in scores' dtype) from the compiled kernel's outputs, when every
    row is ok: z [B] float64 and ∂r/∂a [B, n] (or None without gradient) from ``esp_margin`` (for this k).

    One autograd node instead of margin + softplus + casts: the backward is ∂L/∂s = scale·softplus'(u)·
    (∂r/∂a − onehot(y)) with u = α/τ + z and softplus' as torch computes it (1 above its threshold 20).
    The first backward scales the kernel's fresh ∂r/∂a buffer in place and hands it to autograd (which
    keeps it as the gradient: no second [B, n] buffer and pass); a further backward through the same
    graph (retain_graph, gradcheck) recomputes ∂r/∂a from the saved scores."""

    @staticmethod
    def forward(ctx, scores, labels, z, grad, scale: float, alpha: float, tau: float,  # type: ignore[override]
                k: int):
        # on [B] in NumPy float64 (a handful of torch ops cost more than the arithmetic); softplus and its
        # slope as torch has them: u above the threshold 20 passes through, else log1p(exp(u))
        u = alpha / tau + z.numpy()
        big = u > 20.0
        eu = np.exp(np.minimum(u, 20.0))
        slope = np.where(big, 1.0, eu / (eu + 1.0))
        ctx.save_for_backward(scores, labels, torch.from_numpy(slope * (tau * scale)))
        ctx.grad, ctx.scale, ctx.k = grad, scale, k  # an attribute, not saved: released by the first backward
        return torch.from_numpy(tau * np.where(big, u, np.log1p(eu))).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        scores, labels, dz = ctx.saved_tensors
        out, ctx.grad = ctx.grad, None
        if out is None:  # a second backward: the first one took the buffer
            out = esp_margin(scores.detach(), labels, ctx.k, ctx.scale, True)[2]
        coef = (grad_out.detach().numpy().astype(np.float64) * dz.numpy()).astype(out.numpy().dtype)
        out.mul_(torch.from_numpy(coef)[:, None])
        out.numpy()[np.arange(len(coef)), labels.numpy()] = -coef
        return out, None, None, None, None, None, None, None
