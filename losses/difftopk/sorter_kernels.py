"""The whole ``difftopk`` loss for NeuralSort and SoftSort, compiled for the CPU (numba).

The same computation as the torch path of ``DiffTopKLoss.forward`` with ``sorter: neuralsort`` or
``softsort`` (``losses.difftopk.sorters``): on the top-m preselected scores x (label first) or on
every class (``m=None``), with row r = 0..K−1 of P the ascending rank n−K+1+r,

    NeuralSort  L[r, i] = (c_r·x_i − A_i)/τ,  c_r = 2(n−K+1+r) − n − 1,  A_i = Σ_l |x_i − x_l|
    SoftSort    L[r, i] = −|x_i − v_r|/τ,      v = the top-K scores, ascending
    P[r] = softmax(L[r]),   q = Σ_r w_r·P[r, y]  (+ p_1·softmax(x)_y for top1_mode ``sm``),
    loss = mean_b −log(q·(1 − 2e−7) + 1e−7)  (``smce``: p_1·CE(x, y) + mass·that mean).

At m = 16 the torch path is ~100 ops on [B, 16] and [B, K, 16] tensors forward and backward, whose
per-op overhead is all of its time (plus the zero-fills of autograd's gathers). Here one compiled call
runs the forward over the batch from the scores [B, n] and the preselected indices (gathering itself),
saving x, P, softmax(x) and dℓ/dq; one call runs the analytic backward and writes the gradient straight
into a fresh [B, n] buffer (a row is zeroed, then its m entries are written):

    H[r, i] = g_q·w_r·P[r, y]·(δ_iy − P[r, i])            (dq/dL[r, i] times the incoming g_q)
    NeuralSort  g_x += Σ_r H[r]·c_r/τ,  g_A = −Σ_r H[r]/τ,  g_{x_j} += Σ_l sign(x_j − x_l)(g_{A_j} + g_{A_l})
    SoftSort    g_{x_i} += Σ_r H[r, i]·sign(v_r − x_i)/τ,  g_{v_r} = −Σ_i H[r, i]·sign(v_r − x_i)/τ
    sm          g_x += g_q·p_1·s_y·(δ_y − s)      smce: g_x += g·p_1/B·(s − δ_y)    (s = softmax(x))

with sign(0) = 0 as in torch's ``abs`` backward. The state is sample-innermost ([m, B], [K, m, B]) so
that every loop, softmax sums and maxima included, runs across samples and vectorises (a per-sample
softmax over 16 entries is a serial reduction: 3× slower); exponentials use ``network_kernels._exp``
(≤ 2 ulp of libm's, vectorisable). SoftSort's top-K positions come from ``torch.topk`` on the tensor
the torch path sorts, so that among tied scores v_r's gradient goes to the same class (``torch.topk``
orders ties arbitrarily). float32 scores are computed in float64 and rounded once (loss and
gradient), as the network kernels do. NaN/inf scores propagate as in the torch path (NaN loss and
NaN gradient rows). Not fused (the torch path runs): non-CPU tensors, dtypes other than
float32/float64, and NeuralSort on more than 256 sorted classes (the torch path's A then comes from
a sort, whose tie-breaking the gradient would have to follow).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from losses.difftopk.network_kernels import _exp, _inline, _jit
from losses.select import top_indices

MODES = ("sort", "sm", "smce")
MAX_NEURALSORT_CLASSES = 256  # sorters._abs_row_sums: dense (as here) up to this n, a sort above


@_inline
def _sign(u: float) -> float:
    """torch.sign: ±1, 0 at ±0, NaN at NaN."""
    return 1.0 if u > 0 else (-1.0 if u < 0 else u * 0.0)


# Helpers that take arrays are plain (LLVM-inlined) functions: IR-inlining them (inline="always") made
# the calling loop ~15× slower, even where the inlined code never ran.
@_jit
def _softmax(logits: np.ndarray, out: np.ndarray, top: np.ndarray, total: np.ndarray) -> None:
    """out[:, b] = softmax(logits[:, b]) for every sample b (max subtracted, as torch); leaves the maxima
    in top and the sums of exp(logit − max) in total."""
    m, batch = logits.shape
    top[:] = logits[0]
    for i in range(1, m):
        for b in range(batch):
            top[b] = logits[i, b] if logits[i, b] > top[b] else top[b]
    total[:] = 0.0
    for i in range(m):
        for b in range(batch):
            e = _exp(logits[i, b] - top[b])
            out[i, b] = e
            total[b] += e
    for i in range(m):
        for b in range(batch):
            out[i, b] /= total[b]


@_jit
def _column(b: int, i: int, full: bool, labels: np.ndarray, others: np.ndarray) -> int:
    """The class of entry i of sample b's sorted row: i itself (full), else the label, then the others."""
    if full:
        return i
    return labels[b] if i == 0 else others[b, i - 1]


@_jit
def _forward(s: np.ndarray, labels: np.ndarray, others: np.ndarray, sigma: np.ndarray, full: bool, neural: bool,
             mode: int, weights: np.ndarray, p1: float, mass: float, tau: float, xs: np.ndarray, probs: np.ndarray,
             sms: np.ndarray, dnll: np.ndarray) -> tuple[float, int]:
    """(loss, −1), or (NaN, the first sample whose label is out of range). Saves x (xs [m, B]), the P rows
    (probs [K, m, B]), softmax(x) (sms [m, B], modes sm/smce) and dℓ/dq (dnll [B])."""
    batch, n_all = s.shape
    m, k = xs.shape[0], weights.shape[0]
    for b in range(batch):
        if labels[b] < 0 or labels[b] >= n_all:
            return math.nan, b
    pos = labels if full else np.zeros(batch, dtype=np.int64)  # the label's entry of each row
    for b in range(batch):
        for i in range(m):
            xs[i, b] = s[b, _column(b, i, full, labels, others)]
    logits = np.empty((m, batch))
    top = np.empty(batch)
    total = np.empty(batch)
    q = np.zeros(batch)
    if mass > 0:
        A = np.zeros((m, batch))
        if neural:
            for i in range(m):
                for j in range(m):
                    for b in range(batch):
                        A[i, b] += abs(xs[i, b] - xs[j, b])
        for r in range(k):
            if neural:
                coef = float(2 * (m - k + 1 + r) - m - 1)
                for i in range(m):
                    for b in range(batch):
                        logits[i, b] = (xs[i, b] * coef - A[i, b]) / tau
            else:
                v = top  # (free until the softmax)
                for b in range(batch):
                    v[b] = xs[sigma[b, r], b]
                for i in range(m):
                    for b in range(batch):
                        logits[i, b] = -abs(xs[i, b] - v[b]) / tau
            _softmax(logits, probs[r], top, total)
            for b in range(batch):
                q[b] += weights[r] * probs[r, pos[b], b]
    total_ce = 0.0
    if mode > 0:
        _softmax(xs, sms, top, total)
        for b in range(batch):
            if mode == 1:
                q[b] = p1 * sms[pos[b], b] + q[b]
            else:
                total_ce += (top[b] + math.log(total[b])) - xs[pos[b], b]
    total_nll = 0.0
    for b in range(batch):
        d = q[b] * (1 - 2e-7) + 1e-7
        total_nll -= math.log(d)
        dnll[b] = -(1 - 2e-7) / d
    if mode == 2:
        return p1 * (total_ce / batch) + mass * (total_nll / batch), -1
    return total_nll / batch, -1


@_jit
def _backward(g: float, labels: np.ndarray, others: np.ndarray, sigma: np.ndarray, full: bool, neural: bool,
              mode: int, weights: np.ndarray, p1: float, mass: float, tau: float, xs: np.ndarray, probs: np.ndarray,
              sms: np.ndarray, dnll: np.ndarray, grad: np.ndarray) -> None:
    """grad [B, n] = g·d loss / d s (zero outside the sorted entries), from what `_forward` saved."""
    batch, n_all = grad.shape
    m, k = xs.shape[0], weights.shape[0]
    pos = labels if full else np.zeros(batch, dtype=np.int64)
    c = g / batch
    gq = np.empty(batch)
    h = np.empty(batch)
    for b in range(batch):
        gq[b] = c * dnll[b] * (mass if mode == 2 else 1.0)
    gx = np.zeros((m, batch))
    if mode == 2:  # the CE term: softmax − onehot
        for i in range(m):
            for b in range(batch):
                gx[i, b] = c * p1 * sms[i, b]
        for b in range(batch):
            gx[pos[b], b] -= c * p1
    elif mode == 1:
        for b in range(batch):
            h[b] = gq[b] * p1 * sms[pos[b], b]
        for i in range(m):
            for b in range(batch):
                gx[i, b] -= h[b] * sms[i, b]
        for b in range(batch):
            gx[pos[b], b] += h[b]
    if mass > 0:
        gA = np.zeros((m, batch))
        v = np.empty(batch)
        gv = np.empty(batch)
        for r in range(k):
            P = probs[r]
            for b in range(batch):
                h[b] = gq[b] * weights[r] * P[pos[b], b]  # H[r, i] = h·(δ_iy − P[r, i])
            if neural:
                cx = float(2 * (m - k + 1 + r) - m - 1) / tau
                for i in range(m):
                    for b in range(batch):
                        t = h[b] * P[i, b]
                        gx[i, b] -= t * cx
                        gA[i, b] += t / tau
                for b in range(batch):
                    gx[pos[b], b] += h[b] * cx
                    gA[pos[b], b] -= h[b] / tau
                continue
            for b in range(batch):  # SoftSort: the δ term; gv: the gradient of v_r
                v[b] = xs[sigma[b, r], b]
                t = h[b] * _sign(v[b] - xs[pos[b], b]) / tau
                gx[pos[b], b] += t
                gv[b] = -t
            for i in range(m):
                for b in range(batch):
                    t = h[b] * P[i, b] * _sign(v[b] - xs[i, b]) / tau
                    gx[i, b] -= t
                    gv[b] += t
            for b in range(batch):
                gx[sigma[b, r], b] += gv[b]
        if neural:  # through A
            for i in range(m):
                for j in range(m):
                    for b in range(batch):
                        gx[i, b] += _sign(xs[i, b] - xs[j, b]) * (gA[i, b] + gA[j, b])
    for b in range(batch):
        out = grad[b]
        if not full:
            out[:] = 0.0
        for i in range(m):
            out[_column(b, i, full, labels, others)] = gx[i, b]


class CompiledSorterLoss(torch.autograd.Function):
    """The difftopk NeuralSort/SoftSort loss of CPU float32/float64 scores [B, n], one compiled call each way."""

    @staticmethod
    def forward(ctx, s, labels, others, sigma, neural: bool, mode: str, weights, p1: float, mass: float,
                tau: float):  # type: ignore[override]
        s_np = np.ascontiguousarray(s.detach().numpy())
        batch, n = s_np.shape
        full = others is None
        others = np.empty((batch, 0), dtype=np.int64) if full else others
        m = n if full else others.shape[1] + 1
        xs, probs, sms = np.empty((m, batch)), np.empty((weights.shape[0], m, batch)), np.empty((m, batch))
        dnll = np.empty(batch)
        config = (full, neural, MODES.index(mode), weights, float(p1), float(mass), float(tau))
        value, bad = _forward(s_np, labels, others, sigma, *config, xs, probs, sms, dnll)
        if bad >= 0:
            raise IndexError(f"label {labels[bad]} of sample {bad} is out of range for {n} classes")
        ctx.saved = (labels, others, sigma, *config, xs, probs, sms, dnll)
        ctx.shape, ctx.dtype = (batch, n), s.dtype
        return torch.tensor(value, dtype=s.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        grad = np.empty(ctx.shape, dtype=np.float32 if ctx.dtype == torch.float32 else np.float64)
        _backward(float(grad_out), *ctx.saved, grad)
        return torch.from_numpy(grad), None, None, None, None, None, None, None, None, None


def fusable(s: torch.Tensor, sorter: str, n_sort: int) -> bool:
    """Whether `compiled_sorter_loss` serves these scores (else the torch path runs)."""
    return (s.device.type == "cpu" and s.dtype in (torch.float32, torch.float64)
            and (sorter == "softsort" or (sorter == "neuralsort" and n_sort <= MAX_NEURALSORT_CLASSES)))


def compiled_sorter_loss(s: torch.Tensor, labels: torch.Tensor, m: int | None, sorter: str, weights: torch.Tensor,
                         p1: float, mass: float, top1_mode: str, inverse_temperature: float) -> torch.Tensor:
    """The difftopk loss (scalar) of scores s [B, n] (working precision) through NeuralSort or SoftSort,
    on the label and the m − 1 largest other scores (``m=None``: every class)."""
    labels_np = np.ascontiguousarray(labels.numpy(), dtype=np.int64)
    others = None if m is None else top_indices(s.detach().numpy(), labels_np, m - 1)
    k = weights.shape[0]
    if sorter == "softsort" and mass > 0:  # torch.topk on what the torch path sorts: the same tie order
        x = s.detach()
        if others is not None:
            x = x.gather(1, torch.cat([labels.view(-1, 1), torch.from_numpy(others)], 1))
        sigma = np.ascontiguousarray(x.topk(k, dim=-1, sorted=True).indices.flip(-1).numpy())
    else:
        sigma = np.empty((s.shape[0], 0), dtype=np.int64)
    w = np.ascontiguousarray(weights.detach().to(torch.float64).numpy())
    return CompiledSorterLoss.apply(s, labels_np, others, sigma, sorter == "neuralsort", top1_mode, w, p1, mass,
                                    1 / inverse_temperature)
