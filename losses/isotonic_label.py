"""One entry per row of a permutahedron projection (``losses.isotonic``), without the index sort: CPU kernels.

Losses that read the projection at the label only (the soft rank of the label, the sparse top-k mass of
the label) need y[b, index[b]] = ∇Ω*(z_y − v_B) and, for the backward, the label's block B. Tied scores
always share a PAV block (w is non-increasing, so a tie's later element never has a smaller block
value), hence B is the set of scores in the value range [s_last(B), s_first(B)] of the sorted row, and
no index permutation is needed:

* forward: sort the *values* of each row, of −z (ascending −z is descending z; numpy's vectorised sort,
  several times faster than an argsort or a sort of 64-bit index keys), run PAV on them (the same
  ``_pav_row`` and arithmetic as the full projection, so y is bit for bit the gathered one), find the
  label's block by binary search and keep its value v (rounded to the input dtype), value range and Σ_B d;
* backward, one pass over the row: (Jᵀg)_j = d_j·(δ_jy·g − d_y·g/Σ_B d) for z_j in the block's value
  range, 0 elsewhere (d = (∇Ω*)'(z − v)).
"""
from __future__ import annotations

import numpy as np
import torch

from losses import isotonic


def _slope(u, mode: int, one):
    """(∇Ω*(u), (∇Ω*)'(u)) in u's dtype (``one``: 1 in that dtype), with the full projection's arithmetic."""
    if mode == 0:
        return u, one
    if mode == 1:
        e = np.exp(u)
        return e, e
    return u * u * u, (one + one + one) * (u * u)


def _label_rows(neg: np.ndarray, zy: np.ndarray, w: np.ndarray, mode: int, out: np.ndarray, v: np.ndarray,
                bounds: np.ndarray, den: np.ndarray) -> None:
    """Per row of −z sorted ascending, neg [B, n] (the input's dtype): y at the label (value zy[b]) into out,
    the rounded block value into v, the block's value range into bounds [B, 2] and Σ_B d into den."""
    batch, n = neg.shape
    x = np.empty(n)
    scratch = np.empty((7, n))
    val = np.empty(n)
    start = np.empty(n, dtype=np.int64)
    rounded = np.empty_like(neg[0, :1])  # casts to the input dtype on assignment
    one = np.ones_like(neg[0, :1])[0]
    for b in range(batch):
        for i in range(n):
            x[i] = -neg[b, i]  # z descending, float64
        target = zy[b]
        if np.isnan(x[n - 1]) or np.isnan(target):  # NaN sorts last: propagate it, no gradient
            out[b] = np.nan
            v[b] = np.nan
            bounds[b, 0], bounds[b, 1] = np.inf, -np.inf
            den[b] = 0
            continue
        wb = w[b] if w.shape[0] > 1 else w[0]
        top = isotonic._pav_row_jit(x, wb, mode, scratch[0], scratch[1], scratch[2], scratch[3], scratch[4],
                                    scratch[5], scratch[6], val, start)
        lo, hi = 0, n - 1  # first descending position holding a value ≤ target (= target: it is in the row)
        while lo < hi:
            mid = (lo + hi) // 2
            if x[mid] > target:
                lo = mid + 1
            else:
                hi = mid
        first, last = 0, top  # the block holding position lo: the last one starting at or before it
        while first < last:
            mid = (first + last + 1) // 2
            if start[mid] <= lo:
                first = mid
            else:
                last = mid - 1
        stop = start[first + 1] if first < top else n
        rounded[0] = val[first]
        vb = rounded[0]
        out[b], _ = _slope(target - vb, mode, one)
        v[b] = vb
        bounds[b, 0], bounds[b, 1] = -neg[b, stop - 1], -neg[b, start[first]]
        total = vb * 0
        if mode == 0:  # d = 1
            for _ in range(start[first], stop):
                total += one
        else:
            for i in range(start[first], stop):
                _, d = _slope(-neg[b, i] - vb, mode, one)
                total += d
        den[b] = total


def _label_backward(z: np.ndarray, index: np.ndarray, grad: np.ndarray, v: np.ndarray, bounds: np.ndarray,
                    den: np.ndarray, mode: int, out: np.ndarray) -> None:
    """out[b, j] = d_j·(δ_{j,index}·g − d_y·g/Σ_B d) over the label's block (its value range), 0 elsewhere."""
    batch, n = z.shape
    one = np.ones_like(z[0, :1])[0]
    for b in range(batch):
        y = index[b]
        _, dy = _slope(z[b, y] - v[b], mode, one)
        g = grad[b] * dy
        ratio = g / den[b] if den[b] > 0 else den[b] * 0
        lo, hi = bounds[b, 0], bounds[b, 1]
        for j in range(n):
            zj = z[b, j]
            if lo <= zj <= hi:
                _, d = _slope(zj - v[b], mode, one)
                out[b, j] = -d * ratio
            else:
                out[b, j] = 0
        if lo <= z[b, y] <= hi:
            out[b, y] += g


_KERNELS: dict = {}


def _kernels() -> dict:
    if not _KERNELS:
        import numba

        isotonic._kernel()  # compiles _pav_row
        globals()["_slope"] = numba.njit(cache=True, inline="always")(_slope)
        for name in ("_label_rows", "_label_backward"):
            _KERNELS[name] = numba.njit(cache=True)(globals()[name])
    return _KERNELS


class ProjectionAt(torch.autograd.Function):
    """(z [B, n] float32/64 on the CPU, w [n] or [B, n] descending, mode, index [B]) -> y[b, index[b]], [B]."""

    @staticmethod
    def forward(ctx, z, w, mode: str, index):  # type: ignore[override]
        z_np = np.ascontiguousarray(z.detach().numpy())
        idx = np.ascontiguousarray(index.numpy(), dtype=np.int64)
        w_rows = w.reshape(1, -1) if w.dim() == 1 else (w[:1] if w.stride(0) == 0 else w)
        w_np = np.ascontiguousarray(w_rows.detach().double().numpy())
        batch = z_np.shape[0]
        out = np.empty(batch, dtype=z_np.dtype)
        v = np.empty(batch, dtype=z_np.dtype)
        bounds = np.empty((batch, 2), dtype=z_np.dtype)
        den = np.empty(batch, dtype=z_np.dtype)
        _kernels()["_label_rows"](np.sort(-z_np, axis=1), z_np[np.arange(batch), idx], w_np,
                                  isotonic._MODE_ID[mode], out, v, bounds, den)
        ctx.mode = isotonic._MODE_ID[mode]
        ctx.save_for_backward(z, index, torch.from_numpy(v), torch.from_numpy(bounds), torch.from_numpy(den))
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, index, v, bounds, den = ctx.saved_tensors
        z_np = np.ascontiguousarray(z.detach().numpy())
        out = np.empty_like(z_np)
        _kernels()["_label_backward"](z_np, np.ascontiguousarray(index.numpy(), dtype=np.int64),
                                      np.ascontiguousarray(grad.detach().to(z.dtype).numpy()), v.numpy(),
                                      bounds.numpy(), den.numpy(), ctx.mode, out)
        return torch.from_numpy(out), None, None, None
