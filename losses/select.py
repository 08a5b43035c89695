"""Top-m preselection: the label's score and the m − 1 largest other scores, compiled for the CPU.

``torch.topk`` on the CPU costs ~3× ``F.cross_entropy`` at n = 1000 for m = 16 (and the scatter that
masks the label out another copy of the scores); here the m-th score is bounded from below by strided
chunk maxima (one vectorised torch ``amax``) and a compiled pass per row (numba) sends only the few
scores above the bound through a small sorted buffer (~0.5× CE at n = 1000, m = 16, batch 256). When there are
few chunks and few candidates (the usual case) the bound and the order come from branch-free counts (the rank
of each among the others, vectorised) instead of a quickselect and an insertion: every batch brings new rows,
whose data-dependent branches mispredict (a diagnostic timing of the selection alone, not a bench-loss figure:
0.32 → 0.21 ms a batch of 256 at n = 1000 over a rotation of 16 batches). Order of the
selection: descending; ties keep the lower class index first; NaN counts as larger than every number
(as in ``torch.topk``), so a NaN score still reaches the loss and the run is recorded ``nan``. Other
devices use ``torch.topk``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_KERNEL = None
STRIDE = 32  # scores per chunk (fewer when count is large: there must be more chunks than count)
SMALL = 64  # up to this many chunks / candidates: branch-free counting selections (O(len²), vectorised)


def _insert(row: np.ndarray, lo: int, hi: int, y: int, threshold: float, count: int, filled: int,
            keys: np.ndarray, out: np.ndarray) -> int:
    """Offer row[lo:hi] (j ≠ y, not below threshold) to the sorted buffer (keys, out) holding ``filled`` ≤
    count entries, descending, ties by index, NaN largest; returns the new fill."""
    for j in range(lo, hi):
        x = row[j]
        if x < threshold:
            continue
        key = math.inf if x != x else x
        if j == y or (filled == count and key <= keys[count - 1]):
            continue
        if filled == count:
            pos = count - 1
        else:
            pos = filled
            filled += 1
        while pos > 0 and keys[pos - 1] < key:  # ties: the earlier index stays in front
            keys[pos] = keys[pos - 1]
            out[pos] = out[pos - 1]
            pos -= 1
        keys[pos] = key
        out[pos] = j
    return filled


def _kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest entry (k ≥ 1) of values (reordered in place; no NaN): quickselect."""
    lo, hi, target = 0, values.shape[0] - 1, k - 1
    while lo < hi:
        pivot = values[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while values[i] > pivot:
                i += 1
            while values[j] < pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break
    return values[target]


def _kth_largest_counting(values: np.ndarray, k: int) -> float:
    """The k-th largest entry (k ≥ 1, no NaN) of a short array, branch-free: the smallest v with fewer than k
    entries above it. O(len²) but vectorised, and without the quickselect's data-dependent branches,
    which mispredict on every new batch (~0.1 ms a batch of 256 at n = 1000)."""
    best = np.inf
    for i in range(values.shape[0]):
        v = values[i]
        above = 0
        for t in range(values.shape[0]):
            above += values[t] > v
        best = min(best, v if above < k else np.inf)
    return best


def _place_by_rank(row: np.ndarray, cand: np.ndarray, ncand: int, count: int, vals: np.ndarray, slots: np.ndarray,
                   out: np.ndarray) -> None:
    """out[:count] = the ``count`` best candidates row[cand[:ncand]] (ncand ≥ count, no NaN, any order),
    descending by score and, among ties, ascending by index: each one's rank is the number of candidates
    before it (a vectorised count; no data-dependent branch), and it goes to slots[rank] (slot ``count``
    takes all the rest)."""
    for t in range(ncand):
        vals[t] = row[cand[t]]
    for i in range(ncand):
        v = vals[i]
        j = cand[i]
        rank = 0
        for t in range(ncand):
            w = vals[t]
            rank += (w > v) | ((w == v) & (cand[t] < j))
        slots[min(rank, count)] = j
    out[:] = slots[:count]


def _insert_any_order(row: np.ndarray, cand: np.ndarray, ncand: int, y: int, count: int, keys: np.ndarray,
                      out: np.ndarray) -> None:
    """Offer the candidates row[cand[:ncand]] (no NaN; any order; j = y left out) to a sorted buffer of
    ``count`` entries, descending by score and, among ties, ascending by index."""
    filled = 0
    for t in range(ncand):
        j = cand[t]
        key = row[j]
        if j == y:
            continue
        if filled == count:
            if key < keys[count - 1] or (key == keys[count - 1] and j > out[count - 1]):
                continue
            pos = count - 1
        else:
            pos = filled
            filled += 1
        while pos > 0 and (keys[pos - 1] < key or (keys[pos - 1] == key and out[pos - 1] > j)):
            keys[pos] = keys[pos - 1]
            out[pos] = out[pos - 1]
            pos -= 1
        keys[pos] = key
        out[pos] = j


def _select_rows(s: np.ndarray, labels: np.ndarray, count: int, strided_maxima: np.ndarray, out: np.ndarray) -> None:
    """out[b] = indices of the ``count`` largest s[b, j], j ≠ labels[b], descending (NaN largest).

    Per row: the maxima of ``chunks`` strided chunks (chunk c = scores c, c + chunks, …; the maxima over
    the complete strides come in as ``strided_maxima`` [B, chunks], the elementwise maximum of the row
    read as [n // chunks, chunks], which torch vectorises; here the rest and the label's chunk without the label);
    the count-th largest of them, T, is a lower bound of the count-th largest score (count chunks
    each hold a score ≥ T), so only the scores ≥ T are candidates (collected in one branch-free pass),
    and they go through a sorted buffer.
    """
    batch, n = s.shape
    chunks = strided_maxima.shape[1]
    full = n // chunks  # complete strides
    maxima = np.empty(chunks, dtype=s.dtype)
    ordered = np.empty(chunks, dtype=s.dtype)
    keys = np.empty(count, dtype=s.dtype)
    wide = np.empty(count)  # float64 keys of the NaN path
    cand = np.empty(n, dtype=np.int64)
    vals = np.empty(SMALL, dtype=s.dtype)
    slots = np.empty(count + 1, dtype=np.int64)
    for b in range(batch):
        row = s[b]
        y = labels[b]
        nans = 0
        for j in range(n):
            nans += row[j] != row[j]
        if nans > 0 or chunks <= count:  # NaN (ordered as largest) or few chunks: every score
            _insert(row, 0, n, y, -math.inf, count, 0, wide, out[b])
            continue
        maxima[:] = strided_maxima[b]
        base = full * chunks
        for c in range(n - base):
            v = row[base + c]
            maxima[c] = v if v > maxima[c] else maxima[c]
        if y >= 0:  # the label's chunk without the label
            c = y % chunks
            top = -np.inf
            for j in range(c, n, chunks):
                if j != y and row[j] > top:
                    top = row[j]
            maxima[c] = top
        if chunks <= SMALL:
            threshold = _kth_largest_counting(maxima, count)
        else:
            ordered[:] = maxima
            threshold = _kth_largest(ordered, count)
        ncand = 0
        for j in range(n):  # branch-free; faster than visiting the chunks above T (strided)
            cand[ncand] = j
            ncand += row[j] >= threshold
        if ncand <= SMALL:
            for t in range(ncand):  # the label, if it is a candidate (rarely): out of the list
                if cand[t] == y:
                    ncand -= 1
                    cand[t] = cand[ncand]
                    break
            _place_by_rank(row, cand, ncand, count, vals, slots, out[b])
        else:
            _insert_any_order(row, cand, ncand, y, count, keys, out[b])


def top_indices(values: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Indices [B, count] of the ``count`` largest entries of each row of values (float32/64), the one at
    labels[b] left out (−1: none), descending, ties by index, NaN largest (compiled)."""
    global _KERNEL
    if _KERNEL is None:
        import numba

        for name in ("_insert", "_kth_largest", "_insert_any_order", "_kth_largest_counting", "_place_by_rank"):
            globals()[name] = numba.njit(cache=True, inline="always")(globals()[name])
        _KERNEL = numba.njit(cache=True)(_select_rows)
    out = np.empty((values.shape[0], count), dtype=np.int64)
    n = values.shape[1]
    # ~STRIDE scores per chunk and at least 2·count chunks, a multiple of 8 (torch's amax vectorises the
    # strided maxima only then), at most n // 4; chunks ≤ count: every row through the sorted buffer
    chunks = min(8 * max(-(-n // (8 * STRIDE)), -(-2 * count // 8)), n // 4)
    values = np.ascontiguousarray(values)
    if chunks > count:
        full = n // chunks
        maxima = torch.from_numpy(values)[:, :full * chunks].view(-1, full, chunks).amax(1).numpy()
    else:  # every row goes through the sorted buffer
        maxima = np.empty((values.shape[0], max(chunks, 1)), dtype=values.dtype)
    _KERNEL(values, np.ascontiguousarray(labels, dtype=np.int64), count, maxima, out)
    return out


def top_other_indices(s: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """Indices [B, count] of the ``count`` largest scores other than the label's, descending."""
    if s.device.type != "cpu" or s.shape[1] - 1 < count:
        others = s.detach().scatter(1, labels.unsqueeze(1), float("-inf"))
        return others.topk(count, dim=1, sorted=True).indices
    return torch.from_numpy(top_indices(s.detach().numpy(), labels.numpy(), count))
