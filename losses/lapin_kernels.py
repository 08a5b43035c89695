"""CPU fast paths (numba kernels) for the top-k SVMs (hard and smoothed) and top-k entropies of ``losses.lapin``.

Both return the per-row losses and their gradient with respect to the scores (the label column gets
minus the sum of the others), computed in float64 scalars per row; ``losses.lapin`` wraps them in an
autograd Function. See its docstring for the mathematics; the choices made here:

* Selection: one pass per row keeps the k largest scores (insertion into a sorted buffer; np.partition
  for k > 16) and the columns within ``slack`` of the running k-th largest. The row is scanned in chunks
  of 16 whose comparisons against the running bound are counted first (vectorised): a chunk without a
  hit is skipped. No row is sorted; torch's CPU sort and topk cost more than the whole loss.
* Smoothed SVMs, x* = proj(v), v_j = (1 + s_j − s_y)/γ over j ≠ y. Capped simplex {0 ≤ x ≤ u = 1/k,
  Σx = 1}: x = clip(v − t, 0, u) with v_[k] − u ≤ t < v_[k] (the k largest entries alone can carry the
  mass 1, no fewer can), so only the entries above v_[k] − u are sorted and t is the root of the
  piecewise-linear Σ clip(w − t, 0, u) = 1, found by walking its breakpoints {w_i} ∪ {w_i − u} in order.
  Δ_k^β: t ← max(t, 0) (t < 0 means the budget Σx ≤ 1 is inactive: x = clip(v, 0, u)). Δ_k^α with a
  negative budget multiplier (the top-k cone {0 ≤ x_i ≤ Σx/k}): the closed-form KKT candidates of
  ``losses.lapin._kkt_threshold`` on the top W entries, W = max(4k, 32), ×4 while the KKT check says
  that the support is larger (rare: rows whose margins are nearly all negative).
* Top-k entropy: e^{a_j − a_[k]} clipped at 1 (the top k count 1 each, so the tail sum is the total
  minus k, without cancellation against the large terms) by torch's vectorised softmax, whose
  exponents are clamped below at −60 (float32) / −600 (float64): exps that small are below the working
  precision of every sum they enter, and the clamp keeps subnormals (slow on CPUs) out. The closed form
  per row (O(k)) is a numba kernel.
* Hard SVMs: the top k from the selection, 1/k on them. Truncated entropy: the k − 1 largest other
  scores set to −∞, torch's softmax, log Σ e^s = s_m − log p_m at the largest kept score m (p_m ≥ 1/n).
* A NaN score gives the row a NaN loss and gradient, as the torch path does.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_SMALL_K = 16  # the k largest by insertion into a sorted buffer up to here, by np.partition above
_CHUNK = 16
_EXP_FLOOR = {torch.float32: -60.0, torch.float64: -600.0}
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


def _truncated_prepare(s, labels, k, top_col, nans, d):
    """Per row: d = s with the k − 1 largest non-label scores at −∞ (the dropped set), top_col [B] the
    column of the largest kept score (the label's or the k-th largest other), nans [B]."""
    batch, n = s.shape
    cand = np.empty(n + 1, dtype=np.int64)
    buf = np.empty(k)
    idx = np.empty(k, dtype=np.int64)
    for b in range(batch):
        row = s[b]
        y = labels[b]
        _, nans[b] = _select(row, y, k, 0.0, buf, idx, cand)
        for j in range(n):
            d[b, j] = row[j]
        if nans[b]:
            top_col[b] = y
            continue
        for i in range(k - 1):
            d[b, idx[i]] = -np.inf
        top_col[b] = idx[k - 1] if buf[k - 1] > row[y] else y


def _truncated_finish(s, labels, top_col, nans, loss, p):
    """loss = log Σ_kept e^s − s_y = s_m − log p_m − s_y (m: the largest kept score, p_m ≥ 1/n) and,
    overwriting p = softmax(d), the gradient (p; label p_y − 1; dropped 0)."""
    for b in range(s.shape[0]):
        y = labels[b]
        if nans[b]:
            loss[b] = np.nan
            p[b, :] = np.nan
            continue
        m = top_col[b]
        loss[b] = float(s[b, m]) - math.log(float(p[b, m])) - float(s[b, y])
        p[b, y] -= 1.0


def _entropy_prepare(s, labels, k, floor, top, idx, nans, d):
    """Per row: top [B, k] (the k largest scores without the label, sorted), idx [B, k] their columns,
    nans [B], and d = clamp(s − s_[k], floor, 0) with −∞ at the label (input of the softmax)."""
    batch, n = s.shape
    cand = np.empty(n + 1, dtype=np.int64)
    buf = np.empty(k)
    ids = np.empty(k, dtype=np.int64)
    for b in range(batch):
        row = s[b]
        y = labels[b]
        _, nans[b] = _select(row, y, k, 0.0, buf, ids, cand)
        if nans[b]:  # placeholders: the row's loss and gradient are set to NaN
            top[b, :] = 0.0
            idx[b, :] = y
            d[b, :] = 0.0
            continue
        top[b, :] = buf
        idx[b, :] = ids
        kth = buf[k - 1]
        for j in range(n):
            d[b, j] = min(max(row[j] - kth, floor), 0.0)
        d[b, y] = -np.inf


def _logaddexp(a, b):
    if a == -np.inf:
        return b
    if b == -np.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def _entropy_finish(s, labels, top, idx, nans, loss, p):
    """Per row, from p = softmax(d) of `_entropy_prepare`: the loss log(1 + k·e^w) (closed form of
    ``losses.lapin.TopKEntropy``) and, overwriting p, its gradient x* (label: −σ = −Σx*)."""
    batch, k = top.shape
    a = np.empty(k)
    log_z = np.empty(k)
    log_km = np.empty(k)
    for m in range(k):
        log_km[m] = math.log(k - m)
    for b in range(batch):
        if nans[b]:
            loss[b] = np.nan
            p[b, :] = np.nan
            continue
        y = labels[b]
        sy = float(s[b, y])
        for i in range(k):
            a[i] = top[b, i] - sy  # the k largest margins a_[1] ≥ … ≥ a_[k]
        total = 1.0 / float(p[b, idx[b, k - 1]])  # Σ_{j≠y} e^{d_j}: d = 0 at the k-th largest
        tail = max(total - k, 0.0)  # the top k count 1 each
        # log Z_m = log(Σ_{i≥m} e^{a_[i]} + tail), in units of e^{a_[k]} (log space if that could overflow)
        if a[0] - a[k - 1] < 600.0:
            acc = tail
            for m in range(k - 1, -1, -1):
                acc += math.exp(a[m] - a[k - 1])
                log_z[m] = a[k - 1] + math.log(acc)
        else:
            acc = a[k - 1] + math.log(tail) if tail > 0.0 else -np.inf
            for m in range(k - 1, -1, -1):
                acc = _logaddexp(acc, a[m])
                log_z[m] = acc
        best, w_star, lz_star, m_star, s_u = np.inf, 0.0, 0.0, 0, 0.0
        for m in range(k):
            w = (s_u + (k - m) * (log_z[m] - log_km[m])) / k
            tau = w - (s_u - m * w) / (k - m)
            above = a[m - 1] if m > 0 else np.inf
            bad = max(max(a[m] - tau, 0.0), max(tau - above, 0.0))  # a_[m] ≥ τ ≥ a_[m+1]
            if bad < best:
                best, w_star, lz_star, m_star = bad, w, log_z[m], m
            s_u += a[m]
        z = w_star + math.log(k)
        loss[b] = max(z, 0.0) + math.log1p(math.exp(-abs(z)))
        sigma = 1.0 / (1.0 + math.exp(-z)) if z >= 0.0 else math.exp(z) / (1.0 + math.exp(z))
        cap = sigma / k
        # free entries: x_j = σ(k−m)/k · e^{a_j}/Z_m = e^{a_j + lc} = e^{a_[k] + lc} · total · p_j; capped: σ/k
        lc = math.log(sigma * (k - m_star) / k) - lz_star if sigma > 0.0 else -np.inf
        scale = math.exp(a[k - 1] + lc) * total
        row = p[b]
        for j in range(row.shape[0]):
            row[j] = min(cap, scale * row[j])
        for i in range(k):  # the top k, whose e^{d} was clipped at 1
            arg = a[i] + lc
            row[idx[b, i]] = cap if arg >= 0.0 else min(cap, math.exp(arg))
        row[y] = -sigma


def _compile() -> None:
    """Compile the kernels once (numba, cached on disk); imported lazily so `import losses` stays fast."""
    global _COMPILED
    if not _COMPILED:
        import numba

        jit = numba.njit(cache=True)
        for name in ("_select", "_capped_threshold", "_cone_kkt", "_cone_threshold", "_svm_rows", "_hard_svm_rows",
                     "_truncated_prepare", "_truncated_finish", "_entropy_prepare", "_logaddexp", "_entropy_finish"):
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


def entropy_rows(s: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B], grad [B, n]) of the top-k entropy; arguments as for `svm_rows`."""
    _compile()
    batch = s.shape[0]
    top = np.empty((batch, k))
    idx = np.empty((batch, k), dtype=np.int64)
    nans = np.empty(batch, dtype=np.int64)
    d = torch.empty_like(s)
    s_np, lab_np = s.numpy(), labels.numpy()
    _entropy_prepare(s_np, lab_np, k, _EXP_FLOOR[s.dtype], top, idx, nans, d.numpy())
    grad = torch.softmax(d, dim=1)  # torch's vectorised exp: several times faster than a compiled loop's
    del d
    loss = np.empty(batch)
    _entropy_finish(s_np, lab_np, top, idx, nans, loss, grad.numpy())
    return torch.from_numpy(loss).to(s.dtype), grad


def hard_svm_rows(s: torch.Tensor, labels: torch.Tensor, k: int, alpha: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B], grad [B, n]) of the top-k SVM α (alpha) or β with γ = 0; arguments as for `svm_rows`."""
    _compile()
    loss = np.empty(s.shape[0])
    grad = torch.empty_like(s)
    _hard_svm_rows(s.numpy(), labels.numpy(), k, bool(alpha), loss, grad.numpy())
    return torch.from_numpy(loss).to(s.dtype), grad


def truncated_entropy_rows(s: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B], grad [B, n]) of the truncated top-k entropy; arguments as for `svm_rows`."""
    _compile()
    batch = s.shape[0]
    top_col = np.empty(batch, dtype=np.int64)
    nans = np.empty(batch, dtype=np.int64)
    d = torch.empty_like(s)
    s_np, lab_np = s.numpy(), labels.numpy()
    _truncated_prepare(s_np, lab_np, k, top_col, nans, d.numpy())
    grad = torch.softmax(d, dim=1)
    del d
    loss = np.empty(batch)
    _truncated_finish(s_np, lab_np, top_col, nans, loss, grad.numpy())
    return torch.from_numpy(loss).to(s.dtype), grad
