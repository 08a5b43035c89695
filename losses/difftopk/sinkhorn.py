"""Entropic OT onto a few anchors, solved to tolerance at any ε; Sinkhorn sort (Cuturi, Teboul & Vert 2019).

Not part of the released difftopk code; built here as follows.

* ``sinkhorn_topk``: inputs are standardised per row and squashed, ``z = (n−1)·sigmoid((s − mean)/std)``
  ∈ (0, n−1). Source measure: the n classes, mass 1/n each. Target measure: the K top rank anchors
  n−K, …, n−1 with mass 1/n each, plus one "rest" anchor at (n−K−1)/2 (the barycentre of ranks
  0..n−K−1) with mass (n−K)/n; when K ≥ n−1, a full sort onto the anchors 0..n−1. Cost C = squared
  distance (in rank units); ε = 1/inverse_temperature, by default ε = n. In 1-D a convex cost makes the
  unregularised plan the monotone (sorting) one, so as ε → 0 the top-K rows of P = n·π tend to the
  hard top-K permutation rows.
* Solver (``entropic_plan``, shared with ``soft_topk``): ascent on the *semi-dual* — concave in the
  r anchor potentials g (r = K+1 here), the class potentials eliminated in closed form, so the class
  marginal is exact at every step and the anchor marginal c(g) is the residual. Each step is a
  Sinkhorn update g += ε·log(b/c) followed by a damped Newton (Levenberg–Marquardt) step, kept per
  sample only where it raises the semi-dual (or, within rounding of it, brings the marginals closer).
  Log-domain throughout (softmax over the anchors), float64 whatever the input dtype, masses
  renormalised in float64. Start: the potentials of the ε → 0 problem (``hard_potentials``: in 1-D
  with a squared cost, sorted points fill the ascending anchors), or 0, whichever is better per sample;
  without a start, ε-scaling from the cost range (÷ 8 per stage). Plain Sinkhorn needs O(C/ε) sweeps
  (20,000 leave 1e−5 marginal errors at ε = 1/16 in rank units); this takes a few steps at any ε.
  On the CPU the same steps run compiled per sample (``losses.difftopk.semidual``, numba); the torch
  version (``_newton_stage``, batched) serves other devices. ``sinkhorn_topk`` and ``soft_topk`` on the
  CPU go further (``fused_plan``, ``losses.difftopk.anchor_ot``): scores to plan and plan gradient to
  score gradient in one compiled call each (``COMPILED`` = False gives them the cost-level path).
* Convergence: every anchor's mass within ``tolerance`` (relative) of its target. A solve that does
  not get there within ``iterations`` Newton steps raises ``SinkhornNotConverged`` (a run is then
  recorded ``failed`` with this reason) rather than training on with a wrong gradient.
* Gradient: implicit differentiation at the optimum (exact when converged; no unrolled steps kept).
  With W = G∘π/ε for the output gradient G, solve for potentials (u, w)
  ``a_i u_i + Σ_j π_ij w_j = Σ_j W_ij``, ``Σ_i π_ij u_i + b_j w_j = Σ_i W_ij`` (via the r × r Schur
  complement, one potential pinned: the system is singular along u = c, w = −c), then
  ``dL/dC_ij = π_ij (u_i + w_j) − W_ij``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from losses.difftopk import anchor_ot
from losses.difftopk.semidual import plan_backward, plan_of_potentials, solve_semi_dual, solve_systems

COMPILED = True  # CPU tensors: the fused per-batch kernels of losses.difftopk.anchor_ot (tests switch it off)
STAGE_FACTOR = 8.0  # ε-scaling: ε divided by this per stage
STAGE_TOLERANCE = 1e-2  # anchor-marginal tolerance of the intermediate stages


class SinkhornNotConverged(RuntimeError):
    """The entropic OT solve did not reach its tolerance within its iteration budget."""


def _semi_dual(g: torch.Tensor, neg_c: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, ...]:
    """(value, σ = softmax over anchors [B, n, r], anchor marginal c [B, r]) of the semi-dual at g [B, r]."""
    logits = neg_c + g.unsqueeze(1) / eps
    lse = torch.logsumexp(logits, dim=2)  # [B, n]
    sigma = torch.exp(logits - lse.unsqueeze(2))
    value = (b * g).sum(1) - eps * lse.mean(1)
    return value, sigma, sigma.mean(1)


def _newton_stage(cost: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float, tol: float,
                  budget: int, step_cap: float) -> tuple[torch.Tensor, float, int]:
    """Steps at one ε until every anchor marginal is within tol. Returns (g, error, steps).

    A step is a Sinkhorn update of the anchor potentials, g += ε·log(b/c) (monotone ascent of the
    semi-dual; fast when the anchors are weakly coupled, i.e. small ε), then a damped Newton
    (Levenberg–Marquardt) step from there, (M + μ·diag c)·Δ = ε(b − c), kept per sample where it raises
    the semi-dual (μ ÷ 4 then) and retried with μ × 16 where it does not (up to 4 tries). The damping
    matters when groups of anchors are nearly decoupled (small ε): the plain Newton step along that
    near-null direction of the Hessian overshoots by orders of magnitude.
    """
    n = cost.shape[1]
    neg_c = cost / -eps
    log_b = b.log()
    value, sigma, c = _semi_dual(g, neg_c, b, eps)
    error, steps = float(((c - b).abs() / b).amax()), 0
    mu = torch.full_like(value, 1e-6)
    while error > tol and steps < budget:
        steps += 1
        g = g + eps * (log_b - c.clamp_min(1e-300).log())  # Sinkhorn half-step on the anchors
        value, sigma, c = _semi_dual(g, neg_c, b, eps)
        grad = b - c  # ascent direction of the semi-dual
        # −ε × Hessian = diag(c) − σᵀσ/n, a graph Laplacian (kernel = 1): built from its off-diagonal
        # weights (diagonal = their row sums), which avoids cancelling c_j against Σσ²/n at small ε
        weights = sigma.transpose(1, 2) @ sigma / n
        weights.diagonal(dim1=1, dim2=2).zero_()
        hess = torch.diag_embed(weights.sum(2)) - weights
        todo = torch.ones_like(value, dtype=torch.bool)
        for _ in range(4):
            damped = hess + torch.diag_embed(mu.unsqueeze(1) * c.clamp_min(1e-300))
            delta, info = torch.linalg.solve_ex(damped, eps * grad)
            delta = torch.where((info == 0).unsqueeze(1), delta, 0.0).nan_to_num(0.0, 0.0, 0.0)
            size = delta.abs().amax(1, keepdim=True)
            delta = delta * (step_cap / size.clamp_min(step_cap))
            trial, t_sigma, t_c = _semi_dual(g + delta, neg_c, b, eps)
            # near the optimum the semi-dual moves by less than its rounding: then the marginals decide
            flat = trial >= value - 1e-14 * value.abs().clamp_min(1.0)
            closer = ((t_c - b).abs() / b).amax(1) < ((c - b).abs() / b).amax(1)
            better = todo & ((trial > value) | (flat & closer))
            g = torch.where(better.unsqueeze(1), g + delta, g)
            value = torch.where(better, trial, value)
            sigma = torch.where(better.view(-1, 1, 1), t_sigma, sigma)
            c = torch.where(better.unsqueeze(1), t_c, c)
            mu = torch.where(better, (mu / 4).clamp_min(1e-12), torch.where(todo, mu * 16, mu))
            todo = todo & ~better
            if not bool(todo.any()):
                break
        error = float(((c - b).abs() / b).amax())
    return g, error, steps


class _EntropicPlan(torch.autograd.Function):
    """C [B, n, r] -> the entropic plan π [B, n, r] between n classes of mass 1/n and anchors of mass b."""

    @staticmethod
    def forward(ctx, cost, log_b, eps: float, iterations: int, tolerance: float, init):  # type: ignore[override]
        c64 = cost.detach().double()
        b = log_b.detach().double().exp().reshape(1, -1)
        b = (b / b.sum()).expand(c64.shape[0], -1)  # masses given in float32 sum to 1 ± 1e−7 only
        cost_range = max(float(c64.amax() - c64.amin()), 1e-12)
        g = c64.new_zeros(c64.shape[0], c64.shape[2])
        stages = [eps]
        if init is not None and c64.device.type == "cpu":  # the compiled solver picks it or 0 per sample
            g = init.detach().double().clone()
        elif init is not None:  # start from the better (per sample) of 0 and the given potentials
            g0 = init.detach().double()
            better = _semi_dual(g0, c64 / -eps, b, eps)[0] > _semi_dual(g, c64 / -eps, b, eps)[0]
            g = torch.where(better.unsqueeze(1), g0, g)
        else:
            while stages[-1] * STAGE_FACTOR < cost_range:
                stages.append(stages[-1] * STAGE_FACTOR)
        order = list(reversed(stages))
        tols = [tolerance if e == eps else max(tolerance, STAGE_TOLERANCE) for e in order]
        if c64.device.type == "cpu":  # compiled, every sample to its own tolerance
            g_np, errors, _steps = solve_semi_dual(c64.numpy(), b[0].numpy(), order, tols, g.numpy(), iterations,
                                                   2 * cost_range)
            g, error = torch.from_numpy(g_np), float(errors.max())
        else:
            used, error = 0, math.inf
            for e, tol in zip(order, tols):
                g, error, steps = _newton_stage(c64, g, b, e, tol, iterations - used, 2 * cost_range)
                used += steps
        if error > tolerance:
            raise SinkhornNotConverged(
                f"entropic OT (n={c64.shape[1]}, anchors={c64.shape[2]}, eps={eps:g}) not converged in "
                f"{iterations} Newton steps: anchor marginals off by {error:.2g} > tolerance {tolerance:g}")
        if c64.device.type == "cpu":  # one compiled pass instead of a dozen small torch operations
            plan_t = torch.from_numpy(plan_of_potentials(c64.numpy(), g.numpy(), eps))
        else:
            # anchors-major [B, r, n] layout: reductions over the few anchors along a short innermost
            # dimension are several times slower in torch than along a middle one
            logits = (c64.transpose(1, 2) / -eps + g.unsqueeze(2) / eps).contiguous()
            plan_t = torch.softmax(logits, dim=1) / c64.shape[1]  # [B, r, n]
        ctx.save_for_backward(plan_t)
        ctx.eps = eps
        return plan_t.to(cost.dtype).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_plan):  # type: ignore[override]
        (pi,) = ctx.saved_tensors  # [B, r, n]
        if pi.device.type == "cpu":  # compiled per sample; singular systems redone below with the guard
            grad64, ok = plan_backward(grad_plan.detach().double().numpy(), pi.numpy(), ctx.eps, MAX_AMPLIFICATION)
            grad_cost = torch.from_numpy(grad64)
            bad = torch.from_numpy(~ok) | ~torch.isfinite(grad_cost).all(2).all(1)
            if bool(bad.any()):
                grad_cost[bad] = _plan_backward_torch(pi[bad], grad_plan[bad], ctx.eps)
            return grad_cost.to(grad_plan.dtype), None, None, None, None, None
        return _plan_backward_torch(pi, grad_plan, ctx.eps).to(grad_plan.dtype), None, None, None, None, None


def _plan_backward_torch(pi: torch.Tensor, grad_plan: torch.Tensor, eps: float) -> torch.Tensor:
    """dL/dC [B, n, r] (float64) from dL/dπ [B, n, r] at the plan pi [B, r, n] (batched torch)."""
    a = 1.0 / pi.shape[2]
    weighted = grad_plan.double().transpose(1, 2) * pi / eps  # [B, r, n]
    row, col = weighted.sum(1), weighted.sum(2)  # [B, n], [B, r]
    schur = _schur_laplacian(pi, a)  # [B, r, r]
    rhs = col - (pi @ (row / a).unsqueeze(2)).squeeze(2)
    w = torch.zeros_like(col)
    w[:, :-1] = _solve_guarded(schur[:, :-1, :-1], rhs[:, :-1])
    u = (row - (w.unsqueeze(1) @ pi).squeeze(1)) / a
    grad_cost = pi * (u.unsqueeze(1) + w.unsqueeze(2)) - weighted
    return grad_cost.transpose(1, 2)


def _schur_laplacian(pi: torch.Tensor, a: float) -> torch.Tensor:
    """diag(b) − ππᵀ/a for a plan pi [B, r, n] (row masses a, anchor masses b), [B, r, r].

    Built as the graph Laplacian of its off-diagonal weights W_jl = Σ_i π_ji·π_li/a (diagonal = their
    row sums, since Σ_l π_li = a): the direct form cancels b_j against Σ_i π_ji²/a and, for a nearly hard
    plan (anchors almost decoupled), returns 0 or a negative number where the true value is tiny and
    positive, which made the backward NaN in training.
    """
    weights = pi @ pi.transpose(1, 2) / a
    weights.diagonal(dim1=1, dim2=2).zero_()
    return torch.diag_embed(weights.sum(2)) - weights


MAX_AMPLIFICATION = 1e12  # ‖x‖·‖S‖/‖rhs‖ beyond this: the system is numerically singular in float64


def _solve_guarded(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched solve of the small Schur systems.

    Anchors whose couplings underflowed (a nearly hard plan at a large inverse temperature) make a
    system singular in float64: its solution along them is rounding noise divided by ~0, and the
    backward then cancels huge terms into NaN. Such systems — non-finite, or amplifying the right-hand
    side by more than ``MAX_AMPLIFICATION`` — are solved by the pseudo-inverse (rtol 1e−12) instead,
    which zeroes those directions: the plan's derivative along them is below float64 resolution.
    """
    if matrix.device.type == "cpu":  # many tiny systems: compiled elimination beats batched LAPACK calls
        x = torch.from_numpy(solve_systems(matrix.numpy(), rhs.numpy()))
    else:
        x, info = torch.linalg.solve_ex(matrix, rhs)
        x = torch.where((info == 0).unsqueeze(1), x, float("nan"))
    size = matrix.abs().amax((1, 2)) * x.abs().amax(1)
    bad = ~torch.isfinite(x).all(1) | (size > MAX_AMPLIFICATION * rhs.abs().amax(1).clamp_min(1e-300))
    if bool(bad.any()):
        pinv = torch.linalg.pinv(matrix[bad], rtol=1e-12, hermitian=True)
        x[bad] = (pinv @ rhs[bad].unsqueeze(2)).squeeze(2)
    return x


def entropic_plan(cost: torch.Tensor, log_b: torch.Tensor, eps: float, iterations: int = 100,
                  tolerance: float = 1e-6, init: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_{π ∈ U(1/n, b)} ⟨C, π⟩ − ε H(π) for cost [B, n, r] and anchor log-masses log_b [r] (Σ b = 1).

    ``init``: starting anchor potentials [B, r] (e.g. ``hard_potentials``); without it, ε-scaling from
    the cost range down to ε.
    """
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return _EntropicPlan.apply(cost, log_b.reshape(-1), float(eps), int(iterations), float(tolerance), init)


class _FusedPlan(torch.autograd.Function):
    """Scores s [B, n] -> the plan n·π [B, n, r] onto 1-D anchors, forward and backward one compiled call each."""

    @staticmethod
    def forward(ctx, s, mode: int, anchors: tuple, counts: tuple, eps: float, iterations: int,  # type: ignore[override]
                tolerance: float):
        s64 = s.detach().double().contiguous().numpy()
        a = np.asarray(anchors, dtype=np.float64)
        tiny = float(torch.finfo(s.dtype).tiny)
        plan, points, kappas, _g, errors, _steps = anchor_ot.fused_forward(
            s64, mode, a, np.asarray(counts), eps, tolerance, iterations, tiny)
        error = float(errors.max()) if len(errors) else 0.0
        if error > tolerance:
            raise SinkhornNotConverged(
                f"entropic OT (n={s64.shape[1]}, anchors={len(anchors)}, eps={eps:g}) not converged in "
                f"{iterations} Newton steps: anchor marginals off by {error:.2g} > tolerance {tolerance:g}")
        ctx.state = (s64, plan, points, kappas, mode, a, eps, tiny)
        return torch.from_numpy(plan).to(s.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_plan):  # type: ignore[override]
        s64, plan, points, kappas, mode, a, eps, tiny = ctx.state
        grad = anchor_ot.fused_backward(grad_plan.detach().double().contiguous().numpy(), plan, s64, points, kappas,
                                        mode, a, eps, tiny, MAX_AMPLIFICATION)
        return torch.from_numpy(grad).to(grad_plan.dtype), None, None, None, None, None, None


def fused_plan(s: torch.Tensor, mode: int, anchors: list[float], counts: list[int], eps: float, iterations: int,
               tolerance: float) -> torch.Tensor:
    """n·π [B, n, r] for CPU scores s [B, n] (``anchor_ot``'s modes: soft_topk's normalised cost or the squashed
    points of Sinkhorn sort), anchors taking ``counts`` points each in the ε → 0 limit."""
    return _FusedPlan.apply(s, mode, tuple(float(v) for v in anchors), tuple(int(c) for c in counts), float(eps),
                            int(iterations), float(tolerance))


def hard_potentials(x: torch.Tensor, anchors: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Anchor potentials [B, r] of the unregularised 1-D OT with squared cost (the ε → 0 limit).

    Points x [B, n] of mass 1/n fill the ascending anchors in order (cumulative masses b); the boundary
    between anchors j and j+1 is put midway between the last point of j and the first of j+1, and the
    potentials make those boundaries indifferent: g_{j+1} − g_j = −(a_{j+1} − a_j)(2x_b − a_j − a_{j+1}).
    """
    n = x.shape[1]
    if x.device.type == "cpu":  # numpy's vectorised sort: several times faster than torch's on the CPU
        xs = torch.from_numpy(np.sort(x.detach().numpy(), axis=1))
    else:
        xs = x.detach().sort(dim=1).values
    cut = (b.detach().cumsum(0)[:-1] * n).clamp(1, n - 1)  # points before each boundary
    lo = xs[:, (cut.ceil() - 1).long()]
    hi = xs[:, cut.floor().long()]
    boundary = 0.5 * (lo + hi)  # [B, r−1]
    a = anchors.detach()  # [r] or [B, r]
    steps = -(a[..., 1:] - a[..., :-1]) * (2 * boundary - a[..., :-1] - a[..., 1:])
    return torch.cat([torch.zeros_like(steps[:, :1]), steps.cumsum(1)], 1)


def sinkhorn_topk(s: torch.Tensor, k: int, inverse_temperature: float, iterations: int = 100,
                  tolerance: float = 1e-6) -> torch.Tensor:
    """Top-K rows of the Sinkhorn-relaxed permutation, ``[B, K, n]`` (ascending ranks n−K..n−1)."""
    batch, n = s.shape
    dt, dev = s.dtype, s.device
    if COMPILED and dev.type == "cpu":
        full = k >= n - 1
        anchors = list(range(n)) if full else [(n - k - 1) / 2] + list(range(n - k, n))
        counts = [1] * n if full else [n - k] + [1] * k
        plan = fused_plan(s, anchor_ot.SQUASHED, anchors, counts, 1 / inverse_temperature, iterations, tolerance)
        return plan[..., n - k if full else 1:].transpose(1, 2)
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
    init = hard_potentials(z, anchors, log_b.exp())
    plan = entropic_plan(cost, log_b, 1 / inverse_temperature, iterations, tolerance, init)
    return (plan * n)[..., first:].transpose(1, 2)
