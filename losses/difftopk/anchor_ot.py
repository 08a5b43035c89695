"""Entropic OT of scores onto 1-D anchors, fused per batch on the CPU (numba): ``soft_topk`` and Sinkhorn sort.

One compiled call does the whole forward of a batch — the points and the cost from the scores, the
ε → 0 start, the semi-dual solve, the plan — and one the whole backward — the implicit gradient
(``losses.difftopk.sinkhorn``) and its chain back to the scores. The solver is the one of
``losses.difftopk.semidual`` (a Sinkhorn update of the anchor potentials, then a damped Newton step
kept when it raises the semi-dual; every row to its own tolerance), except that after an undamped
Newton step (the quadratic phase) the next step is Newton alone; what changes most is the cost of an
evaluation. The rows' logits are (g_j − C_ij)/ε; they are exponentiated once at a reference g⁰,
K_ij = exp((g⁰_j − C_ij)/ε − max_j), and an evaluation at g = g⁰ + Δ takes r exps, exp(Δ_j/ε − max Δ/ε),
and n·r products instead of n·r exps. The reference moves to g when max − min of Δ/ε exceeds
``SPREAD`` (every row's largest product then stays above e^−SPREAD, so nothing underflows), and
entries of K below e^−``FLUSH`` are stored as 0: they add less than e^−(FLUSH−SPREAD) to a row sum.
The plan returned is σ of the last evaluation (at the final potentials). The start: the ε → 0 potentials,
or 0 where that is higher and within the kernel's reach (spread ≤ ``SPREAD``; a wider start is the sharp
regime, where the ε → 0 potentials are the right start).

Points and costs (``mode``), in float64 from the scores s [B, n]:
* ``NORMALISED`` (``soft_topk``): x = s, C_ij = (x_i − a_j)²/S with S = max_ij (x_i − a_j)² (at least
  ``tiny``); the gradient flows through S to its maximisers (split evenly among ties, as ``torch.amax``).
* ``SQUASHED`` (Sinkhorn sort): x = (n−1)·sigmoid((s − mean)/(std + 1e−8)) (std unbiased), C = (x − a)²;
  a row of equal scores gets no gradient through its std (torch's would be 0/0).
Anchor masses are counts/n (the points each anchor takes in the ε → 0 limit).
"""
from __future__ import annotations

import math

import numpy as np

# the same plain functions as the semi-dual solver's (both modules compile them on first use)
from losses.difftopk import semidual
from losses.difftopk.semidual import _capped_trial, _error, _improves, _sinkhorn_update, _solve_small  # noqa: F401

NORMALISED, SQUASHED = 0, 1
SPREAD = 30.0  # max − min of (g − g⁰)/ε before the reference g⁰ moves
FLUSH = 100.0  # kernel entries below e^−FLUSH of their row's largest are stored as 0
STD_OFFSET = 1e-8

_FORWARD = _BACKWARD = None


def _points(s, mode, anchors, tiny, x):
    """Fills x (the points) from the scores s of one row; returns the cost factor κ (C = κ(x − a)²)."""
    n = s.shape[0]
    if mode == NORMALISED:
        top = 0.0
        for i in range(n):
            x[i] = s[i]
            for j in range(anchors.shape[0]):
                top = max(top, (s[i] - anchors[j]) ** 2)
        return 1.0 / max(top, tiny)
    mean, std = _mean_std(s)
    for i in range(n):
        x[i] = (n - 1) / (1.0 + math.exp(-(s[i] - mean) / (std + STD_OFFSET)))
    return 1.0


def _hard_start(x, anchors, counts, kappa, largest, g):
    """Anchor potentials of the ε → 0 problem: the sorted points fill the ascending anchors (counts each),
    each boundary midway between neighbours, g_{j+1} − g_j = −κ(a_{j+1} − a_j)(2x_b − a_j − a_{j+1}).
    Only the points above the first boundary are ordered (``largest``: a descending insertion buffer)."""
    n = x.shape[0]
    need = n - counts[0] + 1
    filled = 0
    for i in range(n):
        v = x[i]
        if filled == need and not v > largest[need - 1]:
            continue
        pos = filled if filled < need else need - 1
        filled = min(filled + 1, need)
        while pos > 0 and largest[pos - 1] < v:
            largest[pos] = largest[pos - 1]
            pos -= 1
        largest[pos] = v
    g[0] = 0.0
    cut = 0
    for j in range(anchors.shape[0] - 1):
        cut += counts[j]  # points at or below the boundary; largest[n − cut] is the first point above it
        boundary = 0.5 * (largest[n - cut] + largest[n - cut - 1])
        g[j + 1] = g[j] - kappa * (anchors[j + 1] - anchors[j]) * (2 * boundary - anchors[j] - anchors[j + 1])


def _rebase(logit, g, eps, flush, ref, kern, top):
    """The reference moves to g: kern[j, i] = exp(L_ji − top_i) (0 below e^−flush) for the logits
    L_ji = g_j/ε + logit[j, i] (logit = −C/ε, anchors-major), top_i = max_j L_ji; returns Σ_i top_i."""
    r, n = logit.shape
    for j in range(r):
        ref[j] = g[j]
    for i in range(n):
        top[i] = -math.inf
    for j in range(r):
        shift = g[j] / eps
        for i in range(n):
            top[i] = max(top[i], logit[j, i] + shift)
    for j in range(r):
        shift = g[j] / eps
        for i in range(n):
            t = logit[j, i] + shift - top[i]
            kern[j, i] = math.exp(t) if t > -flush else 0.0
    total = 0.0
    for i in range(n):
        total += top[i]
    return total


def _evaluate(logit, g, b, eps, ref, kern, top, scaled, total, sigma, c):
    """Semi-dual value at g; fills sigma [r, n] (softmax over the anchors, anchors-major) and c (anchor
    marginals). top[n] holds Σ_i top_i (see ``_rebase``)."""
    r, n = logit.shape
    lo, hi = math.inf, -math.inf
    for j in range(r):
        d = (g[j] - ref[j]) / eps
        lo, hi = min(lo, d), max(hi, d)
    if hi - lo > SPREAD:
        top[n] = _rebase(logit, g, eps, FLUSH, ref, kern, top)
        lo, hi = 0.0, 0.0
    value = 0.0
    for j in range(r):
        scaled[j] = math.exp((g[j] - ref[j]) / eps - hi)
        value += b[j] * g[j]
    for i in range(n):
        total[i] = 0.0
    for j in range(r):
        f = scaled[j]
        for i in range(n):
            v = kern[j, i] * f
            sigma[j, i] = v
            total[i] += v
    for i in range(n):
        total[i] = 1.0 / total[i]
    for j in range(r):
        acc = 0.0
        for i in range(n):
            v = sigma[j, i] * total[i]
            sigma[j, i] = v
            acc += v
        c[j] = acc / n
    logs, product = 0.0, 1.0
    for i in range(n):  # 1/total is in [1/r, e^SPREAD]: one log per 16 rows, not one per row
        product *= total[i]
        if i % 16 == 15:
            logs += math.log(product)
            product = 1.0
    return value - eps * (top[n] - logs - math.log(product) + n * hi) / n


def _solve_row(logit, b, log_b, eps, tol, budget, step_cap, g, work, hess, damped):
    """Semi-dual ascent from g (or 0, where 0 is higher) to tolerance; returns (error, steps); σ in work[5]."""
    r, n = logit.shape
    ref, kern, top, scaled, total, sigma, c, t_sigma, t_c, rhs, delta, trial_g = work
    top[n] = _rebase(logit, g, eps, FLUSH, ref, kern, top)
    value = _evaluate(logit, g, b, eps, ref, kern, top, scaled, total, sigma, c)
    lo, hi = math.inf, -math.inf
    for j in range(r):
        lo, hi = min(lo, g[j] / eps), max(hi, g[j] / eps)
    if hi - lo <= SPREAD:  # 0 is within reach of this kernel: start from it where it is higher
        trial_g[:] = 0.0
        zero_value = _evaluate(logit, trial_g, b, eps, ref, kern, top, scaled, total, t_sigma, t_c)
        if zero_value >= value:
            value = zero_value
            g[:] = 0.0
            sigma[:, :] = t_sigma
            c[:] = t_c
    steps = 0
    err = _error(c, b)
    mu = 1e-6
    newton = False  # the last Newton step was taken undamped: the next needs no Sinkhorn update first
    while err > tol and steps < budget:
        steps += 1
        if not newton:
            _sinkhorn_update(g, log_b, c, eps)
            value = _evaluate(logit, g, b, eps, ref, kern, top, scaled, total, sigma, c)
        newton = False
        for j in range(r):  # −ε·n × Hessian: the graph Laplacian of σσᵀ's off-diagonal weights
            hess[j, j] = 0.0
        for j in range(r):
            for k in range(j + 1, r):
                acc = 0.0
                for i in range(n):
                    acc += sigma[j, i] * sigma[k, i]
                hess[j, k] = -acc
                hess[k, j] = -acc
                hess[j, j] += acc
                hess[k, k] += acc
        for _tries in range(4):
            for j in range(r):
                for k in range(r):
                    damped[j, k] = hess[j, k] / n
                damped[j, j] += mu * max(c[j], 1e-300)
                rhs[j] = eps * (b[j] - c[j])
            if not _solve_small(damped, rhs, delta):
                mu *= 16
                continue
            shrink = _capped_trial(g, delta, step_cap, trial_g)
            trial = _evaluate(logit, trial_g, b, eps, ref, kern, top, scaled, total, t_sigma, t_c)
            if _improves(trial, value, t_c, c, b):
                g[:] = trial_g
                c[:] = t_c
                sigma[:, :] = t_sigma
                value = trial
                newton = mu <= 1e-6 and shrink == 1.0
                mu = max(mu / 4, 1e-12)
                break
            mu *= 16
        err = _error(c, b)
    return err, steps


def _forward_rows(s, mode, anchors, counts, eps, tol, budget, tiny, plan, points, kappas, pots, errors, used):
    """Per row of s [B, n]: points, cost, ε → 0 start, solve, and the plan (rows sum to 1) at the result."""
    batch, n = s.shape
    r = anchors.shape[0]
    b = np.empty(r)
    for j in range(r):
        b[j] = counts[j] / n
    log_b = np.log(b)
    work = (np.empty(r), np.empty((r, n)), np.empty(n + 1), np.empty(r), np.empty(n), np.empty((r, n)),
            np.empty(r), np.empty((r, n)), np.empty(r), np.empty(r), np.empty(r), np.empty(r))
    hess = np.empty((r, r))
    damped = np.empty((r, r))
    logit = np.empty((r, n))
    g = np.empty(r)
    largest = np.empty(n - counts[0] + 1)
    for row in range(batch):
        x = points[row]
        kappa = _points(s[row], mode, anchors, tiny, x)
        lo, hi = math.inf, -math.inf
        for j in range(r):
            for i in range(n):
                cost = kappa * (x[i] - anchors[j]) ** 2
                lo, hi = min(lo, cost), max(hi, cost)
                logit[j, i] = cost / -eps
        _hard_start(x, anchors, counts, kappa, largest, g)
        errors[row], used[row] = _solve_row(logit, b, log_b, eps, tol, budget, 2 * max(hi - lo, 1e-12), g, work,
                                            hess, damped)
        sigma = work[5]  # σ at the final potentials
        for i in range(n):
            for j in range(r):
                plan[row, i, j] = sigma[j, i]
        kappas[row] = kappa
        pots[row, :] = g


def _backward_rows(grad, plan, s, points, kappas, mode, anchors, eps, tiny, max_amplification, out):
    """dL/ds [B, n] from dL/dP [B, n, r] for the plan P = n·π (rows sum to 1): the implicit gradient of
    ``losses.difftopk.sinkhorn`` and the chain through the cost to the scores.

    Written in the rows' pairwise couplings P_ij·P_il, with Σ_l P_il = 1 used to cancel analytically what
    the direct form cancels in floating point: the Schur complement is the graph Laplacian of the weights
    Σ_i P_ij P_il / n, its right-hand side rhs_j = Σ_i Σ_l P_ij P_il (G_ij − G_il)/ε, and
    dL/dC_ij = P_ij Σ_l P_il (h_il − h_ij) with h_il = G_il/ε − w_l/n (term by term where P_ij > 1/2, else
    as the P-weighted mean of h_i minus h_ij). On a nearly hard plan (couplings of 1e−28)
    the direct form's right-hand side is rounding noise that the tiny Schur system then amplifies. One
    potential is pinned; a singular or amplifying system goes through the pseudo-inverse (rtol 1e−12)."""
    batch, n, r = grad.shape
    schur = np.empty((r - 1, r - 1))
    full = np.empty((r, r))
    rhs_full = np.empty(r)
    w = np.zeros(r)
    d_cost = np.empty((n, r))
    d_x = np.empty(n)
    h = np.empty(r)
    inv_eps, inv_n = 1.0 / eps, 1.0 / n
    for row in range(batch):
        p = plan[row]
        gr = grad[row]
        full[:, :] = 0.0
        rhs_full[:] = 0.0
        for i in range(n):
            for j in range(r):
                for q in range(j + 1, r):
                    coupling = p[i, j] * p[i, q]
                    full[j, q] += coupling
                    t = coupling * (gr[i, j] - gr[i, q])
                    rhs_full[j] += t
                    rhs_full[q] -= t
        for j in range(r):
            for q in range(j + 1, r):
                weight = full[j, q] / n
                full[j, q] = -weight
                full[q, j] = -weight
                full[j, j] += weight
                full[q, q] += weight
        size, scale = 0.0, 0.0
        rhs = rhs_full[:r - 1] / eps
        for j in range(r - 1):
            scale = max(scale, abs(rhs[j]))
            for q in range(r - 1):
                schur[j, q] = full[j, q]
                size = max(size, abs(full[j, q]))
        ok = _solve_small(schur.copy(), rhs.copy(), w[:r - 1])
        largest = 0.0
        for j in range(r - 1):
            largest = max(largest, abs(w[j]))
        if not ok or not size * largest <= max_amplification * max(scale, 1e-300):
            w[:r - 1] = np.linalg.pinv(schur, 1e-12) @ rhs  # zeroes the directions below float64 resolution
        w[r - 1] = 0.0
        for i in range(n):
            mean = 0.0
            for q in range(r):
                h[q] = gr[i, q] * inv_eps - w[q] * inv_n
                mean += p[i, q] * h[q]
            for j in range(r):
                if p[i, j] > 0.5:  # Σ_q P_iq (h_q − h_j) term by term: mean − h_j would cancel to noise
                    acc = 0.0
                    for q in range(r):
                        acc += p[i, q] * (h[q] - h[j])
                else:
                    acc = mean - h[j]
                d_cost[i, j] = p[i, j] * acc
        x = points[row]
        kappa = kappas[row]
        d_kappa = 0.0
        for i in range(n):
            acc = 0.0
            for j in range(r):
                diff = x[i] - anchors[j]
                acc += d_cost[i, j] * 2 * kappa * diff
                d_kappa += d_cost[i, j] * diff * diff
            d_x[i] = acc
        if mode == NORMALISED:
            top = _largest(x, anchors)  # S; κ = 1/max(S, tiny) takes no gradient where S was clamped
            if top >= tiny:
                ties = 0
                for i in range(n):
                    for j in range(r):
                        ties += (x[i] - anchors[j]) ** 2 == top
                d_top = -d_kappa / (top * top) / max(ties, 1)  # split among the maximisers, as torch.amax
                for i in range(n):
                    for j in range(r):
                        if (x[i] - anchors[j]) ** 2 == top:
                            d_x[i] += d_top * 2 * (x[i] - anchors[j])
            out[row, :] = d_x
        else:
            _squash_backward(s[row], x, d_x, out[row])


def _largest(x, anchors):
    top = 0.0
    for i in range(x.shape[0]):
        for j in range(anchors.shape[0]):
            top = max(top, (x[i] - anchors[j]) ** 2)
    return top


def _mean_std(s):
    """Mean and unbiased standard deviation (1 for a single score) of a row."""
    n = s.shape[0]
    mean = 0.0
    for i in range(n):
        mean += s[i]
    mean /= n
    var = 0.0
    for i in range(n):
        var += (s[i] - mean) ** 2
    return mean, (math.sqrt(var / (n - 1)) if n > 1 else 1.0)


def _squash_backward(s, x, d_x, out):
    """dL/ds from dL/dx for x = (n−1)·sigmoid((s − mean)/(std + δ)) (std unbiased)."""
    n = s.shape[0]
    mean, std = _mean_std(s)
    denom = std + STD_OFFSET
    d_mean, d_spread = 0.0, 0.0
    for i in range(n):
        sig = x[i] / (n - 1)
        d_u = d_x[i] * (n - 1) * sig * (1 - sig)
        out[i] = d_u / denom
        d_mean += d_u
        d_spread += d_u * (s[i] - mean)
    d_mean /= n * denom
    through_std = d_spread / (denom * denom * (n - 1) * std) if n > 1 and std > 0 else 0.0
    for i in range(n):
        out[i] -= d_mean + through_std * (s[i] - mean)


def _compile() -> None:
    global _FORWARD, _BACKWARD
    if _FORWARD is None:
        import numba

        semidual._compile()  # _improves calls _error from its own module: compiled there first
        jit = numba.njit(cache=True, nogil=True, error_model="numpy")
        for name in ("_mean_std", "_points", "_hard_start", "_rebase", "_evaluate", "_error", "_sinkhorn_update",
                     "_capped_trial", "_improves", "_solve_small", "_solve_row", "_largest", "_squash_backward"):
            function = globals()[name]
            globals()[name] = jit(getattr(function, "py_func", function))  # semidual may have compiled its own
        _FORWARD = jit(_forward_rows)
        _BACKWARD = jit(_backward_rows)


def fused_forward(s: np.ndarray, mode: int, anchors: np.ndarray, counts: np.ndarray, eps: float, tolerance: float,
                  iterations: int, tiny: float) -> tuple[np.ndarray, ...]:
    """(plan [B, n, r] rows summing to 1, points [B, n], κ [B], potentials [B, r], error [B], steps [B]) for
    float64 scores s [B, n], anchors [r] (ascending) taking counts [r] points each (Σ = n)."""
    _compile()
    batch, n = s.shape
    r = anchors.shape[0]
    plan = np.empty((batch, n, r))
    points = np.empty((batch, n))
    kappas = np.empty(batch)
    pots = np.empty((batch, r))
    errors = np.empty(batch)
    used = np.empty(batch, dtype=np.int64)
    _FORWARD(np.ascontiguousarray(s, dtype=np.float64), mode, np.ascontiguousarray(anchors, dtype=np.float64),
             np.ascontiguousarray(counts, dtype=np.int64), float(eps), float(tolerance), int(iterations), float(tiny),
             plan, points, kappas, pots, errors, used)
    return plan, points, kappas, pots, errors, used


def fused_backward(grad: np.ndarray, plan: np.ndarray, s: np.ndarray, points: np.ndarray, kappas: np.ndarray,
                   mode: int, anchors: np.ndarray, eps: float, tiny: float, max_amplification: float) -> np.ndarray:
    """dL/ds [B, n] (float64) for dL/dP grad [B, n, r] at the plan of ``fused_forward``."""
    _compile()
    out = np.empty(s.shape)
    _BACKWARD(np.ascontiguousarray(grad, dtype=np.float64), plan, s, points, kappas, mode,
              np.ascontiguousarray(anchors, dtype=np.float64), float(eps), float(tiny), float(max_amplification), out)
    return out
