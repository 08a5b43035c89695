"""CPU fast paths (numba kernels) for the top-k SVMs (hard and smoothed) of ``losses.lapin``, and the row
selection that ``losses.lapin_entropy_kernels`` shares.

Each returns the per-row losses and their gradient with respect to the scores (the label column gets
minus the sum of the others), computed in float64 scalars per row; ``losses.lapin`` wraps them in an
autograd Function. See its docstring for the mathematics; the choices made here:

* Selection: the k largest of a prefix of the row (insertion into a sorted buffer) bound the row's k-th
  largest from below; one branch-free pass collects the columns above that bound, among which the exact
  top k (insertion; np.partition for k > 16) and the columns within ``slack`` of the k-th largest are
  found. No row is sorted: torch's CPU sort and topk cost more than the whole of cross-entropy.
* Smoothed SVMs, x* = proj(v), v_j = (1 + s_j − s_y)/γ over j ≠ y. Capped simplex {0 ≤ x ≤ u = 1/k,
  Σx = 1}: x = clip(v − t, 0, u) with v_[k] − u ≤ t < v_[k] (the k largest entries alone can carry the
  mass 1, no fewer can), so only the entries above v_[k] − u are sorted and t is the root of the
  piecewise-linear Σ clip(w − t, 0, u) = 1, found by walking its breakpoints {w_i} ∪ {w_i − u} in order.
  Δ_k^β: t ← max(t, 0) (t < 0 means the budget Σx ≤ 1 is inactive: x = clip(v, 0, u)). Δ_k^α with a
  negative budget multiplier (the top-k cone {0 ≤ x_i ≤ Σx/k}): the closed-form KKT candidates of
  ``losses.lapin._kkt_threshold`` on the top W entries, W = max(4k, 32), ×4 while the KKT check says
  that the support is larger (rows whose margins are nearly all negative).
* Hard SVMs: the top k from the selection, 1/k on them (the subgradient autograd gives).
* A NaN score gives the row a NaN loss and gradient, as the torch path does.
"""
from __future__ import annotations


import numpy as np
import torch

_SMALL_K = 16  # the k largest by insertion into a sorted buffer up to here, by np.partition above
_COMPILED = False


def _select(row, y, k, slack, buf, idx, cand):
    """(c, nans): buf[:k] = the k largest values of row without column y, sorted descending (ties: first
    column first), idx[:k] their columns; cand[:c] = the columns (≠ y) whose value exceeds (k-th largest −
    slack), and possibly a few more; nans = the number of NaNs in the row (then nothing else is set).
    cand needs room for len(row) + 1 entries."""
    n = row.shape[0]
    nans = 0
    for j in range(n):
        nans += row[j] != row[j]
    if nans:
        return 0, nans
    if k > _SMALL_K:  # insertion would cost O(k) per insert: a partition, then one more pass
        vals = np.empty(n - 1)
        for j in range(n - 1):
            vals[j] = row[j if j < y else j + 1]
        kth = np.partition(vals, n - 1 - k)[n - 1 - k]
        c, top = 0, 0
        for j in range(n):
            if j != y and row[j] > kth - slack:
                cand[c] = j
                c += 1
                if row[j] > kth:
                    buf[top], idx[top] = row[j], j
                    top += 1
        for j in range(n):  # the ties at the k-th largest value, in column order
            if top == k:
                break
            if j != y and row[j] == kth:
                buf[top], idx[top] = kth, j
                top += 1
        order = np.argsort(-buf[:k], kind="mergesort")
        buf[:k], idx[:k] = buf[:k][order].copy(), idx[:k][order].copy()
        return c, 0
    # the k largest of a prefix of the row: its k-th largest is a lower bound of the row's
    for i in range(k):
        buf[i] = -np.inf
        idx[i] = -1
    head = min(n, max(8 * k, 128))
    for j in range(head):
        x = row[j]
        if x > buf[k - 1] and j != y:  # insertion, written out (a call here costs 20× more)
            q = k - 1
            while q > 0 and buf[q - 1] < x:
                buf[q], idx[q] = buf[q - 1], idx[q - 1]
                q -= 1
            buf[q], idx[q] = x, j
    bound = buf[k - 1] - slack
    c = 0
    for j in range(n):  # branch-free: most entries fail, and a mispredicted branch costs more than a store
        cand[c] = j
        c += row[j] >= bound
    for i in range(c):  # the rest of the top k, among the candidates (a superset of them), in column order
        j = cand[i]
        x = row[j]
        if j >= head and x > buf[k - 1] and j != y:  # ties: the first column stays ahead
            q = k - 1
            while q > 0 and buf[q - 1] < x:
                buf[q], idx[q] = buf[q - 1], idx[q - 1]
                q -= 1
            buf[q], idx[q] = x, j
    bound = buf[k - 1] - slack
    kept = 0
    for i in range(c):
        j = cand[i]
        cand[kept] = j
        kept += (row[j] > bound) and (j != y)
    return kept, 0


def _capped_threshold(w, u):
    """t with Σ_i clip(w_i − t, 0, u) = 1, for w sorted descending, len(w)·u ≥ 1 (breakpoint walk)."""
    c = w.shape[0]
    p, q, slope, f, cur = 0, 0, 0, 0.0, w[0]
    while q < c:
        if p < c and w[p] >= w[q] - u:  # entry p becomes free as t passes w_p
            nxt, free = w[p], True
        else:  # entry q reaches the cap as t passes w_q − u
            nxt, free = w[q] - u, False
        f_next = f + slope * (cur - nxt)
        if slope > 0 and f_next >= 1.0:
            return cur - (1.0 - f) / slope
        f, cur = f_next, nxt
        if free:
            slope += 1
            p += 1
        else:
            slope -= 1
            q += 1
    return cur


def _cone_kkt(vs, k, width):
    """(u, t, violation) of the top-k cone projection from the sorted top entries vs (port of the cone
    case of ``losses.lapin._kkt_threshold``: the candidate with the smallest KKT violation)."""
    total = vs.shape[0]
    prefix = np.zeros(width + 1)
    for i in range(width):
        prefix[i + 1] = prefix[i] + vs[i]
    best, best_u, best_t = np.inf, 0.0, 0.0
    for m in range(min(k, width) + 1):
        s_u = prefix[m]
        for ell in range(width - m + 1):
            s_m = prefix[m + ell] - s_u
            if m == k and ell == 0:  # x = mean of the top k on k entries
                u = s_u / k
                t = vs[k - 1] - u
            else:
                det = -float((k - m) ** 2) - ell * m
                u = (-(k - m) * s_m - ell * s_u) / det
                t = ((k - m) * s_u - m * s_m) / det
            bad = -u
            if m >= 1:
                bad = max(bad, u + t - vs[m - 1])
            if m < total:
                bad = max(bad, vs[m] - t - u)
            i = m + ell  # last free entry v_[m+l] above t, first zero v_[m+l+1] below t (1-based)
            above = np.inf if i == 0 else vs[i - 1]
            below = vs[i] if i < total else -np.inf
            bad = max(bad, t - above)
            bad = max(bad, below - t)
            if bad < best:
                best, best_u, best_t = bad, u, t
    return best_u, best_t, best


def _cone_threshold(v, n, k, tol):
    """(u, t) of the top-k cone projection of v[:n]: the KKT solve on the top W entries, W growing."""
    width = min(n, max(4 * k, 32))
    while True:
        if width >= n:
            vs = np.sort(v[:n])[::-1]
            u, t, _ = _cone_kkt(vs, k, n)
            return u, t
        part = np.partition(v[:n], n - width - 1)[n - width - 1 :]
        vs = np.sort(part)[::-1]  # the top width + 1 entries
        u, t, bad = _cone_kkt(vs, k, width)
        if bad <= tol:
            return u, t
        width *= 4


def _svm_rows(s, labels, k, gamma, alpha, loss, grad):
    """Smoothed top-k SVM per row: loss[b] = ⟨h, x⟩ − (γ/2)‖x‖², grad[b] = ∂loss/∂s (x; label: −Σx)."""
    batch, n = s.shape
    u_cap = 1.0 / k
    v = np.empty(n - 1)
    cand = np.empty(n + 1, dtype=np.int64)
    buf = np.empty(k)
    idx = np.empty(k, dtype=np.int64)
    for b in range(batch):
        row = s[b]
        y = labels[b]
        sy = float(row[y])
        grad[b, :] = 0.0
        # v_j > v_[k] − u  ⟺  s_j > s_[k] − γu; the slack is widened so that rounding cannot drop an entry
        slack = gamma * u_cap * (1.0 + 1e-9) + 1e-12 * (abs(sy) + 1.0)
        c, nans = _select(row, y, k, slack, buf, idx, cand)
        if nans:
            loss[b] = np.nan
            grad[b, :] = np.nan
            continue
        w = np.empty(c)
        for i in range(c):
            w[i] = (1.0 + (float(row[cand[i]]) - sy)) / gamma
        w = np.sort(w)[::-1]
        if w[0] <= 0.0:  # x = 0 for both sets
            loss[b] = 0.0
            continue
        t = _capped_threshold(w, u_cap)
        cap = u_cap
        full = False
        if not alpha:
            t = max(t, 0.0)
        else:  # the budget multiplier ρ < 0: Σx < 1, the projection is the one onto the top-k cone
            rho = 0.0
            for i in range(c):
                rho += max(w[i] - t - u_cap, 0.0)
            if t + rho / k < 0.0:
                amax = 0.0
                for j in range(n - 1):
                    v[j] = (1.0 + (float(row[j if j < y else j + 1]) - sy)) / gamma
                    amax = max(amax, abs(v[j]))
                cap, t = _cone_threshold(v, n - 1, k, 1e-9 * (1.0 + amax))
                full = True  # the support may reach beyond the candidates
        lin, sq, tot = 0.0, 0.0, 0.0
        for i in range(n - 1 if full else c):
            j = (i if i < y else i + 1) if full else cand[i]
            vj = (1.0 + (float(row[j]) - sy)) / gamma
            x = min(max(vj - t, 0.0), cap)
            lin += vj * x
            sq += x * x
            tot += x
            grad[b, j] = x
        grad[b, y] = -tot
        loss[b] = gamma * (lin - 0.5 * sq)


def _hard_svm_rows(s, labels, k, alpha, loss, grad):
    """Top-k SVM α (max{0, mean of the top k h}) or β (mean of the top k h₊), h_j = 1 + s_j − s_y, per row,
    with the (sub)gradient torch's autograd gives: 1/k on the top k (β: where h ≥ 0), label −Σ."""
    batch, n = s.shape
    cand = np.empty(n + 1, dtype=np.int64)
    buf = np.empty(k)
    idx = np.empty(k, dtype=np.int64)
    for b in range(batch):
        row = s[b]
        y = labels[b]
        sy = float(row[y])
        grad[b, :] = 0.0
        _, nans = _select(row, y, k, 0.0, buf, idx, cand)
        if nans:
            loss[b] = np.nan
            grad[b, :] = np.nan
            continue
        value, tot = 0.0, 0.0
        if alpha:
            for i in range(k):
                value += 1.0 + (buf[i] - sy)
            value /= k
            if value >= 0.0:
                for i in range(k):
                    grad[b, idx[i]] = 1.0 / k
                tot = 1.0
            else:
                value = 0.0
        else:
            for i in range(k):
                h = 1.0 + (buf[i] - sy)
                if h >= 0.0:
                    value += h
                    grad[b, idx[i]] = 1.0 / k
                    tot += 1.0 / k
            value /= k
        loss[b] = value
        grad[b, y] = -tot


def _compile() -> None:
    """Compile the kernels once (numba, cached on disk); imported lazily so `import losses` stays fast."""
    global _COMPILED
    if not _COMPILED:
        import numba

        jit = numba.njit(cache=True)
        for name in ("_select", "_capped_threshold", "_cone_kkt", "_cone_threshold", "_svm_rows", "_hard_svm_rows"):
            globals()[name] = jit(globals()[name])
        _COMPILED = True


def svm_rows(s: torch.Tensor, labels: torch.Tensor, k: int, gamma: float,
             alpha: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B], grad [B, n]) of the smoothed top-k SVM α (alpha) or β, γ > 0; s: contiguous float32/64
    CPU scores [B, n], labels: int64 [B] in range."""
    _compile()
    loss = np.empty(s.shape[0])
    grad = torch.empty_like(s)
    _svm_rows(s.numpy(), labels.numpy(), k, float(gamma), bool(alpha), loss, grad.numpy())
    return torch.from_numpy(loss).to(s.dtype), grad


def hard_svm_rows(s: torch.Tensor, labels: torch.Tensor, k: int, alpha: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B], grad [B, n]) of the top-k SVM α (alpha) or β with γ = 0; arguments as for `svm_rows`."""
    _compile()
    loss = np.empty(s.shape[0])
    grad = torch.empty_like(s)
    _hard_svm_rows(s.numpy(), labels.numpy(), k, bool(alpha), loss, grad.numpy())
    return torch.from_numpy(loss).to(s.dtype), grad
