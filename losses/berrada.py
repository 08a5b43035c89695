"""Berrada, Zisserman & Kumar (ICLR 2018): hard and smooth top-k SVM losses.

Notation: scores s ∈ R^n, label y, Y^(k) = all k-subsets of classes, Y_y^(k) = the k-subsets that
contain y, Δ_k(ȳ, y) = α·1[y ∉ ȳ].

Hard loss (the paper's l_k, the τ → 0 limit of the smooth one):
    l_k(s, y) = max_{ȳ∈Y^(k)} {Δ_k(ȳ,y) + (1/k)Σ_{j∈ȳ} s_j} − max_{ȳ∈Y_y^(k)} {(1/k)Σ_{j∈ȳ} s_j}
              = max{α + ((s\\y)_[k] − s_y)/k, 0}
where (s\\y)_[k] is the k-th largest score among the classes other than y.

Smooth loss:
    L_{k,τ}(s, y) = τ·log Σ_{ȳ∈Y^(k)} exp((Δ_k(ȳ,y) + (1/k)Σ_{j∈ȳ} s_j)/τ)
                  − τ·log Σ_{ȳ∈Y_y^(k)} exp((1/k)Σ_{j∈ȳ} s_j/τ)
                  = τ·log(1 + e^{α/τ}·σ_k(e) / (e^{x_y}·σ_{k−1}(e)))
with x = s/(kτ), e = exp(x) over the classes j ≠ y and σ_i the i-th elementary symmetric polynomial.

σ_{k−1}, σ_k (over e without y, shifted by the largest x so that e ∈ [0, 1]) are computed per
sample by the cheapest exact method that is accurate for it:
0. On the CPU for k ≤ 16 (the default path there): the compiled kernel of losses/berrada_esp.py,
   an all-positive O(nk) recurrence with a hand-written backward whose subtractions are bounded
   (relative error ~1e-15 in float64 at any logit scale, see its docstring), and an exact
   truncation of elements too small to change σ_k, σ_{k−1} in float64. float32 scores use
   float32 e except in rows where e would underflow (those are redone with float64 e); the loss
   itself is formed in float64. Rows whose σ_k would underflow float64 (scores ~1e4) take path 2-3.
   It replaced path 1 on the CPU: at logit scale 30 Newton's identities reject most rows (cancellation)
   and the trees cost ~12× cross-entropy.
1. Newton's identities on the power sums p_i = Σ e^i (one batched float64 triangular solve), used
   when the cancelling terms are bounded: for float32 scores first with the [B, n] work in float32
   where σ̄/σ ≤ 1e2 (error ≲ 1e-6, the common case for typical logits), then in float64 for the
   rows with σ̄/σ ≤ 1e6; for float64 scores in float64 where σ̄/σ ≤ 1e3. All [B, n] work is fused
   in one autograd.Function with a hand-written backward. (GPU, and k > 16.)
2. A divide-and-conquer tree of truncated polynomial products in linear space (O(nk), log2 n
   rounds), when nothing relevant can underflow.
3. The same tree in log space (logsumexp; finite -1e30 instead of -inf): exact and stable for any
   scores (±1e4 in float32), used for near-hard rows.
The rows paths 0-1 reject go to 2-3 in float64. The original per-sample switch to the hard loss is
not used: every path stays exact there.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from harness.registry import Log, Param, register_loss
from losses.berrada_esp import KMAX as ESP_KMAX
from losses.berrada_esp import _kernel as esp_kernel
from losses.berrada_shift import EspLoss, EspMargin, esp_loss
from losses.common import check_k, working_precision
from losses.reference_difftopk import berrada_smooth_reference

log = logging.getLogger(__name__)

PAPER = "Berrada, Zisserman, Kumar. Smooth Loss Functions for Deep Top-k Classification. ICLR 2018"
_NEG = -1e30  # finite stand-in for log(0): keeps logsumexp gradients free of NaN


@lru_cache(maxsize=None)
def _conv_tables(d: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables for the truncated product of two degree-d polynomials (coefficients 0..d_out).

    idx[j, a] is the flat index of (a, j−a) in the outer product and valid[j, a] is 0 ≤ j−a ≤ d.
    """
    idx = torch.zeros(d_out + 1, d + 1, dtype=torch.long)
    valid = torch.zeros(d_out + 1, d + 1, dtype=torch.bool)
    for a in range(d + 1):
        for j in range(d_out + 1):
            if 0 <= j - a <= d:
                idx[j, a] = a * (d + 1) + (j - a)
                valid[j, a] = True
    return idx, valid


def _leaves(values: torch.Tensor, one: float, pad: float) -> tuple[torch.Tensor, int]:
    """Stack [one, v] per element, padded with [one, pad] to a power-of-two count."""
    b, n = values.shape
    size = 1 << max(0, (n - 1).bit_length())
    if size > n:
        values = torch.cat([values, values.new_full((b, size - n), pad)], dim=1)
    return torch.stack([torch.full_like(values, one), values], dim=-1), size


@lru_cache(maxsize=None)
def _shift_index(d: int, d_out: int) -> torch.Tensor:
    """Flat index idx[j, a] = j − a when 0 ≤ j − a ≤ d, else d + 1 (a zero row)."""
    idx = torch.full((d_out + 1, d + 1), d + 1, dtype=torch.long)
    for j in range(d_out + 1):
        for a in range(d + 1):
            if 0 <= j - a <= d:
                idx[j, a] = j - a
    return idx.flatten()


def esp_linear(e: torch.Tensor, k: int) -> torch.Tensor:
    """Elementary symmetric polynomials σ_0..σ_k of the rows of e ≥ 0 ([B, n] -> [B, k+1]).

    Tree of truncated polynomial products; layout [node, coefficient, batch] so that every
    operation runs on contiguous batch rows. The first two rounds are written out.
    """
    b, n = e.shape
    size = 1 << max(0, (n - 1).bit_length())
    et = e.t().contiguous()
    if size > n:
        et = torch.cat([et, et.new_zeros(size - n, b)], 0)
    planes, d = [et], 1
    if size >= 2:  # (1 + a t)(1 + b t)
        h = size // 2
        lo, hi = et[:h], et[h:]
        planes, size, d = [lo + hi, lo * hi], h, 2
    if size >= 2 and k >= 3:  # product of two degree-2 polynomials
        h = size // 2
        a1, a2, b1, b2 = planes[0][:h], planes[1][:h], planes[0][h:], planes[1][h:]
        planes = [a1 + b1, a2 + b2 + a1 * b1, a1 * b2 + a2 * b1, a2 * b2]
        size, d = h, 4
    d = min(d, k)
    poly = torch.stack([torch.ones_like(planes[0])] + planes[:d], 1)  # [size, d+1, B]
    while size > 1:
        h = size // 2
        d_out = min(2 * d, k)
        left, right = poly[:h], poly[h:]
        right = torch.cat([right, right.new_zeros(h, 1, b)], 1)
        shifted = right[:, _shift_index(d, d_out).to(e.device)].view(h, d_out + 1, d + 1, b)
        poly = (left.unsqueeze(1) * shifted).sum(2)
        size, d = h, d_out
    out = poly[0].t()
    if d < k:  # fewer than k elements: the higher coefficients are 0
        out = torch.cat([out, out.new_zeros(b, k - d)], 1)
    return out


def log_esp(x: torch.Tensor, k: int) -> torch.Tensor:
    """log σ_0..σ_k of exp(x) for the rows of x ([B, n] -> [B, k+1]), entirely in log space.

    Entries of x at or below -1e30 act as absent elements; absent coefficients come out ≈ -1e30.
    """
    poly, size = _leaves(x, 0.0, _NEG)
    d = 1
    while size > 1:
        half = size // 2
        d_out = min(2 * d, k)
        idx, valid = _conv_tables(d, d_out)
        idx, valid = idx.to(x.device), valid.to(x.device)
        left, right = poly[:, :half], poly[:, half:]
        outer = (left.unsqueeze(-1) + right.unsqueeze(-2)).flatten(-2)  # [B, h, (d+1)^2]
        terms = outer[..., idx]  # [B, h, d_out+1, d+1]
        terms = torch.where(valid, terms, torch.full_like(terms, _NEG))
        poly = torch.logsumexp(terms, dim=-1).clamp_min(_NEG)
        size, d = half, d_out
    out = poly[:, 0]
    if d < k:
        out = torch.cat([out, out.new_full((out.shape[0], k - d), _NEG)], dim=1)
    return out


class _NewtonRatio(torch.autograd.Function):
    """Fused Newton path: scores [B, n], labels [B] -> (ratio [B], margin [B], ok [B]).

    x = scores/(kτ), m = max_{j≠y} x_j (a constant: the loss is invariant to it), e_j = exp(x_j − m)
    for j ≠ y (e_y = 0), p_i = Σ_j e_j^i in the dtype `work` (the [B, n] part), σ_1..σ_k by Newton's
    identities (one batched float64 triangular solve, together with the all-positive bound σ̄),
    ratio = log σ_k − log σ_{k−1}, margin = x_y − m, ok = rows with σ̄/σ ≤ max_ratio (ratio is 0
    and gets no gradient elsewhere).

    Everything on [B, n] happens here without autograd bookkeeping. Backward: adjoint of the
    triangular system for dp, then Horner's rule for d p_i / d x_j = i·e_j^i.
    """

    @staticmethod
    def forward(ctx, scores, labels, k: int, scale: float, max_ratio: float, force: bool,  # type: ignore[override]
                work: torch.dtype):
        b, lab = scores.shape[0], labels[:, None]
        m = scores.scatter(1, lab, float("-inf")).amax(1, keepdim=True)
        e = torch.add(m * -scale, scores, alpha=scale).exp_().scatter_(1, lab, 0.0).to(work)
        margin = (scores.gather(1, lab) - m).squeeze(1) * scale
        sums = [e.sum(1)]
        if k > 1:
            cur = e * e
            sums.append(cur.sum(1))
            for _ in range(2, k):
                sums.append(cur.mul_(e).sum(1))
        p = torch.stack(sums, 1).double()
        idx, sign, diag, rhs_sign = _newton_tables(k, True, p.dtype, p.device)
        mat = (p[:, idx].view(-1, k, k) * sign + diag).view(-1, k, k)
        sol = torch.linalg.solve_triangular(mat, (p * rhs_sign).reshape(-1, k, 1), upper=False)
        sig, cum = sol[:b, :, 0], sol[b:, :, 0].cumsum(1) + 1.0  # cum_j = Σ_{i≤j} σ̄_i
        one = torch.ones_like(sig[:, 0])
        sig_k, sig_km1 = sig[:, k - 1], (sig[:, k - 2] if k > 1 else one)
        cum_km1 = cum[:, k - 2] if k > 1 else one
        worst = torch.maximum(cum[:, k - 1] / sig_k, cum_km1 / sig_km1)
        ok = (sig_k > 0) & (sig_km1 > 0) & (worst <= max_ratio)
        if force:
            ok = torch.ones_like(ok)
        sig_k, sig_km1 = torch.where(ok, sig_k, one), torch.where(ok, sig_km1, one)
        ratio = (sig_k / sig_km1).log()
        ctx.save_for_backward(e, labels, mat[:b], sig, sig_k, sig_km1, ok)
        ctx.k, ctx.scale, ctx.dtype = k, scale, scores.dtype
        ctx.mark_non_differentiable(ok)
        return ratio.to(scores.dtype), margin, ok

    @staticmethod
    def backward(ctx, grad_ratio, grad_margin, _grad_ok):  # type: ignore[override]
        e, labels, mat, sig, sig_k, sig_km1, ok = ctx.saved_tensors
        k = ctx.k
        gr = torch.where(ok, grad_ratio.double(), torch.zeros_like(sig_k))
        g = torch.zeros_like(sig)
        g[:, k - 1] = gr / sig_k
        if k > 1:
            g[:, k - 2] = -gr / sig_km1
        # σ = A⁻¹ r  =>  dL/dp_i = λ_i·ρ_i − Σ_{j>l} λ_j σ_l sign_jl [idx_jl = i], with Aᵀλ = g
        lam = torch.linalg.solve_triangular(mat.transpose(-1, -2), g.unsqueeze(-1), upper=True)[..., 0]
        idx, sign, _, rhs_sign = _newton_tables(k, False, sig.dtype, sig.device)
        outer = (lam.unsqueeze(2) * sig.unsqueeze(1) * -sign).view(-1, k * k)
        dp = (lam * rhs_sign).index_add_(1, idx, outer)
        coef = (dp * (ctx.scale * torch.arange(1, k + 1, dtype=torch.float64, device=e.device))).to(e.dtype)
        cols = [c.contiguous().unsqueeze(1) for c in coef.unbind(1)]
        h = torch.empty_like(e).copy_(cols[-1].expand_as(e))
        for c in reversed(cols[:-1]):  # Σ_i i·c_i·e^(i−1)
            torch.addcmul(c, h, e, out=h)
        grad = h.mul_(e).to(ctx.dtype)  # e_y = 0: the label column is 0 here
        grad.scatter_(1, labels[:, None], (grad_margin * ctx.scale).to(ctx.dtype)[:, None])
        return grad, None, None, None, None, None, None


@lru_cache(maxsize=None)
def _newton_tables(
    k: int, with_bound: bool, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index/sign tables of Newton's identities as a lower-triangular system in σ_1..σ_k."""
    lag = torch.arange(k)[:, None] - torch.arange(k)[None, :]  # j − l
    lower = lag > 0
    idx = torch.where(lower, lag - 1, torch.zeros_like(lag))  # p_{j−l} at column j−l−1 of p
    sign = torch.where(lower, (-1.0) ** lag, torch.zeros(k, k, dtype=torch.float64))
    diag = torch.diag(torch.arange(1, k + 1, dtype=torch.float64))
    rhs_sign = (-1.0) ** torch.arange(k, dtype=torch.float64)  # (−1)^(j−1), j = 1..k
    if with_bound:  # second block: every sign positive
        sign = torch.stack([sign, -sign.abs()])[:, None]
        rhs_sign = torch.stack([rhs_sign, rhs_sign.abs()])[:, None]
    tables = (sign, diag, rhs_sign)
    return (idx.flatten().to(device), *(t.to(device=device, dtype=dtype) for t in tables))


def _linear_safe_gap(n_other: int, k: int, dtype: torch.dtype) -> float:
    """Largest top-k spread Σ(max − x_[i]) for which the linear-space tree is accurate.

    σ_k ≥ exp(−spread) after shifting by the max, while underflow loses at most ~C(n,k)·tiny and
    σ_k ≤ C(n,k) must not overflow; the margin keeps the relative error below machine epsilon.
    """
    info = torch.finfo(dtype)
    log_comb = math.lgamma(n_other + 1) - math.lgamma(k + 1) - math.lgamma(n_other - k + 1)
    if log_comb > math.log(info.max) - 10:
        return -1.0
    return math.log(info.tiny) * -1.0 - log_comb + math.log(info.eps) - 2.0


# Newton's identities are trusted when the cancelling terms are at most this many times the result:
# (dtype of the scores) -> [(dtype of the [B, n] work, largest σ̄/σ), ...], tried in order on the rows
# not yet accepted. The error is then ~1e2·eps·ratio: ≲ 1e-6 for float32 work at ratio 1e2 (float32
# output), ≲ 1e-10 for float64 work at 1e6, ≲ 1e-13 at 1e3 (float64 output).
_NEWTON_TIERS = {
    torch.float32: ((torch.float32, 1e2), (torch.float64, 1e6)),
    torch.float64: ((torch.float64, 1e3),),
}


def smooth_topk_svm(
    scores: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    alpha: float,
    tau: float,
    method: str = "auto",
) -> torch.Tensor:
    """Per-sample smooth top-k SVM loss L_{k,τ} ([B, n], [B] -> [B]).

    method: "auto" (on the CPU for k ≤ 16 the compiled exact kernel, elsewhere Newton's identities
    where well conditioned; rows either rejects go to the linear-space tree where nothing can
    underflow, else the log-space tree), or one of "esp" (the kernel; CPU only), "newton",
    "linear", "log".
    """
    if method not in ("auto", "esp", "newton", "linear", "log"):
        raise ValueError(f"method={method!r} must be auto, esp, newton, linear or log")
    x = working_precision(scores)
    b, n = x.shape
    scale = 1.0 / (k * tau)
    if method == "esp" and (x.device.type != "cpu" or k > ESP_KMAX):
        raise ValueError(f"method='esp' needs CPU scores and k <= {ESP_KMAX} (got {x.device.type}, k={k})")

    def shifted() -> tuple[torch.Tensor, torch.Tensor]:
        """(xc, margin) with autograd: xc = x − m with the label entry at -1e30 (absent)."""
        xs = x * scale
        x_y = xs.gather(1, labels[:, None]).squeeze(1)
        xm = xs.scatter(1, labels[:, None], _NEG)
        m = xm.detach().amax(1)
        return xm - m[:, None], x_y - m

    def lin(xc: torch.Tensor) -> torch.Tensor:
        s = esp_linear(torch.exp(xc), k)
        return s[:, k].log() - s[:, k - 1].log()

    def lg(xc: torch.Tensor) -> torch.Tensor:
        s = log_esp(xc, k)
        return s[:, k] - s[:, k - 1]

    def tree_fix(ok: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ratio, margin) [B] in float64 for the rows not ok (0 elsewhere): the linear tree where
        nothing can underflow, else the log tree, in float64 whatever the scores' dtype (few rows)."""
        bad = (~ok).nonzero().squeeze(1)
        xs = x[bad].double() * scale
        lab = labels[bad][:, None]
        xm = xs.scatter(1, lab, _NEG)
        m = xm.detach().amax(1)
        xc, margin = xm - m[:, None], xs.gather(1, lab).squeeze(1) - m
        top = xc.detach().topk(k, dim=1).values  # ≤ 0, the first is 0
        use_lin = -top.sum(1) <= _linear_safe_gap(n - 1, k, torch.float64)
        ratio = torch.zeros_like(m)
        if bool(use_lin.any()):
            ratio = ratio.index_put((use_lin.nonzero().squeeze(1),), lin(xc[use_lin]))
        if not bool(use_lin.all()):
            ratio = ratio.index_put(((~use_lin).nonzero().squeeze(1),), lg(xc[~use_lin]))
        log.debug("berrada_smooth: %d/%d samples off the %s path", len(bad), b, path)
        full = x.new_zeros(b, dtype=torch.float64)
        return full.index_put((bad,), ratio), full.index_put((bad,), margin)

    if method == "esp" or (method == "auto" and x.device.type == "cpu" and k <= ESP_KMAX):
        want = torch.is_grad_enabled() and x.requires_grad
        parts, margin_parts = esp_loss(x, labels, k, scale, alpha, tau, want)
        if parts is not None:  # the common case: every row ok, one autograd node for the whole loss
            return EspLoss.apply(x, labels, *parts, scale, k)
        z, ok, grad = margin_parts  # z float64
        z = EspMargin.apply(x, labels, z, ok, grad, scale)  # near-hard rows (not ok) from the log-space tree
        fix, margin = tree_fix(ok, "compiled")
        z = torch.where(ok, z, fix - margin)
        return (tau * F.softplus(alpha / tau + z)).to(x.dtype)
    if method in ("linear", "log"):
        xc, margin = shifted()
        ratio = lin(xc) if method == "linear" else lg(xc)
    else:
        tiers = _NEWTON_TIERS[x.dtype]
        if method == "newton":  # forced: the most precise tier on every row
            tiers = tiers[-1:]
        (work, max_ratio), rest = tiers[0], tiers[1:]
        ratio, margin, ok = _NewtonRatio.apply(x, labels, k, scale, max_ratio, method == "newton", work)
        for work, max_ratio in rest:
            if bool(ok.all()):
                break
            bad = (~ok).nonzero().squeeze(1)
            r2, _, ok2 = _NewtonRatio.apply(x[bad].to(work), labels[bad], k, scale, max_ratio, False, work)
            ratio = ratio.index_put((bad,), r2.to(ratio.dtype))
            ok = ok.index_put((bad,), ok2)
        if not bool(ok.all()):  # margin stays the fused one: the same value, one gradient path
            ratio = torch.where(ok, ratio, tree_fix(ok, "Newton")[0].to(ratio.dtype))
    return tau * F.softplus(alpha / tau + ratio - margin)


def hard_topk_svm(scores: torch.Tensor, labels: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """Per-sample hard top-k SVM loss max{α + ((s\\y)_[k] − s_y)/k, 0} ([B, n], [B] -> [B])."""
    s = working_precision(scores)
    s_y = s.gather(1, labels[:, None]).squeeze(1)
    others = s.scatter(1, labels[:, None], float("-inf"))
    kth = others.topk(k, dim=1).values[:, k - 1]
    return torch.clamp(alpha + (kth - s_y) / k, min=0.0)


_K = Param(int, 5, ge=1, doc="k of top-k (k < num_classes)")
_ALPHA = Param(float, 1.0, ge=0.0, doc="margin α", search=Log(0.1, 10.0))


@register_loss(
    "berrada_hard",
    family="berrada",
    paper=PAPER,
    version=1,
    params={"k": _K, "alpha": _ALPHA},
)
class BerradaHardTopK(nn.Module):
    """Hard top-k SVM: max{α + ((s\\y)_[k] − s_y)/k, 0}, mean over the batch."""

    def __init__(self, num_classes: int, k: int = 5, alpha: float = 1.0) -> None:
        super().__init__()
        check_k(k, num_classes)
        if alpha < 0:
            raise ValueError(f"alpha={alpha} must be >= 0")
        self.num_classes, self.k, self.alpha = num_classes, k, float(alpha)

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return hard_topk_svm(scores, labels, self.k, self.alpha).mean()


@register_loss(
    "berrada_smooth",
    family="berrada",
    paper=PAPER,
    version=1,
    reference=berrada_smooth_reference,
    params={"k": _K, "alpha": _ALPHA, "tau": Param(float, 1.0, gt=0.0, doc="temperature τ", search=Log(1e-3, 10.0))},
)
class BerradaSmoothTopK(nn.Module):
    """Smooth top-k SVM L_{k,τ} (log-sum-exp over k-subsets), mean over the batch."""

    def __init__(self, num_classes: int, k: int = 5, alpha: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        check_k(k, num_classes)
        if alpha < 0:
            raise ValueError(f"alpha={alpha} must be >= 0")
        if not tau > 0:
            raise ValueError(f"tau={tau} must be > 0")
        self.num_classes, self.k, self.alpha, self.tau = num_classes, k, float(alpha), float(tau)
        if k <= ESP_KMAX:  # compile (or load from the disk cache) the CPU kernel now, not in the first step
            esp_kernel(k)

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return smooth_topk_svm(scores, labels, self.k, self.alpha, self.tau).mean()
