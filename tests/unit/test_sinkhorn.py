"""Sinkhorn (difftopk sorter and soft_topk's solver): converged at every inverse temperature from 1/16 to 16,
against a 20,000-sweep float64 log-domain Sinkhorn with ε-scaling written here; failing loudly otherwise."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import harness
import losses  # noqa: F401
import losses.difftopk.sinkhorn as sinkhorn_module
from losses.difftopk.sinkhorn import SinkhornNotConverged, entropic_plan

INVERSE_TEMPERATURES = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16]


def reference_plan(cost: np.ndarray, b: np.ndarray, eps: float, sweeps: int = 20_000) -> tuple[np.ndarray, float]:
    """Log-domain Sinkhorn, float64, ε-scaling (ε halved from the cost range; 200 sweeps per stage) then
    the remaining sweeps at ε, stopping once both marginals hold to 1e−14."""
    n = cost.shape[0]
    log_a, log_b = np.full(n, -np.log(n)), np.log(b)
    f, g = np.zeros(n), np.zeros(len(b))
    stages = [eps]
    while stages[-1] * 2 < np.ptp(cost):
        stages.append(stages[-1] * 2)
    used = 0
    for e in reversed(stages):
        budget = 200 if e != eps else sweeps - used
        for _ in range(budget):
            f = e * (log_a - logsumexp((g[None] - cost) / e, axis=1))
            g = e * (log_b - logsumexp((f[:, None] - cost) / e, axis=0))
            used += 1
            if e == eps and used % 50 == 0:
                plan = np.exp((f[:, None] + g[None] - cost) / e)
                if np.abs(plan.sum(1) * n - 1).max() < 1e-14:
                    break
    plan = np.exp((f[:, None] + g[None] - cost) / eps)
    return plan, float(np.abs(plan.sum(1) * n - 1).max())  # the reference's own marginal error


def _reference_entropic_plan(cost, log_b, eps, iterations=0, tolerance=0.0, init=None):
    b = np.exp(log_b.detach().double().numpy().reshape(-1))
    b = b / b.sum()
    plans, errors = zip(*[reference_plan(c, b, eps) for c in cost.detach().double().numpy()])
    REFERENCE_ERROR.append(max(errors))
    return torch.tensor(np.stack(plans), dtype=cost.dtype)


REFERENCE_ERROR: list[float] = []


@pytest.mark.parametrize("inverse_temperature", INVERSE_TEMPERATURES)
def test_difftopk_sinkhorn_value_and_gradient_match_long_reference(inverse_temperature, monkeypatch):
    n = 24
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, n, dtype=torch.float64, generator=g) * 2).requires_grad_()
    y = torch.tensor([17])
    loss = harness.build_loss("difftopk", n, sorter="sinkhorn", p_k=[0.2] * 5, top1_mode="sort",
                              inverse_temperature=inverse_temperature)  # default iterations and tolerance
    value = loss(x, y)
    (grad,) = torch.autograd.grad(value, x)
    # gradient: central differences of the forward solved to 1e−12 (independent of the implicit backward)
    tight = harness.build_loss("difftopk", n, sorter="sinkhorn", p_k=[0.2] * 5, top1_mode="sort",
                               inverse_temperature=inverse_temperature, sinkhorn_tolerance=1e-12)
    for seed in (1, 2):
        v = torch.randn(1, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        h = 1e-5
        fd = (tight(x.detach() + h * v, y).item() - tight(x.detach() - h * v, y).item()) / (2 * h)
        assert abs((grad * v).sum().item() - fd) <= 1e-4 * max(1.0, abs(fd)), ((grad * v).sum().item(), fd)
    # value: the 20,000-sweep reference (whose own marginal error bounds how closely it can agree:
    # plain sweeps reach ~1e−14 at ε ≥ 4 but only ~1e−8 at ε = 2 and ~1e−5 at ε ≤ 1/4, rank units)
    monkeypatch.setattr(sinkhorn_module, "COMPILED", False)  # the cost-level path, whose solver is replaced
    monkeypatch.setattr(sinkhorn_module, "entropic_plan", _reference_entropic_plan)
    REFERENCE_ERROR.clear()
    ref = loss(x.detach(), y).item()
    allowed = max(1e-6, 10 * REFERENCE_ERROR[-1])
    assert abs(value.item() - ref) <= allowed * max(1.0, abs(ref)), (value.item(), ref, REFERENCE_ERROR)


@pytest.mark.parametrize("eps", [1 / 16, 0.5, 4.0, 64.0])
def test_plan_equals_reference_to_1e9(eps):
    rng = np.random.default_rng(3)
    x = np.sort(rng.normal(size=(3, 24)) * 3)
    anchors = np.array([-1.0, 2.0, 3.0, 4.5])
    b = np.array([0.55, 0.15, 0.15, 0.15])
    cost = (x[..., None] - anchors) ** 2
    ours = entropic_plan(torch.tensor(cost), torch.tensor(np.log(b)), eps, tolerance=1e-12).numpy()
    for row in range(3):
        ref, ref_error = reference_plan(cost[row], b, eps)
        assert ref_error < 1e-12 and np.abs(ours[row] - ref).max() < 1e-9


def test_float32_plan_and_pot():
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(4)
    cost = (rng.normal(size=(12, 1)) * 2 - np.array([[0.0, 1.0, 2.0]])) ** 2
    b = np.array([0.5, 0.25, 0.25])
    ref = ot.sinkhorn(np.full(12, 1 / 12), b, cost, 0.5, method="sinkhorn_log", numItermax=100_000, stopThr=1e-15)
    p64 = entropic_plan(torch.tensor(cost)[None], torch.tensor(np.log(b)), 0.5, tolerance=1e-12)[0].numpy()
    p32 = entropic_plan(torch.tensor(cost, dtype=torch.float32)[None], torch.tensor(np.log(b), dtype=torch.float32),
                        0.5)[0].double().numpy()
    assert np.abs(p64 - ref).max() < 1e-12
    assert np.abs(p32 - ref).max() < 1e-5


def test_not_converging_raises_and_the_run_fails_with_the_reason():
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    loss = harness.build_loss("difftopk", 16, sorter="sinkhorn", inverse_temperature=16.0, sinkhorn_iterations=1,
                              sinkhorn_tolerance=1e-12)
    with pytest.raises(SinkhornNotConverged, match="not converged in 1 Newton steps"):
        loss(x, torch.tensor([0, 1, 2, 3]))


def test_torch_solver_for_other_devices_matches_the_compiled_one():
    """The batched torch steps (used off the CPU) reach the same potentials as the compiled per-sample ones."""
    from losses.difftopk.semidual import solve_semi_dual
    from losses.difftopk.sinkhorn import _newton_stage, hard_potentials

    x = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 4
    anchors = torch.tensor([5.0, 11, 12, 13, 14, 15], dtype=torch.float64)
    b = torch.tensor([11 / 16] + [1 / 16] * 5, dtype=torch.float64)
    cost = (x.unsqueeze(2) - anchors).pow(2)
    for eps in (1 / 16, 1.0, 16.0):
        init = hard_potentials(x, anchors, b)
        g_t, err_t, _ = _newton_stage(cost, init.clone(), b.expand(6, -1), eps, 1e-12, 200, 2 * float(cost.max()))
        g_c, err_c, _ = solve_semi_dual(cost.numpy(), b.numpy(), [eps], [1e-12], init.numpy(), 200,
                                        2 * float(cost.max()))
        assert err_t <= 1e-12 and err_c.max() <= 1e-12
        plan_t = torch.softmax((g_t.unsqueeze(1) - cost) / eps, 2)
        plan_c = torch.softmax((torch.from_numpy(g_c).unsqueeze(1) - cost) / eps, 2)
        assert torch.allclose(plan_t, plan_c, atol=1e-10)


@pytest.mark.parametrize("anchors", [2, 6])
def test_compiled_plan_and_backward_match_the_torch_formulas(anchors):
    """The CPU's compiled plan and implicit backward equal the batched torch ones (used off the CPU)."""
    from losses.difftopk.semidual import plan_backward, plan_of_potentials
    from losses.difftopk.sinkhorn import _plan_backward_torch

    g = torch.Generator().manual_seed(7)
    cost = torch.rand(5, 16, anchors, dtype=torch.float64, generator=g) * 4
    pot = torch.randn(5, anchors, dtype=torch.float64, generator=g)
    for eps in (0.5, 2.0):  # well-conditioned systems (nearly hard plans: see the soft_topk tests)
        plan = torch.from_numpy(plan_of_potentials(cost.numpy(), pot.numpy(), eps))
        ref = torch.softmax((cost.transpose(1, 2) / -eps + pot.unsqueeze(2) / eps), dim=1) / 16
        assert torch.allclose(plan, ref, rtol=1e-13, atol=1e-300)
        grad_plan = torch.randn(5, 16, anchors, dtype=torch.float64, generator=g)
        ours, ok = plan_backward(grad_plan.numpy(), plan.numpy(), eps, 1e12)
        assert ok.all()
        want = _plan_backward_torch(plan, grad_plan, eps)
        assert torch.allclose(torch.from_numpy(ours), want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))
    hard = torch.zeros(1, anchors, 16, dtype=torch.float64)  # a hard plan: anchors decoupled, singular
    hard[0, 0, :] = 1 / 16
    _, ok = plan_backward(np.ones((1, 16, anchors)), hard.numpy(), 1.0, 1e12)
    assert not ok[0]


# A preselected row (m = 16) of an MLP's logits at its first step: at inverse temperature 56.57
# (inside difftopk's search range 1e-2..1e2) one anchor's couplings underflow to exactly 0, its Schur
# system is singular, and the backward used to return NaN (the tuned synthetic suite's first step).
DECOUPLED_ROW = [0.2382, 0.3989, 0.3608, 0.3301, 0.2490, 0.2361, 0.2327, 0.2251, 0.1951, 0.1802, 0.1778, 0.1756,
                 0.1686, 0.1659, 0.1654, 0.1582]


@pytest.mark.parametrize("inverse_temperature", [16.0, 56.57, 100.0])
def test_singular_schur_system_gives_the_finite_difference_gradient(inverse_temperature):
    from losses.difftopk.sinkhorn import sinkhorn_topk

    s = torch.tensor([DECOUPLED_ROW], dtype=torch.float64)
    weights = torch.linspace(0.5, 1.5, 5 * 16, dtype=torch.float64).view(1, 5, 16)

    def f(x, tolerance=1e-12):
        return (sinkhorn_topk(x, 5, inverse_temperature, 1000, tolerance) * weights).sum()

    x = s.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f(x), x)
    h = 1e-6
    fd = torch.stack([(f(s + h * e) - f(s - h * e)) / (2 * h) for e in torch.eye(16, dtype=torch.float64)])
    assert torch.isfinite(grad).all()
    assert (grad[0] - fd).abs().max() < 1e-6 * max(1.0, fd.abs().max().item())
    x32 = s.float().requires_grad_()
    (grad32,) = torch.autograd.grad(f(x32, 1e-6), x32)
    assert torch.isfinite(grad32).all()
