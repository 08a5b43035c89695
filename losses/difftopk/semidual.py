"""The semi-dual entropic OT solver of ``losses.difftopk.sinkhorn`` compiled per sample (numba, CPU).

Same steps as the torch version (``_newton_stage``): a Sinkhorn update of the anchor potentials, then
a Levenberg–Marquardt step on the semi-dual kept when it raises it (or, within its rounding, brings
the marginals closer), μ ÷ 4 on success and × 16 on failure. Here every sample runs to its own
tolerance (the batch does not wait for its slowest member) and a step costs O(n·r + r³) flops with no
per-operation overhead, which is what the small problems of top-m preselection need. The r × r
systems are solved by Gaussian elimination with partial pivoting (a singular system: no Newton step).
"""
from __future__ import annotations

import math

import numpy as np

_KERNEL = None


def _semi_dual(cost, g, b, eps, sigma, c):
    """Fills sigma [n, r] and c [r]; returns the semi-dual value at g."""
    n, r = cost.shape
    value = 0.0
    product, logs = 1.0, 0.0  # Σ_i log(total_i) = logs + log(product)
    for j in range(r):
        c[j] = 0.0
        value += b[j] * g[j]
    for i in range(n):
        top = -math.inf
        best = 0
        for j in range(r):
            sigma[i, j] = (g[j] - cost[i, j]) / eps
            if sigma[i, j] > top:
                top, best = sigma[i, j], j
        total = 0.0
        for j in range(r):  # exp(top − top) = 1 exactly: one exp fewer per class
            sigma[i, j] = math.exp(sigma[i, j] - top) if j != best else 1.0
            total += sigma[i, j]
        for j in range(r):
            sigma[i, j] /= total
            c[j] += sigma[i, j] / n
        value -= eps * top / n
        product *= total  # each total is in [1, r]: one log per row of the product, not one per class
        if product > 1e250:
            logs += math.log(product)
            product = 1.0
    return value - eps * (logs + math.log(product)) / n


def _error(c, b):
    worst = 0.0
    for j in range(len(b)):
        worst = max(worst, abs(c[j] - b[j]) / b[j])
    return worst


def _sinkhorn_update(g, log_b, c, eps):
    """The anchors' Sinkhorn update g += ε·(log b − log c)."""
    for j in range(len(g)):
        g[j] += eps * (log_b[j] - math.log(max(c[j], 1e-300)))


def _capped_trial(g, delta, step_cap, trial_g):
    """trial_g = g + shrink·delta with the largest |step| capped at step_cap; returns shrink."""
    size = 0.0
    for j in range(len(delta)):
        size = max(size, abs(delta[j]))
    shrink = step_cap / size if size > step_cap else 1.0
    for j in range(len(delta)):
        trial_g[j] = g[j] + shrink * delta[j]
    return shrink


def _improves(trial, value, t_c, c, b):
    """Keep a trial step: it raises the semi-dual, or leaves it flat within rounding and brings the anchor
    marginals closer to b."""
    flat = trial >= value - 1e-14 * max(abs(value), 1.0)
    return trial > value or (flat and _error(t_c, b) < _error(c, b))


def _solve_small(a, rhs, out):
    """out = a⁻¹ rhs by Gaussian elimination with partial pivoting (a, rhs overwritten); False if singular."""
    r = len(rhs)
    for col in range(r):
        piv = col
        for row in range(col + 1, r):
            if abs(a[row, col]) > abs(a[piv, col]):
                piv = row
        if not abs(a[piv, col]) > 1e-300:
            return False
        if piv != col:
            for k in range(r):
                a[col, k], a[piv, k] = a[piv, k], a[col, k]
            rhs[col], rhs[piv] = rhs[piv], rhs[col]
        for row in range(col + 1, r):
            f = a[row, col] / a[col, col]
            for k in range(col, r):
                a[row, k] -= f * a[col, k]
            rhs[row] -= f * rhs[col]
    for row in range(r - 1, -1, -1):
        acc = rhs[row]
        for k in range(row + 1, r):
            acc -= a[row, k] * out[k]
        out[row] = acc / a[row, row]
    return True


def _solve_batch(cost, b, stages, stage_tols, g_all, budget, step_cap, errors, used):
    """Per sample: the stages (ε, tolerance) in order from g_all[s]; results into g_all, errors, used."""
    batch, n, r = cost.shape
    sigma = np.empty((n, r))
    t_sigma = np.empty((n, r))
    c = np.empty(r)
    t_c = np.empty(r)
    hess = np.empty((r, r))
    rhs = np.empty(r)
    delta = np.empty(r)
    trial_g = np.empty(r)
    log_b = np.log(b)
    zero = np.zeros(r)
    for s in range(batch):
        g = g_all[s]
        start_value = _semi_dual(cost[s], g, b, stages[0], sigma, c)
        zero_value = _semi_dual(cost[s], zero, b, stages[0], t_sigma, t_c)
        if zero_value >= start_value:  # the given start is worse than 0 at the first ε
            g[:] = 0.0
            sigma[:, :] = t_sigma
            c[:] = t_c
            start_value = zero_value
        steps = 0
        err = math.inf
        for stage in range(len(stages)):
            eps, tol = stages[stage], stage_tols[stage]
            if stage == 0:  # evaluated just above
                value = start_value
            else:
                value = _semi_dual(cost[s], g, b, eps, sigma, c)
            err = _error(c, b)
            mu = 1e-6
            while err > tol and steps < budget:
                steps += 1
                _sinkhorn_update(g, log_b, c, eps)
                value = _semi_dual(cost[s], g, b, eps, sigma, c)
                for _tries in range(4):
                    for j in range(r):  # graph Laplacian from off-diagonal weights, + μ·diag(c)
                        for k in range(r):
                            hess[j, k] = 0.0
                    for i in range(n):
                        for j in range(r):
                            for k in range(j + 1, r):
                                w = sigma[i, j] * sigma[i, k] / n
                                hess[j, k] -= w
                                hess[k, j] -= w
                                hess[j, j] += w
                                hess[k, k] += w
                    for j in range(r):
                        hess[j, j] += mu * max(c[j], 1e-300)
                        rhs[j] = eps * (b[j] - c[j])
                    if not _solve_small(hess, rhs, delta):
                        mu *= 16
                        continue
                    _capped_trial(g, delta, step_cap, trial_g)
                    trial = _semi_dual(cost[s], trial_g, b, eps, t_sigma, t_c)
                    if _improves(trial, value, t_c, c, b):
                        for j in range(r):
                            g[j] = trial_g[j]
                            c[j] = t_c[j]
                        sigma[:, :] = t_sigma
                        value = trial
                        mu = max(mu / 4, 1e-12)
                        break
                    mu *= 16
                err = _error(c, b)
        errors[s] = err
        used[s] = steps


def _plan_rows(cost, g, eps, plan):
    """plan[s, j, i] = softmax_j((g_j − cost[s, i, j])/ε)/n: the plan of the potentials g [B, r], [B, r, n]."""
    batch, n, r = cost.shape
    logits = np.empty(r)
    for s in range(batch):
        for i in range(n):
            top = -math.inf
            for j in range(r):
                logits[j] = cost[s, i, j] / -eps + g[s, j] / eps
                top = max(top, logits[j])
            total = 0.0
            for j in range(r):
                logits[j] = math.exp(logits[j] - top)
                total += logits[j]
            for j in range(r):
                plan[s, j, i] = logits[j] / total / n


def _plan_backward_rows(grad, pi, eps, max_amplification, out, ok):
    """dL/dC [B, n, r] from dL/dπ (grad [B, n, r]) at the plan pi [B, r, n] by implicit differentiation
    (see ``losses.difftopk.sinkhorn``): the Schur complement built as a graph Laplacian, one potential
    pinned; ok[s] = False where its system is singular or amplifies its right-hand side by more than
    max_amplification (the caller redoes those samples)."""
    batch, n, r = grad.shape
    a = 1.0 / n
    weighted = np.empty((r, n))
    row = np.empty(n)
    col = np.empty(r)
    schur = np.empty((r, r))
    rhs = np.empty(r)
    w = np.zeros(r)
    for s in range(batch):
        for i in range(n):
            row[i] = 0.0
        for j in range(r):
            col[j] = 0.0
            for i in range(n):
                v = grad[s, i, j] * pi[s, j, i] / eps
                weighted[j, i] = v
                row[i] += v
                col[j] += v
        for j in range(r):
            for q in range(r):
                schur[j, q] = 0.0
        for j in range(r):
            for q in range(j + 1, r):
                acc = 0.0
                for i in range(n):
                    acc += pi[s, j, i] * pi[s, q, i]
                acc /= a
                schur[j, q] = -acc
                schur[q, j] = -acc
                schur[j, j] += acc
                schur[q, q] += acc
        for j in range(r):
            acc = 0.0
            for i in range(n):
                acc += pi[s, j, i] * (row[i] / a)
            rhs[j] = col[j] - acc
        w[r - 1] = 0.0
        size, scale = 0.0, 0.0  # ‖S‖_max·‖w‖_max against ‖rhs‖_max: the guard of sinkhorn._solve_guarded
        for j in range(r - 1):
            scale = max(scale, abs(rhs[j]))
            for q in range(r - 1):
                size = max(size, abs(schur[j, q]))
        ok[s] = _solve_small(schur[:r - 1, :r - 1].copy(), rhs[:r - 1].copy(), w[:r - 1])
        top = 0.0
        for j in range(r - 1):
            top = max(top, abs(w[j]))
        if not ok[s] or not size * top <= max_amplification * max(scale, 1e-300):
            ok[s] = False  # singular or amplifying: the caller redoes it with the pseudo-inverse
            continue
        for i in range(n):
            acc = 0.0
            for j in range(r):
                acc += w[j] * pi[s, j, i]
            u = (row[i] - acc) / a
            for j in range(r):
                out[s, i, j] = pi[s, j, i] * (u + w[j]) - weighted[j, i]


def plan_of_potentials(cost: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """The entropic plan [B, r, n] (float64) of anchor potentials g [B, r] for cost [B, n, r] (compiled)."""
    _compile()
    plan = np.empty((cost.shape[0], cost.shape[2], cost.shape[1]))
    _PLAN(np.ascontiguousarray(cost), np.ascontiguousarray(g), float(eps), plan)
    return plan


def plan_backward(grad: np.ndarray, pi: np.ndarray, eps: float,
                  max_amplification: float) -> tuple[np.ndarray, np.ndarray]:
    """(dL/dC [B, n, r], ok [B]) for dL/dπ grad [B, n, r] (float64) at the plan pi [B, r, n] (compiled)."""
    _compile()
    out = np.zeros(grad.shape)
    ok = np.empty(grad.shape[0], dtype=np.bool_)
    _PLAN_BACKWARD(np.ascontiguousarray(grad), np.ascontiguousarray(pi), float(eps), float(max_amplification),
                   out, ok)
    return out, ok


def _solve_systems(a, rhs, out, ok):
    work = np.empty(a.shape[1:])
    vec = np.empty(rhs.shape[1])
    for s in range(a.shape[0]):
        work[:, :] = a[s]
        vec[:] = rhs[s]
        ok[s] = _solve_small(work, vec, out[s])


def solve_systems(a: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """x [B, m] with a[s] x[s] = rhs[s] (float64), NaN rows where a system is singular; batched small
    systems, where LAPACK's per-matrix overhead dominates torch.linalg.solve."""
    _compile()
    out = np.zeros(rhs.shape)
    ok = np.empty(rhs.shape[0], dtype=np.bool_)
    _SYSTEMS(np.ascontiguousarray(a), np.ascontiguousarray(rhs), out, ok)
    out[~ok] = np.nan
    return out


def _compile() -> None:
    global _KERNEL, _SYSTEMS, _PLAN, _PLAN_BACKWARD
    if _KERNEL is None:
        import numba

        jit = numba.njit(cache=True)
        for name in ("_semi_dual", "_error", "_sinkhorn_update", "_capped_trial", "_improves", "_solve_small"):
            globals()[name] = jit(globals()[name])
        _KERNEL = jit(_solve_batch)
        _SYSTEMS = jit(_solve_systems)
        _PLAN = jit(_plan_rows)
        _PLAN_BACKWARD = jit(_plan_backward_rows)


_SYSTEMS = _PLAN = _PLAN_BACKWARD = None


def solve_semi_dual(cost: np.ndarray, b: np.ndarray, stages: list[float], stage_tols: list[float],
                    g: np.ndarray, budget: int, step_cap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(g [B, r], error [B], steps [B]) for float64 cost [B, n, r], masses b [r], start g [B, r] (replaced by
    0 per sample where 0 is better at the first ε)."""
    _compile()
    g = np.ascontiguousarray(g, dtype=np.float64).copy()
    errors = np.empty(cost.shape[0])
    used = np.empty(cost.shape[0], dtype=np.int64)
    _KERNEL(np.ascontiguousarray(cost), np.ascontiguousarray(b), np.asarray(stages, dtype=np.float64),
            np.asarray(stage_tols, dtype=np.float64), g, budget, step_cap, errors, used)
    return g, errors, used
