"""One entry per row of a permutahedron projection (``losses.isotonic``), without the index sort: CPU kernels.

Losses that read the projection at the label only (the soft rank of the label, the sparse top-k mass of
the label) need y[b, index[b]] = ∇Ω*(z_y − v_B) and, for the backward, the label's block B. Tied scores
always share a PAV block (w is non-increasing, so a tie's later element never has a smaller block
value; should rounding put a tie across a block boundary, the tie is kept in the label's block), hence B
is the set of scores in the value range [s_last(B), s_first(B)] of the sorted row, and no index
permutation is needed:

* forward: sort the *values* of each row, of −z (ascending −z is descending z; numpy's vectorised sort,
  several times faster than an argsort or a sort of 64-bit index keys), run PAV on them (the same
  ``_pav_row`` and arithmetic as the full projection, so y is bit for bit the gathered one), find the
  label's block by binary search and keep its value v (rounded to the input dtype), value range and Σ_B d;
The kernels (``_label_rows``, ``_label_backward``) live in ``losses.isotonic`` with the PAV they call
(numba's on-disk cache does not see changes to a callee in another file).

* backward, one pass over the row: (Jᵀg)_j = d_j·(δ_jy·g − d_y·g/Σ_B d) for z_j in the block's value
  range, 0 elsewhere (d = (∇Ω*)'(z − v)).
"""
from __future__ import annotations

import numpy as np
import torch

from losses import isotonic


def _solve(neg: np.ndarray, zy: np.ndarray, w_np: np.ndarray, mode: str) -> tuple:
    """(out, v, bounds, den, ok) of ``_label_rows`` on rows of −z sorted ascending, neg [B, n]."""
    batch = neg.shape[0]
    out = np.empty(batch, dtype=neg.dtype)
    v = np.empty(batch, dtype=neg.dtype)
    bounds = np.empty((batch, 2), dtype=neg.dtype)
    den = np.empty(batch, dtype=neg.dtype)
    ok = np.empty(batch, dtype=np.bool_)
    isotonic._kernels()["_label_rows"](neg, zy, w_np, isotonic._MODE_ID[mode], out, v, bounds, den, ok)
    return out, v, bounds, den, ok


def _solve_head(neg: np.ndarray, zy: np.ndarray, w_np: np.ndarray, mode: str, k: int) -> tuple:
    """``_solve`` from the M largest scores of each row (−z: neg) when w is zero beyond its first k entries.

    As in ``isotonic._project_head``: past the head every score is a singleton block (y = 0, no gradient),
    which holds when the M-th largest is its own block and strictly above the (M+1)-th; a label below the
    head gets y = 0. The head's values come from a partition (O(n)) and a sort of M + 1 values per row;
    rows that need more get M ×4 while M ≤ n/4, then the full sort."""
    batch, n = neg.shape
    result = tuple(np.empty(shape, dtype) for shape, dtype in (
        (batch, neg.dtype), (batch, neg.dtype), ((batch, 2), neg.dtype), (batch, neg.dtype), (batch, np.bool_)))
    nan_rows = np.isnan(neg.sum(1))  # NaN rows (and rows holding both ±inf): the full sort (NaN last)
    rows = np.flatnonzero(~nan_rows)
    m = max(isotonic.HEAD_MIN, 4 * k)
    while m * 4 <= n and rows.size:
        part = neg if rows.size == batch else neg[rows]
        head = np.sort(np.partition(part, m, axis=1)[:, :m + 1], axis=1)
        done = _solve(np.ascontiguousarray(head[:, :m]), zy[rows], np.ascontiguousarray(w_np[:, :m]), mode)
        good = done[4] & (head[:, m - 1] < head[:, m])
        for store, value in zip(result, done):
            store[rows[good]] = value[good]
        rows = rows[~good]
        m *= 4
    full = np.union1d(rows, np.flatnonzero(nan_rows))
    if full.size:
        done = _solve(np.sort(neg[full], axis=1), zy[full], w_np, mode)
        for store, value in zip(result, done):
            store[full] = value
    return result


class ProjectionAt(torch.autograd.Function):
    """(z [B, n] float32/64 on the CPU, w [n] or [B, n] descending, mode, index [B]) -> y[b, index[b]], [B]."""

    @staticmethod
    def forward(ctx, z, w, mode: str, index):  # type: ignore[override]
        z_np = np.ascontiguousarray(z.detach().numpy())
        idx = np.ascontiguousarray(index.numpy(), dtype=np.int64)
        w_rows = w.reshape(1, -1) if w.dim() == 1 else (w[:1] if w.stride(0) == 0 else w)
        w_np = np.ascontiguousarray(w_rows.detach().double().numpy())
        zy = z_np[np.arange(z_np.shape[0]), idx]
        neg = -z_np
        k = isotonic._sparse_head(w_np, mode, z_np.shape[1])
        if k:
            out, v, bounds, den, _ = _solve_head(neg, zy, w_np, mode, k)
        else:
            neg.sort(axis=1)
            out, v, bounds, den, _ = _solve(neg, zy, w_np, mode)
        ctx.mode = isotonic._MODE_ID[mode]
        ctx.save_for_backward(z, index, torch.from_numpy(v), torch.from_numpy(bounds), torch.from_numpy(den))
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        z, index, v, bounds, den = ctx.saved_tensors
        z_np = np.ascontiguousarray(z.detach().numpy())
        out = np.empty_like(z_np)
        isotonic._kernels()["_label_backward"](z_np, np.ascontiguousarray(index.numpy(), dtype=np.int64),
                                      np.ascontiguousarray(grad.detach().to(z.dtype).numpy()), v.numpy(),
                                      bounds.numpy(), den.numpy(), ctx.mode, out)
        return torch.from_numpy(out), None, None, None
