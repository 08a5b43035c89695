"""The fused CPU kernels (losses.difftopk.anchor_ot) against the cost-level path (torch cost and autograd
through it, the semi-dual solver, torch.amax's tie rule), in float64 and float32, at the edges."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import harness
import losses  # noqa: F401
import losses.difftopk.sinkhorn as sinkhorn_module
from losses.difftopk import anchor_ot
from losses.difftopk.sinkhorn import SinkhornNotConverged, hard_potentials, sinkhorn_topk
from losses.soft_topk import soft_topk_plan


def _value_and_grad(f, s: torch.Tensor, compiled: bool, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    monkeypatch.setattr(sinkhorn_module, "COMPILED", compiled)
    x = s.clone().requires_grad_()
    out = f(x)
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(out.dtype)
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    return out.detach(), grad


OPERATORS = {
    "soft_topk": lambda k, eps, tol: lambda x: soft_topk_plan(x, k, eps, False, 200, tol),
    "soft_topk_sorted": lambda k, eps, tol: lambda x: soft_topk_plan(x, k, eps, True, 200, tol),
    "sinkhorn": lambda k, eps, tol: lambda x: sinkhorn_topk(x, k, 1 / eps, 200, tol),
}
# ε per operator: soft_topk's is relative to the normalised cost, Sinkhorn's in squared rank units
EPSILONS = {"soft_topk": [0.003, 0.05, 1.0], "soft_topk_sorted": [0.01, 0.5], "sinkhorn": [1 / 16, 1.0, 16.0]}


@pytest.mark.parametrize("op", list(OPERATORS))
@pytest.mark.parametrize("k", [1, 5, 15])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_compiled_equals_cost_level_path_float64(op, k, scale, monkeypatch):
    s = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) * scale
    for eps in EPSILONS[op]:
        f = OPERATORS[op](k, eps, 1e-12)
        ours, grad = _value_and_grad(f, s, True, monkeypatch)
        want, want_grad = _value_and_grad(f, s, False, monkeypatch)
        assert ours.shape == want.shape
        assert (ours - want).abs().max() < 1e-10
        assert (grad - want_grad).abs().max() <= 1e-8 * max(1.0, want_grad.abs().max().item()), (op, eps)


@pytest.mark.parametrize("op", list(OPERATORS))
def test_compiled_float32_is_float64_to_float32_precision(op, monkeypatch):
    s = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    f = OPERATORS[op](5, EPSILONS[op][1], 1e-6)
    ours, grad = _value_and_grad(f, s.float(), True, monkeypatch)
    want, want_grad = _value_and_grad(OPERATORS[op](5, EPSILONS[op][1], 1e-12), s, False, monkeypatch)
    assert ours.dtype == torch.float32 and grad.dtype == torch.float32
    assert (ours.double() - want).abs().max() < 1e-5
    assert (grad.double() - want_grad).abs().max() < 1e-4 * max(1.0, want_grad.abs().max().item())


def test_all_classes_without_preselection(monkeypatch):
    s = torch.randn(3, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 3
    f = OPERATORS["soft_topk"](5, 0.01, 1e-12)
    ours, grad = _value_and_grad(f, s, True, monkeypatch)
    want, want_grad = _value_and_grad(f, s, False, monkeypatch)
    assert (ours - want).abs().max() < 1e-10
    assert (grad - want_grad).abs().max() < 1e-8 * want_grad.abs().max().item()


def test_tied_largest_costs_split_the_gradient_as_torch_amax(monkeypatch):
    """Scores −1 and 2 both have the largest cost 4 (anchors {0, 1}); equal scores elsewhere too."""
    s = torch.tensor([[-1.0, 2.0, 0.5, 0.5, 0.3, 1.2, 0.9, -0.2],
                      [0.1, 0.1, 0.1, 0.7, 0.7, -0.4, 1.4, 1.4]], dtype=torch.float64)
    for op in ("soft_topk", "soft_topk_sorted"):
        f = OPERATORS[op](3, 0.05, 1e-12)
        ours, grad = _value_and_grad(f, s, True, monkeypatch)
        want, want_grad = _value_and_grad(f, s, False, monkeypatch)
        assert (ours - want).abs().max() < 1e-10
        assert (grad - want_grad).abs().max() < 1e-8 * want_grad.abs().max().item()


def test_equal_scores_give_the_finite_difference_gradient():
    """A row of equal scores: the cost-level path's std backward is 0/0; the kernel's equals differences."""
    s = torch.full((1, 16), 0.3, dtype=torch.float64)
    weights = torch.linspace(0.5, 1.5, 5 * 16, dtype=torch.float64).view(1, 5, 16)

    def f(x):
        return (sinkhorn_topk(x, 5, 1.0, 200, 1e-12) * weights).sum()

    x = s.clone().requires_grad_()
    (grad,) = torch.autograd.grad(f(x), x)
    assert torch.isfinite(grad).all()
    v = torch.randn(1, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    h = 1e-12  # far below the std offset 1e−8, where the std's own contribution is second order
    fd = (f(s + h * v) - f(s - h * v)).item() / (2 * h)
    assert abs((grad * v).sum().item() - fd) < 1e-3 * abs(fd)


def test_gradcheck_sinkhorn_compiled():
    s = (torch.randn(2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sinkhorn_topk(x, 3, 0.5, 200, 1e-13), (s,))


def test_nan_scores_give_nan_not_a_convergence_error():
    s = torch.randn(2, 16, generator=torch.Generator().manual_seed(5))
    s[1, 3] = float("nan")
    for f in (OPERATORS["soft_topk"](5, 0.01, 1e-6), OPERATORS["sinkhorn"](5, 16.0, 1e-6)):
        out = f(s)
        assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).any()


def test_soft_topk_not_converging_raises():
    s = torch.randn(4, 16, generator=torch.Generator().manual_seed(6))
    with pytest.raises(SinkhornNotConverged, match="not converged in 1 Newton steps"):
        soft_topk_plan(s, 5, 0.01, False, 1, 1e-14)
    loss = harness.build_loss("soft_topk", 100, m=16, iterations=1, tolerance=1e-14)
    with pytest.raises(SinkhornNotConverged):
        loss(torch.randn(4, 100), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("counts", [[11, 5], [11, 1, 1, 1, 1, 1], [1] * 16])
def test_hard_start_equals_hard_potentials(counts):
    """The kernel's ε → 0 start (a partial insertion sort) equals the torch one (a full sort)."""
    from losses.difftopk.anchor_ot import _hard_start

    x = np.random.default_rng(7).normal(size=(4, 16)) * 3
    x[0, :4] = x[0, 4]  # ties
    r = len(counts)
    anchors = np.concatenate([[4.0], np.arange(11.0, 11.0 + r - 1)]) if r < 16 else np.arange(16.0)
    b = torch.tensor(counts, dtype=torch.float64) / 16
    want = hard_potentials(torch.from_numpy(x) / 2, torch.from_numpy(anchors) / 2, b)  # κ = 1/4
    for row in range(4):
        g = np.empty(r)
        _hard_start(x[row], anchors, np.array(counts), 0.25, np.empty(16 - counts[0] + 1), g)
        assert np.allclose(g, want[row].numpy(), rtol=1e-13, atol=1e-12)


def test_flushed_kernel_entries_do_not_change_the_plan():
    """Kernel entries below e^−FLUSH are stored as 0: at ε so small that most are, the plan still equals
    exact exps at the final potentials."""
    s = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    plan, points, kappas, pots, errors, _ = anchor_ot.fused_forward(
        s.numpy(), anchor_ot.NORMALISED, np.array([0.0, 1.0]), np.array([11, 5]), 1e-3, 1e-12, 200, 1e-300)
    assert errors.max() <= 1e-12
    cost = kappas[:, None, None] * (points[..., None] - np.array([0.0, 1.0])) ** 2
    exact = torch.softmax(torch.from_numpy((pots[:, None, :] - cost) / 1e-3), dim=2).numpy()
    assert np.abs(plan - exact).max() < 1e-13
