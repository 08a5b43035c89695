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


def _pav_l2_neg(neg: np.ndarray, wb: np.ndarray, a1: np.ndarray, a2: np.ndarray, val: np.ndarray,
                start: np.ndarray) -> int:
    """``isotonic._pav_row`` for l2 on x = −neg (ascending neg: x descending), read without a float64 copy."""
    n = neg.shape[0]
    top = -1
    first = -np.float64(neg[0])
    cur_start, cur_sum, cur_cnt, cur_val = 0, first - wb[0], 1.0, first - wb[0]
    for i in range(1, n):
        xi = -np.float64(neg[i]) - wb[i]
        if cur_val > xi:
            top += 1
            start[top], a1[top], a2[top], val[top] = cur_start, cur_sum, cur_cnt, cur_val
            cur_start, cur_sum, cur_cnt, cur_val = i, xi, 1.0, xi
            continue
        cur_sum += xi
        cur_cnt += 1.0
        cur_val = cur_sum / cur_cnt
        while top >= 0 and val[top] <= cur_val:
            cur_start, cur_sum, cur_cnt = start[top], a1[top] + cur_sum, a2[top] + cur_cnt
            cur_val = cur_sum / cur_cnt
            top -= 1
    top += 1
    start[top], a1[top], a2[top], val[top] = cur_start, cur_sum, cur_cnt, cur_val
    return top


def _label_rows(neg: np.ndarray, zy: np.ndarray, w: np.ndarray, mode: int, out: np.ndarray, v: np.ndarray,
                bounds: np.ndarray, den: np.ndarray, ok: np.ndarray) -> None:
    """Per row of −z sorted ascending, neg [B, n] (the input's dtype): y at the label (value zy[b]) into out,
    the rounded block value into v, the block's value range into bounds [B, 2], Σ_B d into den, and into ok
    whether the last score is a block of its own."""
    batch, n = neg.shape
    x = np.empty(n)
    scratch = np.empty((7, n))
    val = np.empty(n)
    start = np.empty(n, dtype=np.int64)
    rounded = np.empty_like(neg[0, :1])  # casts to the input dtype on assignment
    one = np.ones_like(neg[0, :1])[0]
    for b in range(batch):
        target = zy[b]
        if np.isnan(neg[b, n - 1]) or np.isnan(target):  # NaN sorts last: propagate it, no gradient
            out[b] = np.nan
            v[b] = np.nan
            bounds[b, 0], bounds[b, 1] = np.inf, -np.inf
            den[b] = 0
            ok[b] = True
            continue
        wb = w[b] if w.shape[0] > 1 else w[0]
        if mode == 0:  # l2 reads −neg directly (same arithmetic as _pav_row: one copy pass less)
            top = _pav_l2_neg(neg[b], wb, scratch[0], scratch[1], val, start)
        else:
            for i in range(n):
                x[i] = -neg[b, i]  # z descending, float64
            top = isotonic._pav_row_jit(x, wb, mode, scratch[0], scratch[1], scratch[2], scratch[3], scratch[4],
                                        scratch[5], scratch[6], val, start)
        ok[b] = start[top] == n - 1  # the last score is its own block (what a head-only row must check)
        if target < -neg[b, n - 1]:  # below a head (rows of the largest scores, w = 0 beyond): u = 0, y = 0, d = 0
            out[b], _ = _slope(target - target, mode, one)
            v[b] = target
            bounds[b, 0], bounds[b, 1] = np.inf, -np.inf
            den[b] = 0
            continue
        lo, hi = 0, n - 1  # first descending position holding a value ≤ target (= target: it is in the row)
        while lo < hi:
            mid = (lo + hi) // 2
            if -neg[b, mid] > target:
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
        begin, stop = start[first], start[first + 1] if first < top else n
        while begin > 0 and neg[b, begin - 1] == neg[b, begin]:  # ties split by rounding (a block value a hair off the
            begin -= 1  # tied score): the block is the value range, all ties in it
        while stop < n and neg[b, stop] == neg[b, stop - 1]:
            stop += 1
        rounded[0] = val[first]
        vb = rounded[0]
        out[b], _ = _slope(target - vb, mode, one)
        v[b] = vb
        bounds[b, 0], bounds[b, 1] = -neg[b, stop - 1], -neg[b, begin]
        total = vb * 0
        if mode == 0:  # d = 1
            for _ in range(begin, stop):
                total += one
        else:
            for i in range(begin, stop):
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
        globals()["_pav_l2_neg"] = numba.njit(cache=True)(_pav_l2_neg)
        for name in ("_label_rows", "_label_backward"):
            _KERNELS[name] = numba.njit(cache=True)(globals()[name])
    return _KERNELS


def _solve(neg: np.ndarray, zy: np.ndarray, w_np: np.ndarray, mode: str) -> tuple:
    """(out, v, bounds, den, ok) of ``_label_rows`` on rows of −z sorted ascending, neg [B, n]."""
    batch = neg.shape[0]
    out = np.empty(batch, dtype=neg.dtype)
    v = np.empty(batch, dtype=neg.dtype)
    bounds = np.empty((batch, 2), dtype=neg.dtype)
    den = np.empty(batch, dtype=neg.dtype)
    ok = np.empty(batch, dtype=np.bool_)
    _kernels()["_label_rows"](neg, zy, w_np, isotonic._MODE_ID[mode], out, v, bounds, den, ok)
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
    nan_rows = np.isnan(neg).any(1)  # NaN rows: the full sort (NaN last)
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
        _kernels()["_label_backward"](z_np, np.ascontiguousarray(index.numpy(), dtype=np.int64),
                                      np.ascontiguousarray(grad.detach().to(z.dtype).numpy()), v.numpy(),
                                      bounds.numpy(), den.numpy(), ctx.mode, out)
        return torch.from_numpy(out), None, None, None
