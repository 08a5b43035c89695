"""The top-k transition loss fused on the CPU: row maxima and top-k indices in one compiled pass, one exp.

L_b = lse_b − (1 − λ)·s_y − λ·g_b with lse = log Σ_j e^{s_j}, g_b = log Σ_{j∈T} e^{s_j} if y ∈ T (T the k
largest scores) else s_y; this is (1 − λ)·CE + λ·grouped of losses/transition.py, per sample.
∂L/∂s_j = p_j − (1 − λ)·[j = y] − λ·(q_j·[j ∈ T] if y ∈ T else [j = y]), p = softmax(s), q = softmax(s_T).

Work per call on [B, n]: the compiled pass (row maximum and the top-k, see ``_rows``), e = exp(s − max)
(NumPy's exp: SIMD at every logit scale, where torch's float32 exp takes a slow path once most results
underflow, 25× slower at logit scale 30 on the CPUs we measured), its row sums; backward: one product
g/Σe · e and a scatter of [B, k + 1] corrections. ``torch.topk`` + ``log_softmax`` + gathers and their
autograd backward cost 3× ``F.cross_entropy`` at n = 1000; this path ~1.5×.

Order of T: ties are broken towards the lower class index (torch.topk leaves it unspecified); NaN
scores make the row's loss NaN, as in the torch path.
"""
from __future__ import annotations

import math

import numpy as np
import torch

RESIDUES = 64  # residue classes of the threshold pass (a multiple of the SIMD width)
CHUNK = 16  # scores per test in the collecting pass
KMAX = RESIDUES  # larger k use torch.topk (the threshold needs k residue classes)
_KERNEL = None


def _push(keys, idx, filled, k, x, j):  # pragma: no cover - compiled
    """Insert score x (index j) into the descending buffer keys/idx holding ``filled`` ≤ k entries
    (ties keep the earlier index in front; NaN ranks above every number); returns the new fill."""
    key = math.inf if x != x else x
    if filled == k:
        if not key > keys[k - 1]:
            return filled
        pos = k - 1
    else:
        pos = filled
        filled += 1
    while pos > 0 and keys[pos - 1] < key:
        keys[pos] = keys[pos - 1]
        idx[pos] = idx[pos - 1]
        pos -= 1
    keys[pos] = key
    idx[pos] = j
    return filled


def _rows(s, k, top, rowmax):  # pragma: no cover - compiled
    """Per row of s [B, n]: rowmax[b] = max_j s[b, j] and top[b] = the k largest indices, descending.

    Pass 1 (vectorised, no branch): the maxima of the 64 residue classes j mod 64 over the full blocks of
    64 scores; their k-th largest t is ≤ the k-th largest score (k classes each hold a score ≥ t). Pass 2:
    chunks of 16 scores with any score ≥ t (a vectorised count) go through the sorted buffer, which
    then holds the exact top k (NaN first), and the first is the row's maximum. Rows with n < 64 or fewer
    than k scores ≥ t (k NaN class maxima) are redone by a plain scan (every score offered to the buffer).
    """
    batch, n = s.shape
    ng = n - n % RESIDUES
    mx = np.empty(RESIDUES, dtype=s.dtype)
    order = np.empty(k)
    slot = np.empty(k, dtype=np.int64)
    keys = np.empty(k)
    for b in range(batch):
        row = s[b]
        out = top[b]
        filled = 0
        if ng > 0 and k <= RESIDUES:
            mx[:] = row[:RESIDUES]
            for g in range(RESIDUES, ng, RESIDUES):
                blk = row[g:g + RESIDUES]
                for q in range(RESIDUES):
                    x = blk[q]
                    mx[q] = x if x > mx[q] else mx[q]
            cnt = 0  # the k largest class maxima, descending (NaN ranks first: the row comes out NaN)
            for q in range(RESIDUES):
                cnt = _push(order, slot, cnt, k, mx[q], q)
            t = order[k - 1]
            nc = n - n % CHUNK
            for c in range(0, nc, CHUNK):
                blk = row[c:c + CHUNK]
                hits = 0
                for q in range(CHUNK):
                    hits += not blk[q] < t  # NaN counts (it ranks first)
                if hits > 0:
                    for q in range(CHUNK):
                        if not blk[q] < t:
                            filled = _push(keys, out, filled, k, blk[q], c + q)
            for j in range(nc, n):
                if not row[j] < t:
                    filled = _push(keys, out, filled, k, row[j], j)
        if filled < k:  # n < 64, k > RESIDUES or k NaN class maxima: every score
            filled = 0
            for j in range(n):
                filled = _push(keys, out, filled, k, row[j], j)
        rowmax[b] = row[out[0]]  # NaN if the row has one


def top_and_max(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(top [B, k] int64 indices of the k largest scores per row, descending, ties by index;
    rowmax [B]) for a C-contiguous float32/float64 array s [B, n] with n ≥ k (compiled)."""
    global _KERNEL
    if _KERNEL is None:
        import numba

        globals()["_push"] = numba.njit(cache=True, inline="always")(_push)
        _KERNEL = numba.njit(cache=True, nogil=True)(_rows)
    top = np.empty((s.shape[0], k), dtype=np.int64)
    rowmax = np.empty(s.shape[0], dtype=s.dtype)
    _KERNEL(s, k, top, rowmax)
    return top, rowmax


class FusedTransition(torch.autograd.Function):
    """scores [B, n] (CPU, float32/float64), labels [B], k, λ -> per-sample (1 − λ)·CE + λ·grouped [B].

    The [B, n] work is the compiled pass, one subtraction, NumPy's exp and a row sum (forward) and one
    product and a scatter (backward); the [B] and [B, k] arithmetic runs in NumPy (cheaper than torch ops
    at these sizes)."""

    @staticmethod
    def forward(ctx, scores, labels, k: int, lam: float):  # type: ignore[override]
        s = scores.detach().contiguous()
        s_np, lab = s.numpy(), labels.numpy()
        top, m = top_and_max(s_np, k)
        e = torch.sub(s, torch.from_numpy(m)[:, None])
        rows = np.arange(len(lab))
        with np.errstate(all="ignore"):  # NaN/inf rows give NaN, as log_softmax does
            np.exp(e.numpy(), out=e.numpy())
            total = e.sum(1).numpy()
            e_top = e.numpy()[rows[:, None], top]
            total_top = e_top.sum(1)
            in_top = (top == lab[:, None]).any(1)
            log_total = np.log(total)
            ce = log_total + m - s_np[rows, lab]
            grouped = np.where(in_top, log_total - np.log(total_top), ce)
            loss = ce if lam == 0.0 else (grouped if lam == 1.0 else (1.0 - lam) * ce + lam * grouped)
            # gradient pieces: −λ·q_j on T where y ∈ T (q = softmax over T), −(1 − λ·[y ∈ T]) at y
            corr = np.empty((len(lab), k + 1), dtype=s_np.dtype)
            corr[:, :k] = np.where(in_top[:, None], e_top / total_top[:, None], 0.0) * -lam
            corr[:, k] = np.where(in_top, lam - 1.0, -1.0)
        ctx.save_for_backward(e, torch.from_numpy(total), torch.from_numpy(corr),
                              torch.from_numpy(np.concatenate([top, lab[:, None]], 1)))
        return torch.from_numpy(np.asarray(loss, dtype=s_np.dtype))

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        e, total, corr, where = ctx.saved_tensors
        g = grad_out.to(e.dtype)
        grad = e * (g / total)[:, None]
        grad.scatter_add_(1, where, corr * g[:, None])
        return grad, None, None, None
