"""Exact log σ_k − log σ_{k−1} and its gradient for Berrada's smooth top-k SVM: a compiled O(nk) kernel (CPU).

Per sample, e_i = exp(a_i) with a_i = (s_i − max_{j≠y} s_j)/(kτ) ≤ 0 over the classes i ≠ y (the
label has a_y = −∞, e_y = 0). We need r = log σ_k(e) − log σ_{k−1}(e) and
∂r/∂a_i = e_i·σ_{k−1}(e∖i)/σ_k − e_i·σ_{k−2}(e∖i)/σ_{k−1}.

Forward, per row (float64 arithmetic throughout):
1. A threshold t with at least M = min(2k, n−1) elements e ≥ t: the M-th largest of the maxima of
   the 64 residue classes i mod 64 (one vectorised pass), or 0 when there are fewer classes.
2. The elements e ≥ t form the buffer T (typically M + a few), collected from the residue classes
   whose maximum is ≥ t; every other element (R) goes through the recurrence σ_j ← σ_j + e_i·σ_{j−1}
   (j = k..1) in LANES = 16 accumulator sets (element i in set i mod 16: the loop over the sets is
   SIMD) whose polynomials are multiplied at the end. Positive terms only: each σ_j has relative
   error ≤ (n + 16k)·u (u = 2⁻⁵³). Then σ = σ_R ⊗ Π_T(1 + e_t·z), with prefix and suffix products.

Backward (no cancellation worth the name):
* i ∈ R: σ_j(e∖i) = σ_j − e_i·σ_{j−1}(e∖i), j = 1..k−1. Every (j−1)-subset S of e∖i misses at
  least M − j + 1 elements of T, each with e_t ≥ t > e_i, so e_i·σ_{j−1}(e∖i) ≤ j/(M − j + 1)·σ_j(e∖i)
  ≤ (k−1)/(k+2)·σ_j(e∖i) for j ≤ k−1: the subtraction loses at most a factor 2 and the error
  carried from the previous step shrinks; the relative error stays ≤ 2k·u on top of the forward one.
* t ∈ T: σ(e∖t) = (prefix before t) ⊗ (suffix after t), all positive, O(|T|·k).

Truncation (exact to working precision; it makes large logit scales cheap). Let P_j be the
product of the j largest e and v = e_(k) ≥ t. An element with e_i < θ·t ≤ θ·v,
θ = ε/(n·max_{j≤k} C(n−1, j−1)), ε = 2⁻⁶⁰ (2⁻⁴⁰ with float32 e), is left out of σ: the left-out terms of σ_j are at most
n·C(n−1, j−1) products each ≤ θ·v·P_{j−1}, while σ_j ≥ P_j ≥ v·P_{j−1}; so σ_j (j ≤ k) and every
σ_j(e∖t) (j ≤ k−1) change by a relative ≤ ε. A left-out element's ∂r/∂a_i is ≤ 2ε/n in absolute
value; it gets the formula's value computed with the truncated σ (0 where e_i is below the flush level).

Status per row: 0 done; 1 (float32 e only) θ·v is below 16× the smallest normal float32, so
elements that count may have been rounded to subnormals or 0 — the caller recomputes the row with
float64 e; 2 the k largest e have a product below e^−GUARD (σ_k near float64 underflow, e.g.
scores ~ 1e4 at τ = 1): the caller computes it in log space.

Speed. numba has no SIMD types and does not unroll loops over a runtime k; with k unrolled (one
lane-indexed array per coefficient, the loop over the 16 lanes vectorised by LLVM; with 8 lanes the
kernel took ~1.4× as long, 32 were no faster, on the CPUs we measured; the main loop takes UNROLL = 4
blocks per pass, holding the lane sums in locals between one load and one store, ~25 % less time
than a load and store per block, and the same sums: every lane still adds its elements in index
order), so the kernel is generated per k
(k ≤ KMAX) and cached on disk like the other numba kernels (under $XDG_CACHE_HOME/topk-bench/
esp_kernels; the file is compared with the generated text before it is imported). Larger k go to
the caller's other paths. The exponentials come from NumPy (SIMD), not from the kernel; the masked
maximum and the exponent come from one compiled pass (losses/berrada_shift.py).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

EPS_TRUNC = 2.0**-60  # relative change of σ_j allowed by truncation (below float64 rounding)
EPS_TRUNC32 = 2.0**-40  # the same with float32 e (float32 scores): far below float32 rounding
KMAX = 16  # largest k with a generated kernel (M = 2k must not exceed RESIDUES)
LANES = 16  # accumulator sets in the recurrence (element i goes to lane i mod LANES: SIMD across lanes)
UNROLL = 4  # blocks of LANES elements per pass of the recurrence (lane sums stay in registers across them)
RESIDUES = 64  # residue classes for the threshold pass (a multiple of the SIMD width)
OK, FLOAT64, LOG_SPACE = 0, 1, 2  # row status
_KERNELS: dict[int, object] = {}


@lru_cache(maxsize=256)
def esp_constants(n_other: int, k: int, eps: float = EPS_TRUNC) -> tuple[int, float, float]:
    """(M, θ, GUARD) for n_other classes besides the label (see the module docstring)."""
    m = min(2 * k, n_other)
    log_c = [math.lgamma(n_other) - math.lgamma(j) - math.lgamma(n_other - j + 1) for j in range(1, k + 1)]
    theta = math.exp(math.log(eps) - math.log(n_other) - max(log_c))
    log_comb_k = math.lgamma(n_other + 1) - math.lgamma(k + 1) - math.lgamma(n_other - k + 1)
    # σ_k ≥ Π top-k e must stay ≥ e^40·(n·k + 1)·C(n, k)·tiny: float64 underflow anywhere in the
    # recurrence then costs less than e^-40 relative
    guard = -math.log(np.finfo(np.float64).tiny) - log_comb_k - math.log(n_other * k + 1.0) - 40.0
    return m, theta, guard


# ----------------------------------------------------------------------------- generic helpers (numba)
def _push(vals, cnt, m_top, x):  # pragma: no cover - compiled
    """Keep the m_top largest values seen in vals[:cnt] (descending); returns the new count."""
    if cnt == m_top:
        if not x > vals[m_top - 1]:
            return cnt
        p = m_top - 1
    else:
        p = cnt
        cnt += 1
    while p > 0 and vals[p - 1] < x:
        vals[p] = vals[p - 1]
        p -= 1
    vals[p] = x
    return cnt


def _insert(buf, m_top, x):  # pragma: no cover - compiled
    """Insert x into buf[:m_top] (descending, −inf for empty slots; the smallest drops out), branch-free: a
    compare-exchange with every slot (a NaN x changes nothing)."""
    for j in range(m_top):
        b = buf[j]
        up = x > b
        buf[j] = x if up else b
        x = b if up else x


def _thresholds(e, m_top, out, cls):  # pragma: no cover - compiled
    """Per row: the m_top-th largest of the residue-class maxima (and of the tail elements), 0 if there
    are fewer, NaN if the row holds a NaN; cls[b] = the class maxima (NaN for a class with a NaN). The
    class maxima are a vectorised pass (mx is local: no aliasing); the selection is branch-free (the
    rows differ at every call: data-dependent branches would mispredict)."""
    batch, n = e.shape
    ng = n - n % RESIDUES
    mx = np.empty(RESIDUES, dtype=e.dtype)
    cbuf = np.empty(m_top)
    for b in range(batch):
        er = e[b]
        cbuf[:] = -np.inf
        nan = False
        if ng > 0:
            mx[:] = er[:RESIDUES]
            for g in range(RESIDUES, ng, RESIDUES):
                blk = er[g:g + RESIDUES]
                for q in range(RESIDUES):
                    x = blk[q]
                    mx[q] = x if (x > mx[q]) | (x != x) else mx[q]  # a NaN sticks
            cls[b] = mx
            for q in range(RESIDUES):
                x = np.float64(mx[q])
                nan |= x != x
                _insert(cbuf, m_top, x)
        for i in range(ng, n):
            x = np.float64(er[i])
            nan |= x != x
            _insert(cbuf, m_top, x)
        t = cbuf[m_top - 1]
        out[b] = np.nan if nan else (t if t > -np.inf else 0.0)


def _collect(er, t, mx, bidx):  # pragma: no cover - compiled
    """bidx[:nb] = the indices i with er[i] ≥ t; returns nb. Only the residue classes whose maximum
    mx[q] is ≥ t (or NaN) can hold one, and the tail after the last full block of RESIDUES."""
    n = er.shape[0]
    ng = n - n % RESIDUES
    nb = 0
    if ng > 0:
        for q in range(RESIDUES):
            if not np.float64(mx[q]) < t:
                for i in range(q, ng, RESIDUES):  # branch-free: a store per element, kept iff er[i] ≥ t
                    bidx[nb] = i
                    nb += np.float64(er[i]) >= t
    for i in range(ng, n):
        bidx[nb] = i
        nb += np.float64(er[i]) >= t
    return nb


def _kth_and_product(bval, nb, k, kbuf):  # pragma: no cover - compiled
    """(k-th largest of bval[:nb], product of the k largest)."""
    cnt = 0
    for q in range(nb):
        cnt = _push(kbuf, cnt, k, bval[q])
    prod = 1.0
    for q in range(k):
        prod *= kbuf[q]
    return kbuf[k - 1], prod


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


def _with_buffer(sig_r, bval, nb, pre, suf, sig, k, suffix):  # pragma: no cover - compiled
    """Prefix pre[q] = σ_R ⊗ Π_{t<q} over the buffer, sig = pre[nb]; if suffix, suf[q] = Π_{t≥q}."""
    for j in range(k + 1):
        pre[0, j] = sig_r[j]
    for q in range(nb):
        et = bval[q]
        pre[q + 1, 0] = pre[q, 0]
        for j in range(1, k + 1):
            pre[q + 1, j] = pre[q, j] + et * pre[q, j - 1]
    for j in range(k + 1):
        sig[j] = pre[nb, j]
    if not suffix:
        return
    for j in range(k + 1):
        suf[nb, j] = 0.0
    suf[nb, 0] = 1.0
    for q in range(nb - 1, -1, -1):
        et = bval[q]
        suf[q, 0] = suf[q + 1, 0]
        for j in range(1, k + 1):
            suf[q, j] = suf[q + 1, j] + et * suf[q + 1, j - 1]


def _grad_buffer(gb, bval, bidx, nb, pre, suf, k, inv_k, inv_km1):  # pragma: no cover - compiled
    """∂r/∂a_t for the buffered elements from σ(e∖t) = pre[t] ⊗ suf[t+1]."""
    for q in range(nb):
        d1 = 0.0
        d2 = 0.0
        for j in range(k):
            d1 += pre[q, j] * suf[q + 1, k - 1 - j]
            if j <= k - 2:
                d2 += pre[q, j] * suf[q + 1, k - 2 - j]
        gb[bidx[q]] = bval[q] * (d1 * inv_k - d2 * inv_km1)


_HELPERS = (_push, _insert, _thresholds, _collect, _kth_and_product, _combine, _with_buffer, _grad_buffer)


# ----------------------------------------------------------------------------- the generated kernel
_TEMPLATE = """\
\"\"\"Generated by losses/berrada_esp.py for k = {k} (do not edit; rewritten whenever it differs).\"\"\"
import numpy as np
from numba import njit

from losses.berrada_esp import _compiled_helpers

_thresholds, _collect, _kth_and_product, _combine, _with_buffer, _grad_buffer = _compiled_helpers()[2:]


@njit(cache=True, fastmath={{"contract"}})
def kernel(e, m_top, theta, floor, flush, want_grad, ratio, status, grad):
    batch, n = e.shape
    k = {k}
    bval = np.empty(n)
    bidx = np.empty(n, dtype=np.int64)
    kbuf = np.empty(k)
    tvals = np.empty(batch)
    cls = np.empty((batch, {residues}), dtype=e.dtype)
    _thresholds(e, m_top, tvals, cls)
    lanes = np.zeros(({lanes}, k + 1))
{arrays}
    sig_r = np.empty(k + 1)
    sig = np.empty(k + 1)
    pre = np.empty((n + 1, k + 1))
    suf = np.empty((n + 1, k + 1))
    ng = n - n % {lanes}
    ngu = n - n % {span}
    for b in range(batch):
        er = e[b]
        t = tvals[b]
        cut = theta * t
{zero}
        nb = _collect(er, t, cls[b], bidx)
        for i0 in range(0, ngu, {span}):
            for q in range({lanes}):
{load}
{update_unrolled}
{save}
        for i0 in range(ngu, ng, {lanes}):
            blk = er[i0:i0 + {lanes}]
            for q in range({lanes}):
                x = np.float64(blk[q])
                f = x if (x < t) & (x >= cut) else 0.0
{update}
        for i in range(ng, n):
            x = np.float64(er[i])
            f = x if (x < t) & (x >= cut) else 0.0
            q = 0
{update_tail}
        for q in range({lanes}):
{store}
        for q in range(nb):
            bval[q] = er[bidx[q]]
        ratio[b] = 0.0
        status[b] = 0
        if not (theta * t >= flush and t ** k >= floor):  # cheap sufficient test (t <= e_(k)) failed
            v, prod = _kth_and_product(bval, nb, k, kbuf)
            if not theta * v >= flush:
                status[b] = 1
            elif not prod >= floor:
                status[b] = 2
        if status[b] != 0:
            if want_grad:
                grad[b, :] = 0.0
            continue
        _combine(lanes, sig_r, k)
        _with_buffer(sig_r, bval, nb, pre, suf, sig, k, want_grad)
        ratio[b] = np.log(sig[k] / sig[k - 1])
        if not want_grad:
            continue
        inv_k = 1.0 / sig[k]
        inv_km1 = 1.0 / sig[k - 1] if k > 1 else 0.0
{gconst}
        gb = grad[b]
        for q in range(n):
            fv = np.float64(er[q])
            fv = fv if fv >= flush else 0.0
            t0 = 1.0
{gbody}
        _grad_buffer(gb, bval, bidx, nb, pre, suf, k, inv_k, inv_km1)
"""

def _source(k: int) -> str:
    """The kernel's source for this k: the recurrence unrolled over the coefficients, one array per
    coefficient indexed by lane (the loop over the LANES lanes is what LLVM vectorises)."""

    def pad(lines: list[str], n: int) -> str:
        return "\n".join(" " * n + line for line in lines)

    update = [f"a{j}[q] += f * a{j - 1}[q]" if j > 1 else f"a{j}[q] += f" for j in range(k, 0, -1)]
    # the main loop: UNROLL blocks per pass, lane sums in locals (registers) between one load and one store
    unrolled = []
    for u in range(UNROLL):
        unrolled += [f"x = np.float64(er[i0 + {u * LANES} + q])", "f = x if (x < t) & (x >= cut) else 0.0"]
        unrolled += [f"v{j} += f * v{j - 1}" if j > 1 else f"v{j} += f" for j in range(k, 0, -1)]
    gbody = [f"t{j} = c{j} - fv * t{j - 1}" for j in range(1, k)]
    second = f"t{k - 2} * inv_km1" if k >= 2 else "0.0"
    gbody.append(f"gb[q] = fv * (t{k - 1} * inv_k - {second})")
    return _TEMPLATE.format(
        k=k, lanes=LANES, residues=RESIDUES,
        arrays=pad([f"a{j} = np.zeros({LANES})" for j in range(1, k + 1)], 4),
        zero=pad([f"a{j}[:] = 0.0" for j in range(1, k + 1)], 8),
        update=pad(update, 16), update_tail=pad(update, 12), span=LANES * UNROLL,
        load=pad([f"v{j} = a{j}[q]" for j in range(1, k + 1)], 16), update_unrolled=pad(unrolled, 16),
        save=pad([f"a{j}[q] = v{j}" for j in range(1, k + 1)], 16),
        store=pad([f"lanes[q, {j}] = a{j}[q]" for j in range(1, k + 1)], 12),
        gconst=pad([f"c{j} = sig[{j}]" for j in range(1, k)] or ["pass"], 8), gbody=pad(gbody, 12))


_COMPILED_HELPERS: tuple | None = None


def _compiled_helpers() -> tuple:
    """The generic helpers, compiled once (numba, cached on disk); imported lazily. Each compiled
    helper replaces its Python original in this module, so that later helpers call the compiled one."""
    global _COMPILED_HELPERS
    if _COMPILED_HELPERS is None:
        import numba

        compiled = []
        for fn in _HELPERS:
            jitted = numba.njit(cache=True, fastmath={"contract"})(fn)
            globals()[fn.__name__] = jitted
            compiled.append(jitted)
        _COMPILED_HELPERS = tuple(compiled)
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
    """The compiled kernel for this k: its generated source written (where it differs) and imported."""
    if k not in _KERNELS:
        if not 1 <= k <= KMAX:
            raise ValueError(f"the compiled kernel needs 1 <= k <= {KMAX}, got k={k}")
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


def flush_level(dtype: torch.dtype) -> float:
    """Stored e below this (16× the dtype's smallest normal number) are not trusted by the kernel."""
    return 16.0 * float(torch.finfo(dtype).tiny)


def exp_shifted(s: torch.Tensor, m: torch.Tensor, labels: torch.Tensor, scale: float,
                dtype: torch.dtype) -> torch.Tensor:
    """exp((s − m)·scale) in dtype for CPU tensors, 0 at the labels. The argument is clamped to
    log(smallest normal) + 2 first, below the flush level (NumPy's exp takes a slow path near
    underflow; e below the flush level are not trusted anyway).
    The exp is NumPy's (SIMD, within a few ulp), in place: torch's float32 exp runs at half its
    speed on the CPUs we measured."""
    e = torch.sub(s.to(dtype), m.to(dtype)).mul_(scale).clamp_min_(math.log(torch.finfo(dtype).tiny) + 2.0)
    buf = e.numpy()
    np.exp(buf, out=buf)
    return e.scatter_(1, labels[:, None], 0.0)


def esp_ratio(e: torch.Tensor, k: int, want_grad: bool) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
    """(r [B] float64, status [B] int8, ∂r/∂a [B, n] in e's dtype or None) for e [B, n] on the CPU
    (contiguous; e = exp(a) with max_{j≠y} a_j = 0 and e_y = 0). Rows with status ≠ 0: r = 0, zero gradient."""
    b, n = e.shape
    m_top, theta, guard = esp_constants(n - 1, k, EPS_TRUNC32 if e.dtype == torch.float32 else EPS_TRUNC)
    ratio = np.empty(b)
    status = np.empty(b, dtype=np.int8)
    grad = torch.empty_like(e) if want_grad else torch.empty(1, 1, dtype=e.dtype)
    _kernel(k)(e.numpy(), m_top, theta, math.exp(-guard), flush_level(e.dtype), want_grad, ratio, status,
               grad.numpy())
    return ratio, status, (grad if want_grad else None)
