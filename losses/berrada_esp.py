"""Exact log σ_k − log σ_{k−1} and its gradient for Berrada's smooth top-k SVM: a compiled O(nk) kernel (CPU).

Per sample, e_i = exp(a_i) with a_i = (s_i − max_{j≠y} s_j)/(kτ) ≤ 0 over the classes i ≠ y (the
label has a_y = −∞, e_y = 0). We need r = log σ_k(e) − log σ_{k−1}(e) and
∂r/∂a_i = e_i·σ_{k−1}(e∖i)/σ_k − e_i·σ_{k−2}(e∖i)/σ_{k−1}.

Forward. One pass over the row keeps the M = min(2k, n−1) largest e in a sorted buffer T and feeds
every other element (R) to the recurrence σ_j ← σ_j + e_i·σ_{j−1} (j = k..1), in float64. It adds
positive terms only: each σ_j has relative error ≤ (n + k)·u (u = 2⁻⁵³). σ = σ_R ⊗ Π_T(1 + e_t·z).

Backward (no cancellation worth the name):
* i ∈ R: σ_j(e∖i) = σ_j − e_i·σ_{j−1}(e∖i), j = 1..k−1. Every (j−1)-subset S of e∖i misses at
  least M − j + 1 elements of T, each with e_t ≥ e_i (an element joins R only when M buffered
  elements are ≥ it, and buffered values only grow), so e_i·σ_{j−1}(e∖i) ≤ j/(M − j + 1)·σ_j(e∖i)
  ≤ (k−1)/(k+2)·σ_j(e∖i) for j ≤ k−1: the subtraction loses at most a factor 2, and the error of
  the previous step shrinks; rel.err ≤ 2k·u on top of the forward error.
* t ∈ T: σ(e∖t) = σ_R ⊗ Π_{T∖t}(1 + e·z) from prefix and suffix products (all positive), O(Mk).

Truncation (exact to working precision; it is what keeps large logit scales cheap). Let P_j be
the product of the j largest e and v = e_(k). An element with e_i < θ·v, θ = ε/(n·max_{j≤k}
C(n−1, j−1)), ε = 2⁻⁶⁰, is left out of σ: the left-out terms of σ_j are at most n·C(n−1, j−1)
products each ≤ θ·v·P_{j−1}, while σ_j ≥ P_j ≥ v·P_{j−1}; so σ_j (j ≤ k) and every σ_j(e∖t)
(j ≤ k−1) change by a relative ≤ ε. The pass uses the running k-th largest (≤ v): it keeps more,
never less. A left-out element's true ∂r/∂a_i is ≤ 2ε/n; it gets e_i·(σ_{k−1}/σ_k − σ_{k−2}/σ_{k−1}).

Precision of e. torch computes e = exp(a) vectorised in the scores' dtype and flushes values
below the dtype's smallest normal number to 0; the kernel recomputes exp in float64 from the
scores for the buffered elements and for kept elements that were flushed (only when θ·v is below
that number). A row whose k largest e have a product below e^−GUARD (σ_k near float64 underflow,
e.g. scores ~ 1e4), or with fewer than M nonzero e, is flagged (ok = False) for the caller's
log-space path.

Speed. numba has no SIMD types and does not unroll loops over a runtime k; with k unrolled into
scalars (4 interleaved accumulator sets) the recurrence runs ~3× faster than with arrays, so the
two hot loops are generated per k (k ≤ KMAX) and cached on disk like the other numba kernels
(under $XDG_CACHE_HOME/topk-bench/esp_kernels; the file is checked against the generated text
before it is imported). Larger k go to the caller's other paths.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

EPS_TRUNC = 2.0**-60  # relative change of σ_j allowed by truncation (below float64 rounding)
KMAX = 16  # largest k with a generated kernel
LANES = 4  # interleaved accumulator sets in the recurrence
_KERNELS: dict[int, object] = {}


def esp_constants(n_other: int, k: int) -> tuple[int, float, float]:
    """(M, θ, GUARD) for n_other classes besides the label (see the module docstring)."""
    m = min(2 * k, n_other)
    log_c = [math.lgamma(n_other) - math.lgamma(j) - math.lgamma(n_other - j + 1) for j in range(1, k + 1)]
    theta = math.exp(math.log(EPS_TRUNC) - math.log(n_other) - max(log_c))
    log_comb_k = math.lgamma(n_other + 1) - math.lgamma(k + 1) - math.lgamma(n_other - k + 1)
    # σ_k ≥ Π top-k e must stay ≥ e^40·(n·k + 1)·C(n, k)·tiny: float64 underflow anywhere in the
    # recurrence then costs less than e^-40 relative
    guard = -math.log(np.finfo(np.float64).tiny) - log_comb_k - math.log(n_other * k + 1.0) - 40.0
    return m, theta, guard


# ----------------------------------------------------------------------------- generic helpers (numba)
def _insert(bval, bidx, cnt, m_top, x, i):  # pragma: no cover - compiled
    """Insert x (index i) into the descending buffer; returns (count, evicted value or −1)."""
    evicted = -1.0
    if cnt == m_top:
        evicted = bval[m_top - 1]
        p = m_top - 1
    else:
        p = cnt
        cnt += 1
    while p > 0 and bval[p - 1] < x:
        bval[p] = bval[p - 1]
        bidx[p] = bidx[p - 1]
        p -= 1
    bval[p] = x
    bidx[p] = i
    return cnt, evicted


def _exact_e(sr, mb, scale, i):  # pragma: no cover - compiled
    """exp(a_i) in float64 from the (masked) scores."""
    return math.exp((np.float64(sr[i]) - mb) * scale)


def _combine(lanes, sig_r, k):  # pragma: no cover - compiled
    """sig_r = product of the lane polynomials (rows of lanes: coefficients 1..k), truncated at k."""
    sig_r[0] = 1.0
    for j in range(1, k + 1):
        sig_r[j] = lanes[0, j]
    for lane in range(1, lanes.shape[0]):
        for j in range(k, 0, -1):
            acc = sig_r[j] + lanes[lane, j]
            for q in range(1, j):
                acc += sig_r[j - q] * lanes[lane, q]
            sig_r[j] = acc


def _with_buffer(sig_r, bval, cnt, pre, suf, sig, k):  # pragma: no cover - compiled
    """Prefix pre[q] = σ_R ⊗ Π_{t<q}, suffix suf[q] = Π_{t≥q} over the buffer; sig = pre[cnt]."""
    for j in range(k + 1):
        pre[0, j] = sig_r[j]
        suf[cnt, j] = 0.0
    suf[cnt, 0] = 1.0
    for q in range(cnt):
        et = bval[q]
        pre[q + 1, 0] = pre[q, 0]
        for j in range(1, k + 1):
            pre[q + 1, j] = pre[q, j] + et * pre[q, j - 1]
    for q in range(cnt - 1, -1, -1):
        et = bval[q]
        suf[q, 0] = suf[q + 1, 0]
        for j in range(1, k + 1):
            suf[q, j] = suf[q + 1, j] + et * suf[q + 1, j - 1]
    for j in range(k + 1):
        sig[j] = pre[cnt, j]


def _grad_buffer(gb, bval, bidx, cnt, pre, suf, k, inv_k, inv_km1):  # pragma: no cover - compiled
    """∂r/∂a_t for the buffered elements from σ(e∖t) = pre[t] ⊗ suf[t+1]."""
    for q in range(cnt):
        d1 = 0.0
        d2 = 0.0
        for j in range(k):
            d1 += pre[q, j] * suf[q + 1, k - 1 - j]
            if j <= k - 2:
                d2 += pre[q, j] * suf[q + 1, k - 2 - j]
        gb[bidx[q]] = bval[q] * (d1 * inv_k - d2 * inv_km1)


def _grad_flushed(gb, er, sr, mb, scale, sig, k, cut, inv_k, inv_km1):  # pragma: no cover - compiled
    """∂r/∂a_i for kept elements whose stored e was flushed to 0 (e recomputed in float64)."""
    for i in range(er.shape[0]):
        if er[i] != 0.0:
            continue
        x = math.exp((np.float64(sr[i]) - mb) * scale)
        if x < cut or x == 0.0:
            continue
        t_prev = 0.0
        t = 1.0
        for j in range(1, k):
            t_prev, t = t, sig[j] - x * t
        gb[i] = x * (t * inv_k - t_prev * inv_km1)


_HELPERS = (_insert, _exact_e, _combine, _with_buffer, _grad_buffer, _grad_flushed)


# ----------------------------------------------------------------------------- the generated kernel
_TEMPLATE = '''\
"""Generated by losses/berrada_esp.py for k = {k} (do not edit; regenerated when it differs)."""
import math

import numpy as np
from numba import njit

from losses.berrada_esp import _compiled_helpers

_insert, _exact_e, _combine, _with_buffer, _grad_buffer, _grad_flushed = _compiled_helpers()


@njit(cache=True, fastmath={{"contract"}})
def kernel(e, s, m, scale, m_top, theta, guard, tiny, want_grad, ratio, ok, grad):
    batch, n = e.shape
    k = {k}
    bval = np.empty(m_top)
    bidx = np.empty(m_top, dtype=np.int64)
    lanes = np.zeros(({lanes}, k + 1))
    sig_r = np.empty(k + 1)
    sig = np.empty(k + 1)
    pre = np.empty((m_top + 1, k + 1))
    suf = np.empty((m_top + 1, k + 1))
    ng = n - n % {lanes}
    for b in range(batch):
        er = e[b]
        sr = s[b]
        mb = m[b]
        cnt = 0
        thr = 0.0
        cut = 0.0
        zflag = True
{init}
        i = 0
        while i < n:
            if i < ng:
{fastcond}
            else:
                slow = True
            if not slow:
{fast}
                i += {lanes}
                continue
            stop = i + {lanes} if i < ng else n
            while i < stop:
                x = np.float64(er[i])
                if x == 0.0 and zflag:
                    x = _exact_e(sr, mb, scale, i)
                f = 0.0
                if x > thr:
                    cnt, f = _insert(bval, bidx, cnt, m_top, x, i)
                    if f < 0.0:
                        f = 0.0
                    if cnt == m_top:
                        thr = bval[m_top - 1]
                    if cnt >= k:
                        cut = theta * bval[k - 1]
                        zflag = cut < tiny
                elif x >= cut:
                    f = x
{slowupd}
                i += 1
{store}
        head = 0.0
        if cnt == m_top:
            for q in range(cnt):
                bval[q] = _exact_e(sr, mb, scale, bidx[q])
            for q in range(k):
                head += math.log(bval[q]) if bval[q] > 0.0 else -np.inf
        if cnt < m_top or not head >= -guard:
            ok[b] = False
            ratio[b] = 0.0
            if want_grad:
                for q in range(n):
                    grad[b, q] = 0.0
            continue
        ok[b] = True
        _combine(lanes, sig_r, k)
        _with_buffer(sig_r, bval, cnt, pre, suf, sig, k)
        ratio[b] = math.log(sig[k]) - math.log(sig[k - 1])
        if not want_grad:
            continue
        inv_k = 1.0 / sig[k]
        inv_km1 = 1.0 / sig[k - 1] if k > 1 else 0.0
{gconst}
        gb = grad[b]
        for q in range(n):
            fv = np.float64(er[q])
            t0 = 1.0
{gbody}
        if zflag:
            _grad_flushed(gb, er, sr, mb, scale, sig, k, cut, inv_k, inv_km1)
        _grad_buffer(gb, bval, bidx, cnt, pre, suf, k, inv_k, inv_km1)
'''


def _source(k: int) -> str:
    """The kernel's source for this k: hot loops unrolled over the coefficients and LANES lanes."""
    ind = " " * 16
    lanes = range(LANES)
    init = "\n".join(" " * 8 + "; ".join(f"s{j}_{ln} = 0.0" for j in range(1, k + 1)) for ln in lanes)

    def update(ln: int, f: str, pad: str) -> list[str]:
        return [pad + (f"s{j}_{ln} += {f} * s{j - 1}_{ln}" if j > 1 else f"s{j}_{ln} += {f}") for j in range(k, 0, -1)]

    loads = [f"{ind}x{ln} = np.float64(er[i + {ln}])" for ln in lanes]
    cond = " | ".join(f"(x{ln} > thr) | ((x{ln} == 0.0) & zflag)" for ln in lanes)
    fastcond = "\n".join(loads + [f"{ind}slow = {cond}"])
    fast = [f"{ind}f{ln} = x{ln} if x{ln} >= cut else 0.0" for ln in lanes]
    for ln in lanes:
        fast += update(ln, f"f{ln}", ind)
    store = []
    for ln in lanes:
        store += [f"        lanes[{ln}, {j}] = s{j}_{ln}" for j in range(1, k + 1)]
    gconst = "\n".join(f"        c{j} = sig[{j}]" for j in range(1, k))
    gbody = [f"{ind[4:]}t{j} = c{j} - fv * t{j - 1}" for j in range(1, k)]
    second = f"t{k - 2} * inv_km1" if k >= 2 else "0.0"
    gbody.append(f"{ind[4:]}gb[q] = fv * (t{k - 1} * inv_k - {second})")
    return _TEMPLATE.format(k=k, lanes=LANES, init=init, fastcond=fastcond, fast="\n".join(fast),
                            slowupd="\n".join(update(0, "f", ind)), store="\n".join(store),
                            gconst=gconst or "        pass", gbody="\n".join(gbody))


_COMPILED_HELPERS: tuple | None = None


def _compiled_helpers() -> tuple:
    """The generic helpers, compiled once (numba, cached on disk); imported lazily."""
    global _COMPILED_HELPERS
    if _COMPILED_HELPERS is None:
        import numba

        _COMPILED_HELPERS = tuple(numba.njit(cache=True)(fn) for fn in _HELPERS)
    return _COMPILED_HELPERS


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    for root in (Path(base) / "topk-bench" / "esp_kernels", Path(tempfile.gettempdir()) / "topk-bench-esp"):
        try:
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK):
                return root
        except OSError:
            continue
    raise OSError("no writable cache directory for the generated berrada_smooth kernels")


def _kernel(k: int):
    """The compiled kernel for this k: generated source written (if it differs) and imported."""
    if k not in _KERNELS:
        text = _source(k)
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        path = _cache_dir() / f"esp_k{k}_{digest}.py"
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        name = f"_topk_bench_esp_k{k}_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # numba's disk cache re-imports the module by name
        spec.loader.exec_module(module)
        _KERNELS[k] = module.kernel
    return _KERNELS[k]


def esp_ratio(e: torch.Tensor, s: torch.Tensor, m: torch.Tensor, scale: float, k: int, want_grad: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """r [B] (float64), ok [B], ∂r/∂a [B, n] (e's dtype, or None) for contiguous CPU tensors.

    e = exp((s − m)·scale) with values below the smallest normal number flushed to 0, s the scores
    with −∞ at the label, m [B] (float64) the row maxima of s. Rows with ok False: r = 0, zero gradient.
    """
    b, n = e.shape
    m_top, theta, guard = esp_constants(n - 1, k)
    tiny = float(torch.finfo(e.dtype).tiny)
    ratio = np.empty(b)
    ok = np.empty(b, dtype=np.bool_)
    grad = torch.empty_like(e) if want_grad else torch.empty(1, 1, dtype=e.dtype)
    _kernel(k)(e.numpy(), s.numpy(), m.numpy(), scale, m_top, theta, guard, tiny, want_grad, ratio, ok,
               grad.numpy())
    return torch.from_numpy(ratio), torch.from_numpy(ok), (grad if want_grad else None)


class EspMargin(torch.autograd.Function):
    """scores [B, n] (CPU), labels [B] -> (z [B], ok [B]), z = log σ_k(e) − log σ_{k−1}(e) − a_y.

    a = (s − max_{j≠y} s_j)·scale and e = exp(a) over j ≠ y (the loss is invariant to the shift).
    z is computed in float64 and returned in the scores' dtype; rows with ok False have z = 0 and
    no gradient (the caller computes them in log space).
    """

    @staticmethod
    def forward(ctx, scores, labels, k: int, scale: float):  # type: ignore[override]
        lab = labels[:, None]
        masked = scores.detach().scatter(1, lab, float("-inf"))
        m = masked.amax(1, keepdim=True)
        e = torch.sub(masked, m).mul_(scale).exp_()
        torch.nn.functional.threshold_(e, float(torch.finfo(e.dtype).tiny), 0.0)
        m64 = m.squeeze(1).double()
        want = bool(ctx.needs_input_grad[0])
        ratio, ok, grad = esp_ratio(e, masked, m64, scale, k, want)
        a_y = (scores.detach().gather(1, lab).squeeze(1).double() - m64) * scale
        z = torch.where(ok, ratio - a_y, torch.zeros_like(ratio)).to(scores.dtype)
        ctx.save_for_backward(grad, labels, ok)
        ctx.scale = scale
        ctx.mark_non_differentiable(ok)
        return z, ok

    @staticmethod
    def backward(ctx, grad_z, _grad_ok):  # type: ignore[override]
        grad, labels, ok = ctx.saved_tensors
        coef = torch.where(ok, grad_z * ctx.scale, torch.zeros_like(grad_z)).to(grad.dtype)
        out = grad * coef[:, None]
        out.scatter_(1, labels[:, None], -coef[:, None])
        return out, None, None, None
