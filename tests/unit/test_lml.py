"""LML: ν against bisection and the projection against cvxpy (float64), gradcheck, hard limit, loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import harness
import losses  # noqa: F401
from losses.lml import lml


def _bisect(y: np.ndarray, k: float) -> np.ndarray:
    lo, hi = y.min() - 50, y.max() + 50
    for _ in range(300):
        nu = 0.5 * (lo + hi)
        lo, hi = (nu, hi) if (1 / (1 + np.exp(-(y - nu)))).sum() > k else (lo, nu)
    return 1 / (1 + np.exp(-(y - 0.5 * (lo + hi))))


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("tau", [0.1, 1.0, 10.0])
def test_projection_matches_bisection(k, tau):
    x = torch.randn(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    p = lml(x, k, tau)
    for row in range(4):
        assert np.abs(p[row].numpy() - _bisect(x[row].numpy() / tau, k)).max() < 1e-9
    assert (lml(x.float(), k, tau).double() - p).abs().max() < 1e-5


def test_projection_matches_cvxpy():
    cp = pytest.importorskip("cvxpy")
    x = np.random.default_rng(1).normal(size=(3, 6)) * 2
    p = lml(torch.tensor(x), 2).numpy()
    for row in range(3):
        v = cp.Variable(6)
        obj = x[row] @ v + cp.sum(cp.entr(v)) + cp.sum(cp.entr(1 - v))
        cp.Problem(cp.Maximize(obj), [cp.sum(v) == 2, v >= 0, v <= 1]).solve(
            solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
        assert np.abs(p[row] - v.value).max() < 1e-6  # the exponential cone solver's accuracy


def test_gradcheck_and_hard_limit():
    x = (torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: lml(a, 3, 0.7), (x,))
    s = torch.randn(5, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hard = torch.zeros_like(s).scatter(1, s.topk(4, dim=1).indices, 1.0)
    assert torch.allclose(lml(s, 4, 1e-5), hard, atol=1e-9)


def test_extreme_scores_stay_finite():
    x = (torch.randn(3, 50, generator=torch.Generator().manual_seed(4)) * 1e4).requires_grad_()
    p = lml(x, 5)
    p[:, 0].sum().backward()
    assert torch.isfinite(p).all() and torch.isfinite(x.grad).all()
    assert torch.allclose(p.sum(1), torch.full((3,), 5.0), atol=1e-3)


def test_loss_is_minus_log_of_the_label_mass():
    s = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 5, 9])
    loss = harness.build_loss("lml", 10)
    expected = -torch.log(lml(s, 5)[torch.arange(4), y] * (1 - 2e-7) + 1e-7).mean()
    assert abs(loss(s, y).item() - expected.item()) < 1e-12


def test_fast_and_exact_rows_match_bisection():
    """Rows spanning ≤ FAST_RANGE take the exp-free Newton steps, wider rows exact exps: both exact."""
    from losses.lml import FAST_RANGE

    x = torch.randn(4, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x[1] *= 100
    x[2] *= FAST_RANGE / 2  # spans more than FAST_RANGE: the exact path
    x[3, 0] = 2 * FAST_RANGE
    p = lml(x, 3)
    for row in range(4):
        assert np.abs(p[row].numpy() - _bisect(x[row].numpy(), 3)).max() < 1e-9
    assert torch.allclose(lml(x.float(), 3).double(), p, atol=1e-6)
