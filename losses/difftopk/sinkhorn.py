"""Sinkhorn sort (Cuturi, Teboul & Vert 2019), top-K rows only, log-domain, implicit gradient.

Not part of the released difftopk code; built here as follows.

* Inputs are standardised per row and squashed, ``z = (n−1)·sigmoid((s − mean)/std)`` ∈ (0, n−1).
* Source measure: the n classes, mass 1/n each. Target measure: the K top rank anchors
  n−K, …, n−1 with mass 1/n each, plus one "rest" anchor at (n−K−1)/2 (the barycentre of ranks
  0..n−K−1) with mass (n−K)/n; when K ≥ n−1, a full sort onto the anchors 0..n−1.
* Cost C = squared distance (in rank units); entropic regularisation ε = 1/inverse_temperature,
  by default ε = n, which converges to 1e-4 in ~20 sweeps for n = 16 (use it with top-m
  preselection); for n ≳ 100 the sweeps converge slowly (hundreds), and a warning says when
  `iterations` ran out before `tolerance` was met (the gradient is then approximate). In 1-D a convex
  cost makes the unregularised plan the monotone (sorting) one, so as ε → 0 the top-K rows of
  P = n·π tend to the hard top-K permutation rows.
* Sinkhorn sweeps with ε-scaling (one sweep per stage from the cost range down to ε, ÷4 per stage),
  then over-relaxed sweeps at ε (ω = 1.5: same fixed point, faster convergence): on the scalings
  (u, v) with the kernel e^{−C/ε} (two batched mat-vecs a sweep) when the kernel cannot underflow
  (cost range ≤ 60 ε), else in the log domain. Every 5 sweeps the class marginal is checked: stop when
  every row of P sums to 1 within `tolerance` (0: run all `iterations`); the anchor marginal
  (columns) is exact after the final half-step.
* Gradient: implicit differentiation at the fixed point (no unrolled sweeps are kept), exact when
  the sweeps converged. With W = G∘π/ε for the output gradient G, solve for potentials (u, w)
  ``a_i u_i + Σ_j π_ij w_j = Σ_j W_ij``, ``Σ_i π_ij u_i + b_j w_j = Σ_i W_ij`` (via the K+1 × K+1
  Schur complement, one potential pinned: the system is singular along u = c, w = −c), then
  ``dL/dC_ij = π_ij (u_i + w_j) − W_ij``.
"""
from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)
OVERRELAXATION = 1.5
_WARNED: set[tuple[int, float]] = set()  # (n, eps) already reported as not converging


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log Σ exp along `dim` (keepdim) for finite x: torch.logsumexp's ±inf handling costs two extra
    kernels per call, which is most of a sweep at small n."""
    top = x.amax(dim, keepdim=True)
    return x.sub_(top).exp_().sum(dim, keepdim=True).log_().add_(top)


_SCALING_MAX_RATIO = 60.0  # exp(−C/ε) stays far above float32's smallest normal number (1e-38)
_CHECK_EVERY = 5  # sweeps between convergence checks (each check synchronises with the host)


def _log_sweeps(neg_c: torch.Tensor, f: torch.Tensor, g: torch.Tensor, log_b: torch.Tensor, sweeps: int,
                tolerance: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Over-relaxed log-domain sweeps (any ε). Returns (f, g, row-marginal error or inf if unchecked)."""
    log_a = -math.log(neg_c.shape[1])
    error = math.inf
    for sweep in range(sweeps):
        f_new = log_a - _logsumexp(neg_c + g, dim=2)
        if tolerance > 0 and ((sweep + 1) % _CHECK_EVERY == 0 or sweep + 1 == sweeps):
            error = float((f - f_new).exp_().sub_(1).abs_().amax())  # rows of the current plan vs 1/n
            if error < tolerance:
                break
        f = torch.lerp(f, f_new, OVERRELAXATION)
        g = log_b - _logsumexp(neg_c + f, dim=1)
    return f, g, error


def _scaling_sweeps(neg_c: torch.Tensor, f: torch.Tensor, g: torch.Tensor, log_b: torch.Tensor, sweeps: int,
                    tolerance: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Over-relaxed sweeps on the scalings u = e^f, v = e^g with a fixed kernel K = e^(−C/ε): two
    batched mat-vecs per sweep instead of two log-sum-exps, valid when K cannot underflow."""
    kernel, kernel_t = neg_c.exp(), neg_c.exp().transpose(1, 2)
    a, b = 1.0 / neg_c.shape[1], log_b.exp().transpose(1, 2)  # b: [1, r, 1]
    u, v = f.exp(), g.exp().transpose(1, 2)  # [B, n, 1], [B, r, 1]
    error = math.inf
    for sweep in range(sweeps):
        u_new = a / torch.bmm(kernel, v)
        if tolerance > 0 and ((sweep + 1) % _CHECK_EVERY == 0 or sweep + 1 == sweeps):
            error = float((u / u_new).sub_(1).abs_().amax())  # rows of the current plan vs 1/n
            if error < tolerance:
                break
        u = u * (u_new / u).pow_(OVERRELAXATION)  # over-relaxed: e^{f + ω (f_new − f)}
        v = b / torch.bmm(kernel_t, u)
    return u.log(), v.log().transpose(1, 2), error


class _SinkhornPlan(torch.autograd.Function):
    """C [B, n, r] -> the converged entropic plan π [B, n, r] between uniform classes and the anchors."""

    @staticmethod
    def forward(ctx, cost, log_b, eps: float, iterations: int, tolerance: float):  # type: ignore[override]
        batch, n, r = cost.shape
        f = cost.new_zeros(batch, n, 1)  # potentials divided by the current epsilon
        g = cost.new_zeros(batch, 1, r)
        cost_range = max(float(cost.detach().amax()), eps)
        stages = []
        while cost_range / 4 ** len(stages) > eps and len(stages) < iterations - 1:
            stages.append(cost_range / 4 ** len(stages))  # ε-scaling: one sweep per stage
        previous, done, error = (stages or [eps])[0], 0, math.inf
        for e in stages + [eps]:
            f, g, previous = f * (previous / e), g * (previous / e), e
            sweeps = 1 if e != eps else iterations - done
            sweep_fn = _scaling_sweeps if cost_range / e <= _SCALING_MAX_RATIO else _log_sweeps
            f, g, error = sweep_fn(cost / -e, f, g, log_b, sweeps, tolerance if e == eps else 0.0)
            done += sweeps
        if tolerance > 0 and error >= tolerance and (n, eps) not in _WARNED:
            _WARNED.add((n, eps))
            log.warning("Sinkhorn (n=%d, eps=%g) not converged after %d sweeps: row sums off by %.2g > %g; "
                        "its gradient is approximate (raise sinkhorn_iterations or eps)",
                        n, eps, iterations, error, tolerance)
        plan = torch.exp(cost / -eps + f + g)
        ctx.save_for_backward(plan, log_b)
        ctx.eps = eps
        return plan

    @staticmethod
    def backward(ctx, grad_plan):  # type: ignore[override]
        plan, log_b = ctx.saved_tensors
        pi = plan.double()
        n = pi.shape[1]
        a, b = 1.0 / n, log_b.double().exp().view(1, -1)
        weighted = grad_plan.double() * pi / ctx.eps
        row, col = weighted.sum(2), weighted.sum(1)  # [B, n], [B, r]
        schur = torch.diag_embed(b.expand_as(col)) - pi.transpose(1, 2) @ pi / a  # [B, r, r]
        rhs = col - (pi.transpose(1, 2) @ (row / a).unsqueeze(2)).squeeze(2)
        w = torch.zeros_like(col)
        w[:, :-1] = torch.linalg.solve(schur[:, :-1, :-1], rhs[:, :-1])
        u = (row - (pi @ w.unsqueeze(2)).squeeze(2)) / a
        grad_cost = pi * (u.unsqueeze(2) + w.unsqueeze(1)) - weighted
        return grad_cost.to(plan.dtype), None, None, None, None


def sinkhorn_topk(s: torch.Tensor, k: int, inverse_temperature: float, iterations: int = 50,
                  tolerance: float = 1e-4) -> torch.Tensor:
    """Top-K rows of the Sinkhorn-relaxed permutation, ``[B, K, n]`` (ascending ranks n−K..n−1)."""
    batch, n = s.shape
    dt, dev = s.dtype, s.device
    mean = s.mean(-1, keepdim=True)
    std = s.std(-1, keepdim=True) if n > 1 else torch.ones_like(mean)
    z = (n - 1) * torch.sigmoid((s - mean) / (std + 1e-8))
    if k >= n - 1:  # full sort
        anchors = torch.arange(n, device=dev, dtype=dt)
        log_b = torch.full((n,), -math.log(n), device=dev, dtype=dt)
        first = n - k
    else:
        anchors = torch.cat([torch.tensor([(n - k - 1) / 2], device=dev, dtype=dt),
                             torch.arange(n - k, n, device=dev, dtype=dt)])
        log_b = torch.cat([torch.tensor([math.log((n - k) / n)], device=dev, dtype=dt),
                           torch.full((k,), -math.log(n), device=dev, dtype=dt)])
        first = 1
    cost = (z.unsqueeze(-1) - anchors.view(1, 1, -1)).pow(2)  # [B, n, r]
    plan = _SinkhornPlan.apply(cost, log_b.view(1, 1, -1), 1 / inverse_temperature, iterations, tolerance)
    return (plan * n)[..., first:].transpose(1, 2)
