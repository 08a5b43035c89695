"""LapSum soft top-k (Struski, Bednarczyk, Podolak, Tabor, ICML 2025) and its top-k cross-entropy.

Ł. Struski et al. "LapSum – One Method to Differentiate Them All: Ranking, Sorting and Top-k
Selection", ICML 2025. With the Laplace CDF F(u) = ½e^u (u ≤ 0), 1 − ½e^{−u} (u > 0) and a scale
α > 0, the soft top-k of scores s is

    p_i = F((s_i − b)/α),   b such that Σ_i p_i = k,

for any real k ∈ (0, n). Σ_i F((s_i − b)/α) is, between two consecutive sorted scores, of the form
c + ½A·e^{−t} − ½B·e^{t}, so after one sort (and cumulative log-sum-exps for A and B at every knot)
b is the root of a quadratic in e^t on the segment where the knot values cross k: O(n log n) and
O(n) memory. Gradients by the implicit-function theorem on Σ F = k, with f_i = F'(u_i) = ½e^{−|u_i|}:
∂b/∂s_i = f_i/Σf, ∂b/∂k = −α/Σf, ∂b/∂α = −Σ f_i u_i / Σf; p then differentiates through autograd, so
the operator has gradients in the scores, α **and k** (fractional or learned k).

Choices the paper leaves open, and ours:
* The quadratic's root is taken in log form, ``log T = log(|c| + √(c² + AB)) − log B`` (c > 0) or
  ``log A − log(|c| + √(c² + AB))`` (c ≤ 0), with log A, log B from log-cumulative-sum-exps: no
  overflow for any α or score scale, no cancellation; b is clamped to its segment against rounding.
* Classification loss: the top-k cross-entropy of Petersen et al. 2022 over p (``losses.topk_ce``),
  with P_K = [.5, 0, 0, 0, .5] and the k = 1 term by softmax (``top1_mode=sm``) by default — the setup
  of the top-k learning experiments that LapSum compares against; one b per k in the support of P_K.
* α = 1 by default (scores in logit units); α → 0 gives the hard top-k mask (ties aside).
"""
from __future__ import annotations

import torch

from harness.registry import Param, register_loss
from losses.topk_ce import TopKCrossEntropy, topk_ce_params


def laplace_cdf(u: torch.Tensor) -> torch.Tensor:
    """F(u) = ½e^u for u ≤ 0, 1 − ½e^{−u} for u > 0 (no overflow on either side)."""
    half = 0.5 * torch.exp(-u.abs())
    return torch.where(u > 0, 1 - half, half)


def _threshold(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """b' with Σ_i F(x_i − b') = k for x [B, n] (scores / α) and k [B, J] in (0, n): [B, J]."""
    n = x.shape[1]
    xs = x.sort(dim=1).values  # ascending
    log_a = torch.logcumsumexp(xs, 1) - xs  # log Σ_{i≤j} e^{xs_i − xs_j}  (≥ 0)
    right = torch.logcumsumexp((-xs).flip(1), 1).flip(1)  # log Σ_{i≥j} e^{−xs_i}
    log_b = torch.cat([right[:, 1:], torch.full_like(right[:, :1], -torch.inf)], 1) + xs  # Σ_{i>j}
    j_idx = torch.arange(n, device=x.device, dtype=x.dtype)
    knots = (n - 1 - j_idx) + 0.5 * log_a.exp() - 0.5 * log_b.exp()  # Σ F(x − xs_j), decreasing in j
    count = torch.searchsorted(-knots.contiguous(), -k.contiguous(), right=True)  # #{j: knots_j ≥ k}
    j = (count - 1).clamp(0, n - 2)
    xj, xj1 = xs.gather(1, j), xs.gather(1, j + 1)
    la, lb = log_a.gather(1, j), log_b.gather(1, j)
    c = (n - 1) - j.to(x.dtype) - k
    log_c = c.abs().log()
    root = torch.logaddexp(log_c, 0.5 * torch.logaddexp(2 * log_c, la + lb))  # log(|c| + √(c² + AB))
    inner = xj + torch.where(c > 0, root - lb, la - root)
    inner = torch.minimum(torch.maximum(inner, xj), xj1)
    left = torch.log(2 * (n - k)) - torch.logsumexp(-x, 1, keepdim=True)  # b' below every score
    above = torch.logsumexp(x, 1, keepdim=True) - torch.log(2 * k)  # b' above every score
    return torch.where(count == 0, left, torch.where(count == n, above, inner))


class _LapSumThreshold(torch.autograd.Function):
    """(s [B, n], k [B, J], α [B, 1]) -> b [B, J] with Σ_i F((s_i − b)/α) = k; implicit gradient."""

    @staticmethod
    def forward(ctx, s, k, alpha):  # type: ignore[override]
        b = _threshold(s / alpha, k) * alpha
        ctx.save_for_backward(s, b, alpha)
        return b

    @staticmethod
    def backward(ctx, grad_b):  # type: ignore[override]
        s, b, alpha = ctx.saved_tensors
        u = (s.unsqueeze(1) - b.unsqueeze(2)) / alpha.unsqueeze(2)  # [B, J, n]
        weight = torch.softmax(-u.abs(), dim=2)  # f_i / Σf, stable when every f_i underflows
        grad_s = (grad_b.unsqueeze(2) * weight).sum(1)
        grad_alpha = -(grad_b * (weight * u).sum(2)).sum(1, keepdim=True)
        grad_k = None
        if ctx.needs_input_grad[1]:  # ∂b/∂k = −α/Σf (unbounded when b sits in a wide gap between scores)
            total = 0.5 * torch.logsumexp(-u.abs(), dim=2).exp()
            grad_k = -alpha * grad_b / total
        return grad_s, grad_k, grad_alpha


def lapsum_threshold(s: torch.Tensor, k: torch.Tensor | float, alpha: torch.Tensor | float) -> torch.Tensor:
    """The threshold b [B, J] for scores [B, n], k broadcastable to [B, J] (default J = 1), α to [B, 1]."""
    k = torch.as_tensor(k, dtype=s.dtype, device=s.device)
    alpha = torch.as_tensor(alpha, dtype=s.dtype, device=s.device)
    k = k.reshape(1, 1) if k.dim() == 0 else k.reshape(k.shape[0], -1) if k.dim() <= 2 else k
    k = k.expand(s.shape[0], k.shape[1])
    n = s.shape[1]
    if bool(((k <= 0) | (k >= n)).any()):
        raise ValueError(f"LapSum needs 0 < k < n={n}")
    alpha = alpha.reshape(-1, 1).expand(s.shape[0], 1)
    if bool((alpha <= 0).any()):
        raise ValueError("LapSum needs alpha > 0")
    return _LapSumThreshold.apply(s, k, alpha)


def lapsum_topk(s: torch.Tensor, k: torch.Tensor | float, alpha: torch.Tensor | float) -> torch.Tensor:
    """Soft top-k mask p [B, n] (or [B, J, n] for k of shape [B, J] with J > 1), Σ_i p_i = k."""
    b = lapsum_threshold(s, k, alpha)
    a = torch.as_tensor(alpha, dtype=s.dtype, device=s.device).reshape(-1, 1, 1)
    p = laplace_cdf((s.unsqueeze(1) - b.unsqueeze(2)) / a)
    return p.squeeze(1) if p.shape[1] == 1 else p


@register_loss(
    "lapsum",
    family="lapsum",
    paper="Struski, Bednarczyk, Podolak, Tabor. LapSum - One Method to Differentiate Them All: "
    "Ranking, Sorting and Top-k Selection. ICML 2025",
    version=1,
    params={**topk_ce_params(), "alpha": Param(float, 1.0, gt=0.0, doc="Laplace scale α (temperature)")},
)
class LapSumLoss(TopKCrossEntropy):
    """Top-k cross-entropy over the LapSum soft top-k mask."""

    def __init__(self, num_classes: int, p_k: list | tuple = (0.5, 0.0, 0.0, 0.0, 0.5), m: int | None = None,
                 top1_mode: str = "sm", alpha: float = 1.0) -> None:
        super().__init__(num_classes, p_k, m, top1_mode)
        if not alpha > 0:
            raise ValueError(f"alpha={alpha} must be > 0")
        self.alpha = float(alpha)

    def label_mass(self, s: torch.Tensor, labels: torch.Tensor, ks: list[int], weights: list[float]) -> torch.Tensor:
        k = torch.tensor(ks, dtype=s.dtype, device=s.device).expand(s.shape[0], len(ks))
        b = lapsum_threshold(s, k, self.alpha)  # [B, J]
        s_y = s.gather(1, labels.unsqueeze(1))
        p_y = laplace_cdf((s_y - b) / self.alpha)  # [B, J]
        return p_y @ torch.tensor(weights, dtype=s.dtype, device=s.device)
