"""CPU fast paths for the top-k entropy and the truncated top-k entropy of ``losses.lapin``: the row
selection of ``losses.lapin_kernels`` (numba), torch's vectorised softmax for the exponentials (several
times faster than a compiled scalar loop's), and per-row numba kernels around it.

* Top-k entropy: d = min(s − s_[k], 0) (so the top k count 1 each and the tail sum is the total minus k,
  without cancellation against the large terms), exponents clamped below at −60 (float32) / −600
  (float64): this changes nothing above the working precision and keeps subnormals (slow on CPUs)
  out. The total is 1/p at the k-th largest; the closed form of ``losses.lapin.TopKEntropy`` per row
  (O(k)); the gradient x* overwrites p (free entries: a per-row multiple of p, capped at σ/k).
* Truncated top-k entropy: the k − 1 largest other scores set to −∞, softmax, and log Σ e^s =
  s_m − log p_m at the largest kept score m (p_m ≥ 1/n); the gradient is p, label p_y − 1.
* A NaN score gives the row a NaN loss and gradient, as the torch path does.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from losses import lapin_kernels
from losses.lapin_kernels import _select  # replaced by the compiled version in _compile()

_EXP_FLOOR = {torch.float32: -60.0, torch.float64: -600.0}
_COMPILED = False


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

        lapin_kernels._compile()
        globals()["_select"] = lapin_kernels._select
        jit = numba.njit(cache=True)
        for name in ("_truncated_prepare", "_truncated_finish", "_entropy_prepare", "_logaddexp", "_entropy_finish"):
            globals()[name] = jit(globals()[name])
        _COMPILED = True


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
    grad = torch.softmax(d, dim=1)
    del d
    loss = np.empty(batch)
    _entropy_finish(s_np, lab_np, top, idx, nans, loss, grad.numpy())
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
