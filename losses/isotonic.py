"""Projections onto the permutahedron by isotonic optimisation (pool adjacent violators), batched.

Blondel, Teboul, Berthet, Djolonga (ICML 2020) reduce the regularised projection of z ∈ ℝⁿ onto the
permutahedron P(w) (w sorted descending) to an isotonic problem on s = z sorted descending:

    v* = argmin_{v_1 ≥ … ≥ v_n} Σ_i Ω*(s_i − v_i) + ⟨e(w), v⟩,   y = ∇Ω*(s − v*)  (then unsorted),

with, per regulariser ``mode``:

* ``l2``  (Ω = ½‖y‖²):           Ω*(u) = u²/2, e(w) = w, ∇Ω*(u) = u; block value mean(s − w).
* ``kl``  (entropic, w = log ρ):  Ω*(u) = e^u, e(w) = e^w, ∇Ω*(u) = e^u; block value LSE(s) − LSE(w).
* ``p4/3`` (Ω = ¾‖y‖^{4/3}_{4/3}, Sander et al. 2023): Ω*(u) = u⁴/4, ∇Ω*(u) = u³; the block value γ
  solves Σ (s_i − γ)³ = Σ w_i (a monotone cubic: bracketed Newton to machine precision).

PAV (a stack of blocks, merged while a block's value exceeds its predecessor's) is O(n) after the
O(n log n) sort; it runs compiled with numba over the batch, in float64, on the CPU (CUDA tensors make
a round trip: numba's CPU PAV is what the paper's own code uses; a GPU PAV is not written).

Backward (O(n)): with d_i = (∇Ω*)'(s_i − v_i) and B(i) the block of i, y_i = ∇Ω*(s_i − γ_B) and
Σ_B ∇Ω*(s_j − γ_B) = const give ∂γ_B/∂s_j = d_j / Σ_B d, hence
``(Jᵀg)_j = d_j g_j − d_j · Σ_B d_i g_i / Σ_B d_i`` (0/0 := 0: a p4/3 singleton at u = 0), done with
segment sums over the block ids. w carries no gradient.
"""
from __future__ import annotations

import numpy as np
import torch

MODES = ("l2", "kl", "p4/3")
_MODE_ID = {"l2": 0, "kl": 1, "p4/3": 2}
_KERNEL = None


def _cubic_block_value(s1: float, s2: float, s3: float, cnt: float, wsum: float, lo: float, hi: float) -> float:
    """Root γ of S3 − 3γS2 + 3γ²S1 − cnt·γ³ = W (decreasing in γ) in [lo, hi]: Newton inside bisection."""
    g = 0.5 * (lo + hi)
    for _ in range(200):
        f = s3 - 3 * g * s2 + 3 * g * g * s1 - cnt * g * g * g - wsum
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


def _pav_batch(s: np.ndarray, w: np.ndarray, mode: int, sol: np.ndarray, block: np.ndarray) -> None:
    """Decreasing isotonic solution v (into sol) and each element's block start (into block), per row."""
    batch, n = s.shape
    a1 = np.empty(n)  # l2: Σ(s−w) | kl: LSE(s) | p: Σs
    a2 = np.empty(n)  # l2: count  | kl: LSE(w) | p: Σs²
    a3 = np.empty(n)  # p: Σs³
    a4 = np.empty(n)  # p: Σw
    cnt = np.empty(n)
    smin = np.empty(n)
    smax = np.empty(n)
    val = np.empty(n)
    start = np.empty(n, dtype=np.int64)
    for b in range(batch):
        top = -1
        for i in range(n):
            top += 1
            x, wi = s[b, i], w[b, i]
            start[top], cnt[top], smin[top], smax[top] = i, 1.0, x, x
            if mode == 0:
                a1[top], a2[top] = x - wi, 1.0
                val[top] = x - wi
            elif mode == 1:
                a1[top], a2[top] = x, wi
                val[top] = x - wi
            else:
                a1[top], a2[top], a3[top], a4[top] = x, x * x, x * x * x, wi
                val[top] = x - np.cbrt(wi)
            while top > 0 and val[top - 1] <= val[top]:
                p = top - 1
                cnt[p] += cnt[top]
                smin[p] = min(smin[p], smin[top])
                smax[p] = max(smax[p], smax[top])
                if mode == 0:
                    a1[p] += a1[top]
                    a2[p] += a2[top]
                    val[p] = a1[p] / a2[p]
                elif mode == 1:
                    a1[p] = np.logaddexp(a1[p], a1[top])
                    a2[p] = np.logaddexp(a2[p], a2[top])
                    val[p] = a1[p] - a2[p]
                else:
                    a1[p] += a1[top]
                    a2[p] += a2[top]
                    a3[p] += a3[top]
                    a4[p] += a4[top]
                    root = np.cbrt(a4[p] / cnt[p])
                    val[p] = _cubic_block_value_jit(a1[p], a2[p], a3[p], cnt[p], a4[p], smin[p] - root - 1e-12,
                                                    smax[p] + 1e-12)
                top = p
        for blk in range(top + 1):
            end = start[blk + 1] if blk < top else n
            for i in range(start[blk], end):
                sol[b, i] = val[blk]
                block[b, i] = start[blk]


def _kernel():
    """Compile the PAV once (numba, cached on disk); imported lazily so `import losses` stays fast."""
    global _KERNEL, _cubic_block_value_jit
    if _KERNEL is None:
        import numba

        _cubic_block_value_jit = numba.njit(cache=True)(_cubic_block_value)
        globals()["_cubic_block_value_jit"] = _cubic_block_value_jit
        _KERNEL = numba.njit(cache=True)(_pav_batch)
    return _KERNEL


_cubic_block_value_jit = _cubic_block_value  # replaced by the compiled version in _kernel()


def isotonic_decreasing(s: np.ndarray, w: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(v*, block start of every element) of the isotonic problem above; s, w float64 [B, n]."""
    sol = np.empty_like(s)
    block = np.empty(s.shape, dtype=np.int64)
    _kernel()(np.ascontiguousarray(s), np.ascontiguousarray(w), _MODE_ID[mode], sol, block)
    return sol, block


def _grad_map(u: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇Ω*(u), (∇Ω*)'(u))."""
    if mode == "l2":
        return u, torch.ones_like(u)
    if mode == "kl":
        e = u.exp()
        return e, e
    return u.pow(3), 3 * u.pow(2)


class _Projection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, w, mode: str):  # type: ignore[override]
        batch, n = z.shape
        z64 = z.detach().double().cpu().numpy()
        order_np = np.argsort(-z64, axis=1)  # numpy's argsort: several times faster than torch's CPU sort here
        v, block = isotonic_decreasing(np.take_along_axis(z64, order_np, 1), w.detach().double().cpu().numpy(), mode)
        order = torch.from_numpy(order_np).to(z.device)
        s = z.gather(1, order)
        v = torch.from_numpy(v).to(z.device, z.dtype)
        y_sorted, d = _grad_map(s - v, mode)
        seg = torch.from_numpy(block).to(z.device) + n * torch.arange(batch, device=z.device).unsqueeze(1)
        ctx.save_for_backward(order, d, seg)
        return torch.empty_like(z).scatter_(1, order, y_sorted)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        order, d, seg = ctx.saved_tensors
        g = grad.gather(1, order) * d
        flat_seg = seg.reshape(-1)
        num = torch.zeros(seg.numel(), dtype=g.dtype, device=g.device).index_add_(0, flat_seg, g.reshape(-1))
        den = torch.zeros_like(num).index_add_(0, flat_seg, d.reshape(-1))
        ratio = torch.where(den > 0, num / torch.where(den > 0, den, 1), 0).gather(0, flat_seg).view_as(g)
        g_sorted = g - d * ratio
        return torch.empty_like(g_sorted).scatter_(1, order, g_sorted), None, None


def permutahedron_projection(z: torch.Tensor, w: torch.Tensor, mode: str = "l2") -> torch.Tensor:
    """y = ∇Ω*(z − v*) ∈ P(w) (or P(e^w) for ``kl``), [B, n]; w: [n] or [B, n], sorted descending."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    w = w.to(z.dtype).expand_as(z)
    return _Projection.apply(z, w, mode)
