"""Projections onto the permutahedron by isotonic optimisation (pool adjacent violators), batched.

Blondel, Teboul, Berthet, Djolonga (ICML 2020) reduce the regularised projection of z ∈ ℝⁿ onto the
permutahedron P(w) (w sorted descending) to an isotonic problem on s = z sorted descending:

    v* = argmin_{v_1 ≥ … ≥ v_n} Σ_i Ω*(s_i − v_i) + ⟨e(w), v⟩,   y = ∇Ω*(s − v*)  (then unsorted),

with, per regulariser ``mode``:

* ``l2``  (Ω = ½‖y‖²):           Ω*(u) = u²/2, e(w) = w, ∇Ω*(u) = u; block value mean(s − w).
* ``kl``  (entropic, w = log ρ):  Ω*(u) = e^u, e(w) = e^w, ∇Ω*(u) = e^u; block value LSE(s) − LSE(w).
* ``p4/3`` (Ω = ¾‖y‖^{4/3}_{4/3}, Sander et al. 2023): Ω*(u) = u⁴/4, ∇Ω*(u) = u³; the block value γ
  solves Σ (s_i − γ)³ = Σ w_i (a monotone cubic: bracketed Newton to machine precision).

PAV (a stack of blocks, merged while a block's value exceeds its predecessor's; for p4/3 the top block's
value is solved only once a block is pushed on it, comparisons with it reading the sign of its cubic at
the other value — one cubic solve per final block, not per merge) is O(n) after the
O(n log n) sort; it runs compiled with numba over the batch, in float64, on the CPU (CUDA tensors make
a round trip: numba's CPU PAV is what the paper's own code uses; a GPU PAV is not written).

Backward (O(n)): with d_i = (∇Ω*)'(s_i − v_i) and B(i) the block of i, y_i = ∇Ω*(s_i − γ_B) and
Σ_B ∇Ω*(s_j − γ_B) = const give ∂γ_B/∂s_j = d_j / Σ_B d, hence
``(Jᵀg)_j = d_j g_j − d_j · Σ_B d_i g_i / Σ_B d_i`` (0/0 := 0: a p4/3 singleton at u = 0), done with
segment sums over the block ids. w carries no gradient.

CPU path (the one timed against ``F.cross_entropy``): float32 scores are ordered by one ``np.sort`` of
64-bit keys (the score's order-preserving bits, then the index: descending, ties by index), several
times faster than an argsort; float64 scores by ``np.argsort``. Then one compiled call per batch runs PAV
and writes y (in the input's dtype and order) and the backward's d and block starts; the backward is one
more compiled call. Same arithmetic as the torch formulas above (v rounded to the input dtype, then
u = s − v, y = ∇Ω*(u), d = (∇Ω*)'(u) in that dtype).
"""
from __future__ import annotations

import numpy as np
import torch

MODES = ("l2", "kl", "p4/3")
_MODE_ID = {"l2": 0, "kl": 1, "p4/3": 2}
_KERNEL = None


def _cubic_block_value(s1: float, s2: float, s3: float, cnt: float, wsum: float, lo: float, hi: float) -> float:
    """Root γ of S3 − 3γS2 + 3γ²S1 − cnt·γ³ = W (decreasing in γ) in [lo, hi]: Newton inside bisection, to
    machine precision or to the rounding noise of the expanded cubic, whichever comes first."""
    g = 0.5 * (lo + hi)
    for _ in range(200):
        f = s3 - 3 * g * s2 + 3 * g * g * s1 - cnt * g * g * g - wsum
        # f at its rounding noise: done (else Newton bounces in the noise band to the step limit)
        if abs(f) <= 1e-15 * (abs(s3) + 3 * abs(g * s2) + 3 * g * g * abs(s1) + cnt * abs(g * g * g) + abs(wsum)):
            return g
        if f > 0:
            lo = g
        else:
            hi = g
        df = -3 * s2 + 6 * g * s1 - 3 * cnt * g * g  # ≤ 0
        step = g - f / df if df < 0 else 0.5 * (lo + hi)
        g_new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(g_new - g) <= 1e-15 * max(1.0, abs(g)) or hi - lo <= 1e-15 * max(1.0, abs(g)):
            return g_new
        g = g_new
    return g


def _cubic_at(s1: float, s2: float, s3: float, cnt: float, wsum: float, g: float) -> float:
    """Σ_B (s − g)³ − W_B from a block's moments (decreasing in g; its root is the block value)."""
    return s3 - 3 * g * s2 + 3 * g * g * s1 - cnt * g * g * g - wsum


def _solve_block(a1: np.ndarray, a2: np.ndarray, a3: np.ndarray, a4: np.ndarray, cnt: np.ndarray, smin: np.ndarray,
                 smax: np.ndarray, b: int) -> float:
    """The p4/3 value of block b from its moments."""
    root = np.cbrt(a4[b] / cnt[b])
    return _cubic_block_value_jit(a1[b], a2[b], a3[b], cnt[b], a4[b], smin[b] - root - 1e-12, smax[b] + 1e-12)


def _pav_row(x: np.ndarray, wb: np.ndarray, mode: int, a1: np.ndarray, a2: np.ndarray, a3: np.ndarray,
             a4: np.ndarray, cnt: np.ndarray, smin: np.ndarray, smax: np.ndarray, val: np.ndarray,
             start: np.ndarray) -> int:
    """PAV on one descending row x (float64) against wb: the blocks' starts and values (into start, val;
    a1..smax are scratch); returns the index of the last block."""
    n = x.shape[0]
    top = -1
    if mode == 0:  # l2, the common case: the same arithmetic, the last block's state kept in registers
        cur_start, cur_sum, cur_cnt, cur_val = 0, x[0] - wb[0], 1.0, x[0] - wb[0]
        for i in range(1, n):
            xi = x[i] - wb[i]
            if cur_val > xi:  # no violation: push the last block, start a new one
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
    if mode == 2:  # p4/3: the top block's value is solved only once a block is pushed on it (lazy); until
        lazy = False  # then comparisons with it read the sign of its decreasing cubic f (f(v) ≤ 0 ⟺ v ≥ value)
        for i in range(n):
            xi, wi = x[i], wb[i]
            v_new = xi - np.cbrt(wi) if wi != 0 else xi  # cbrt(0) = 0: skip the libm call
            merge = top >= 0 and (_cubic_at(a1[top], a2[top], a3[top], cnt[top], a4[top], v_new) <= 0 if lazy
                                  else val[top] <= v_new)
            if not merge:
                if lazy:
                    val[top] = _solve_block(a1, a2, a3, a4, cnt, smin, smax, top)
                    lazy = False
                top += 1
                start[top], cnt[top], smin[top], smax[top] = i, 1.0, xi, xi
                a1[top], a2[top], a3[top], a4[top] = xi, xi * xi, xi * xi * xi, wi
                val[top] = v_new
                continue
            cnt[top] += 1.0
            smin[top] = min(smin[top], xi)
            smax[top] = max(smax[top], xi)
            a1[top] += xi
            a2[top] += xi * xi
            a3[top] += xi * xi * xi
            a4[top] += wi
            lazy = True
            # val[top − 1] ≤ the top block's value ⟺ f_top(val[top − 1]) ≥ 0: pool
            while top > 0 and _cubic_at(a1[top], a2[top], a3[top], cnt[top], a4[top], val[top - 1]) >= 0:
                p = top - 1
                cnt[p] += cnt[top]
                smin[p] = min(smin[p], smin[top])
                smax[p] = max(smax[p], smax[top])
                a1[p] += a1[top]
                a2[p] += a2[top]
                a3[p] += a3[top]
                a4[p] += a4[top]
                top = p
        if lazy:
            val[top] = _solve_block(a1, a2, a3, a4, cnt, smin, smax, top)
        return top
    for i in range(n):  # kl
        top += 1
        xi, wi = x[i], wb[i]
        a1[top], a2[top], start[top] = xi, wi, i
        val[top] = xi - wi
        while top > 0 and val[top - 1] <= val[top]:
            p = top - 1
            a1[p] = np.logaddexp(a1[p], a1[top])
            a2[p] = np.logaddexp(a2[p], a2[top])
            val[p] = a1[p] - a2[p]
            top = p
    return top


def _pav_batch(s: np.ndarray, w: np.ndarray, mode: int, sol: np.ndarray, block: np.ndarray) -> None:
    """Decreasing isotonic solution v (into sol) and each element's block start (into block), per row
    (w [B, n], or [1, n] for every row)."""
    batch, n = s.shape
    scratch = np.empty((7, n))
    val = np.empty(n)
    start = np.empty(n, dtype=np.int64)
    for b in range(batch):
        wb = w[b] if w.shape[0] > 1 else w[0]  # one row of w: shared by the batch
        top = _pav_row_jit(s[b], wb, mode, scratch[0], scratch[1], scratch[2], scratch[3], scratch[4], scratch[5],
                           scratch[6], val, start)
        for blk in range(top + 1):
            end = start[blk + 1] if blk < top else n
            for i in range(start[blk], end):
                sol[b, i] = val[blk]
                block[b, i] = start[blk]


def _kernel():
    """Compile the PAV once (numba, cached on disk); imported lazily so `import losses` stays fast."""
    global _KERNEL
    if _KERNEL is None:
        import numba

        globals()["_cubic_block_value_jit"] = numba.njit(cache=True)(_cubic_block_value)
        globals()["_cubic_at"] = numba.njit(cache=True, inline="always")(_cubic_at)
        globals()["_solve_block"] = numba.njit(cache=True)(_solve_block)
        globals()["_pav_row_jit"] = numba.njit(cache=True)(_pav_row)
        _KERNEL = numba.njit(cache=True)(_pav_batch)
    return _KERNEL


_cubic_block_value_jit = _cubic_block_value  # replaced by the compiled versions in _kernel()
_pav_row_jit = _pav_row


def isotonic_decreasing(s: np.ndarray, w: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(v*, block start of every element) of the isotonic problem above; s, w float64 [B, n]."""
    sol = np.empty_like(s)
    block = np.empty(s.shape, dtype=np.int64)
    _kernel()(np.ascontiguousarray(s), np.ascontiguousarray(w), _MODE_ID[mode], sol, block)
    return sol, block


def _sort_keys(bits: np.ndarray, keys: np.ndarray) -> None:
    """keys[b, j] = (~order-preserving bits of float32 score) << 32 | j: ascending keys = descending scores,
    ties by index."""
    batch, n = bits.shape
    for b in range(batch):
        for j in range(n):
            u = np.uint64(bits[b, j])
            mono = (u ^ np.uint64(0xFFFFFFFF)) if u >= np.uint64(0x80000000) else (u | np.uint64(0x80000000))
            keys[b, j] = ((np.uint64(0xFFFFFFFF) - mono) << np.uint64(32)) | np.uint64(j)


def _order_of_keys(keys: np.ndarray, order: np.ndarray) -> None:
    batch, n = keys.shape
    for b in range(batch):
        for i in range(n):
            order[b, i] = np.int64(keys[b, i] & np.uint64(0xFFFFFFFF))


def _project_rows(z: np.ndarray, order: np.ndarray, w: np.ndarray, mode: int, y: np.ndarray, d: np.ndarray,
                  block: np.ndarray) -> None:
    """PAV on the rows of z sorted by ``order`` (descending) against w ([B, n] or [1, n]), then y (input
    order), d and the block starts (sorted order), in z's dtype."""
    batch, n = z.shape
    s = np.empty((batch, n))
    sol = np.empty((batch, n))
    for b in range(batch):
        for i in range(n):
            s[b, i] = z[b, order[b, i]]
    _pav_batch_jit(s, w, mode, sol, block)
    rounded = np.empty_like(z[0, :1])  # casts v to z's dtype on assignment
    one = np.ones_like(z[0, :1])[0]
    three = one + one + one
    for b in range(batch):
        for i in range(n):
            rounded[0] = sol[b, i]
            u = z[b, order[b, i]] - rounded[0]  # v rounded to z's dtype, as the torch formulas
            if mode == 0:
                out, slope = u, one
            elif mode == 1:
                out = np.exp(u)
                slope = out
            else:
                out, slope = u * u * u, three * (u * u)
            y[b, order[b, i]] = out
            d[b, i] = slope


def _backward_rows(grad: np.ndarray, order: np.ndarray, d: np.ndarray, block: np.ndarray, out: np.ndarray) -> None:
    """(Jᵀg) per row: d_j g_j − d_j·Σ_B d_i g_i/Σ_B d_i over each block B (0/0 := 0), in input order."""
    batch, n = grad.shape
    zero = np.zeros_like(grad[0, :1])[0]
    for b in range(batch):
        start = 0
        while start < n:
            stop = start + 1
            while stop < n and block[b, stop] == block[b, start]:
                stop += 1
            num, den = zero, zero
            for i in range(start, stop):
                num += grad[b, order[b, i]] * d[b, i]
                den += d[b, i]
            ratio = num / den if den > 0 else zero
            for i in range(start, stop):
                j = order[b, i]
                g = grad[b, j] * d[b, i]
                out[b, j] = g - d[b, i] * ratio
            start = stop


# label-only projections (losses.isotonic_label): here, next to the PAV they call


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
            top = _pav_row_jit(x, wb, mode, scratch[0], scratch[1], scratch[2], scratch[3], scratch[4],
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

        _kernel()
        globals()["_pav_batch_jit"] = _KERNEL
        globals()["_slope"] = numba.njit(cache=True, inline="always")(_slope)
        # error_model="numpy": no zero-division checks (no divisor is 0 there)
        globals()["_pav_l2_neg"] = numba.njit(cache=True, nogil=True, error_model="numpy")(_pav_l2_neg)
        for name in ("_sort_keys", "_order_of_keys", "_project_rows", "_backward_rows"):
            _KERNELS[name] = numba.njit(cache=True)(globals()[name])
        for name in ("_label_rows", "_label_backward"):
            _KERNELS[name] = numba.njit(cache=True, nogil=True)(globals()[name])
    return _KERNELS


_pav_batch_jit = _pav_batch  # replaced by the compiled version in _kernels()


def _descending_order(z: np.ndarray) -> np.ndarray:
    """Indices sorting each row of z descending (float32: ties by index, via one sort of 64-bit keys)."""
    if z.dtype == np.float32:
        keys = np.empty(z.shape, dtype=np.uint64)
        _kernels()["_sort_keys"](z.view(np.uint32), keys)
        keys.sort(axis=1)  # numpy's vectorised sort: several times faster than an argsort
        order = np.empty(z.shape, dtype=np.int64)
        _kernels()["_order_of_keys"](keys, order)
        return order
    return np.argsort(-z, axis=1)


HEAD_MIN = 32  # scores kept by the sparse-w path at first (×4 per retry while some row needs more)


def _sparse_head(w_np: np.ndarray, mode: str, n: int) -> int:
    """K = the length of w's non-zero head when w is one row, zero beyond K ≪ n and mode is p4/3; else 0.

    Not for l2: there PAV pools tied scores in the tail into blocks whose backward mixes their gradients
    (d = 1), which the shortcut (tail gradient 0, the derivative away from ties) would not reproduce."""
    if mode != "p4/3" or w_np.shape[0] != 1:
        return 0
    nonzero = np.flatnonzero(w_np[0])
    k = int(nonzero[-1]) + 1 if nonzero.size else 1
    return k if max(HEAD_MIN, 4 * k) * 4 <= n else 0


def _project_head(z_np: np.ndarray, w_np: np.ndarray, mode: str, k: int) -> tuple | None:
    """The projection when w is zero beyond its first k entries, from the M largest scores only.

    Past the head, PAV sees x_i = s_i (w_i = 0), already decreasing, so every score below the last
    block that reaches into the M largest is a singleton block: v_i = s_i, y_i = 0 and (Jᵀg)_i = 0.
    That holds per row when the M-th largest is its own block and strictly above the (M+1)-th; with
    the same order of ties as the full sort, the result is the full path's, bit for bit. Returns
    (indices [B, M], y, d, block over them) or None where some row needs more than n/4 scores.
    """
    from losses.select import top_indices

    batch, n = z_np.shape
    if np.isnan(z_np).any():
        return None
    m = max(HEAD_MIN, 4 * k)
    no_label = np.full(batch, -1, dtype=np.int64)
    while m * 4 <= n:
        idx = top_indices(z_np, no_label, m + 1)
        sub = np.take_along_axis(z_np, idx, 1)
        order = np.ascontiguousarray(np.broadcast_to(np.arange(m), (batch, m)))
        y = np.empty((batch, m), dtype=z_np.dtype)
        d = np.empty_like(y)
        block = np.empty((batch, m), dtype=np.int64)
        _kernels()["_project_rows"](np.ascontiguousarray(sub[:, :m]), order, np.ascontiguousarray(w_np[:, :m]),
                                    _MODE_ID[mode], y, d, block)
        if bool(((block[:, m - 1] == m - 1) & (sub[:, m - 1] > sub[:, m])).all()):
            return np.ascontiguousarray(idx[:, :m]), y, d, block
        m *= 4
    return None


class _Projection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, w, mode: str):  # type: ignore[override]
        kernels = _kernels()
        z_np = np.ascontiguousarray(z.detach().cpu().numpy())
        w_rows = w[:1] if w.stride(0) == 0 else w  # an expanded [n] row: read once, not B copies
        w_np = np.ascontiguousarray(w_rows.detach().double().cpu().numpy())
        k = _sparse_head(w_np, mode, z_np.shape[1]) if z_np.dtype == np.float32 else 0
        head = _project_head(z_np, w_np, mode, k) if k else None
        if head is not None:  # only the largest scores move; the rest are 0 with zero gradient
            idx, y_head, d, block = head
            y = np.zeros_like(z_np)
            np.put_along_axis(y, idx, y_head, 1)
            ctx.head = True
            ctx.save_for_backward(torch.from_numpy(idx), torch.from_numpy(d), torch.from_numpy(block))
            return torch.from_numpy(y).to(z.device)
        order = _descending_order(z_np)
        y = np.empty_like(z_np)
        d = np.empty_like(z_np)
        block = np.empty(z_np.shape, dtype=np.int64)
        kernels["_project_rows"](z_np, order, w_np, _MODE_ID[mode], y, d, block)
        ctx.head = False
        ctx.save_for_backward(torch.from_numpy(order), torch.from_numpy(d), torch.from_numpy(block))
        return torch.from_numpy(y).to(z.device)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        order, d, block = ctx.saved_tensors
        grad_np = np.ascontiguousarray(grad.detach().cpu().to(d.dtype).numpy())
        if ctx.head:  # order = the head's indices; the rest of the gradient is 0
            sub = np.ascontiguousarray(np.take_along_axis(grad_np, order.numpy(), 1))
            local = np.ascontiguousarray(np.broadcast_to(np.arange(sub.shape[1]), sub.shape))
            out_sub = np.empty_like(sub)
            _kernels()["_backward_rows"](sub, local, d.numpy(), block.numpy(), out_sub)
            out = np.zeros_like(grad_np)
            np.put_along_axis(out, order.numpy(), out_sub, 1)
            return torch.from_numpy(out).to(grad.device), None, None
        out = np.empty_like(grad_np)
        _kernels()["_backward_rows"](grad_np, order.numpy(), d.numpy(), block.numpy(), out)
        return torch.from_numpy(out).to(grad.device), None, None


def projection_at(z: torch.Tensor, w: torch.Tensor, index: torch.Tensor, mode: str = "l2") -> torch.Tensor:
    """``permutahedron_projection(z, w, mode).gather(1, index[:, None])[:, 0]``, [B]; on the CPU (float32/64)
    without the index sort (``losses.isotonic_label``)."""
    if z.device.type != "cpu" or z.dtype not in (torch.float32, torch.float64):
        return permutahedron_projection(z, w, mode).gather(1, index.view(-1, 1)).squeeze(1)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    from losses.isotonic_label import ProjectionAt

    return ProjectionAt.apply(z, w.to(z.dtype), mode, index.long())


def permutahedron_projection(z: torch.Tensor, w: torch.Tensor, mode: str = "l2") -> torch.Tensor:
    """y = ∇Ω*(z − v*) ∈ P(w) (or P(e^w) for ``kl``), [B, n]; w: [n] or [B, n], sorted descending."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if z.dtype not in (torch.float32, torch.float64):  # half precisions: computed in float32
        return _Projection.apply(z.float(), w.float().expand_as(z), mode).to(z.dtype)
    w = w.to(z.dtype).expand_as(z)
    return _Projection.apply(z, w, mode)
