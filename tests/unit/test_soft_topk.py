"""SOFT top-k (Xie et al. 2020): plans against POT (float64), the LML identity, the ε → 0 limit against
exact OT (ot.emd), gradcheck, and the loss built from the plan."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import harness
import losses  # noqa: F401
from losses.lml import lml
from losses.soft_topk import soft_topk, soft_topk_plan

ot = pytest.importorskip("ot")


def _pot_plan(s: np.ndarray, k: int, eps: float, sorted_: bool) -> np.ndarray:
    n = len(s)
    anchors = np.arange(k + 1.0) if sorted_ else np.array([0.0, 1.0])
    b = np.array([(n - k) / n] + ([1 / n] * k if sorted_ else [k / n]))
    cost = (s[:, None] - anchors[None]) ** 2
    cost = cost / cost.max()
    return n * ot.sinkhorn(np.full(n, 1 / n), b, cost, eps, method="sinkhorn_log", numItermax=200_000,
                           stopThr=1e-15)


@pytest.mark.parametrize("sorted_", [False, True])
@pytest.mark.parametrize("eps", [0.02, 0.1, 1.0])
def test_plan_matches_pot(sorted_, eps):
    s = torch.randn(3, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    ours = soft_topk_plan(s, 3, eps, sorted_, tolerance=1e-12).numpy()
    for row in range(3):
        assert np.abs(ours[row] - _pot_plan(s[row].numpy(), 3, eps, sorted_)).max() < 1e-9
    p32 = soft_topk_plan(s.float(), 3, eps, sorted_).double().numpy()
    assert np.abs(p32 - ours).max() < 1e-5


def test_two_anchors_equal_lml_with_tau_eps_maxcost_over_two():
    s = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    eps = 0.05
    mask = soft_topk(s, 4, eps, tolerance=1e-12)
    for row in range(4):
        x = s[row:row + 1]
        max_cost = torch.maximum(x.pow(2), (x - 1).pow(2)).max().item()
        assert torch.allclose(mask[row:row + 1], lml(x, 4, eps * max_cost / 2), atol=1e-9)


@pytest.mark.parametrize("sorted_", [False, True])
def test_small_eps_is_exact_ot_and_the_hard_mask(sorted_):
    g = torch.Generator().manual_seed(2)  # scores at least 1/4 apart (the cost is normalised to max 1)
    s = torch.stack([torch.randperm(9, generator=g) for _ in range(3)]).double() / 4 - 1
    plan = soft_topk_plan(s, 3, 1e-4, sorted_, tolerance=1e-9).numpy()
    for row in range(3):
        x = s[row].numpy()
        anchors = np.arange(4.0) if sorted_ else np.array([0.0, 1.0])
        b = np.array([6 / 9] + ([1 / 9] * 3 if sorted_ else [3 / 9]))
        exact = 9 * ot.emd(np.full(9, 1 / 9), b, (x[:, None] - anchors[None]) ** 2)
        assert np.abs(plan[row] - exact).max() < 1e-6
    hard = torch.zeros_like(s).scatter(1, s.topk(3, dim=1).indices, 1.0)
    assert torch.allclose(torch.tensor(plan[..., 1:].sum(2)), hard, atol=1e-6)


@pytest.mark.parametrize("sorted_", [False, True])
def test_gradcheck(sorted_):
    s = (torch.randn(2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: soft_topk_plan(x, 3, 0.1, sorted_, tolerance=1e-13), (s,))


def test_loss_sorted_reads_the_mixture_off_one_plan():
    s = torch.randn(4, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 4, 7, 10])
    kw = dict(p_k=[0.2, 0.3, 0.5], top1_mode="sort", epsilon=0.05, tolerance=1e-12)
    plan = soft_topk_plan(s, 3, 0.05, True, tolerance=1e-12)[torch.arange(4), y]  # [B, 4]; anchor 3 = rank 1
    q = 0.2 * plan[:, 3] + 0.3 * plan[:, 2:].sum(1) + 0.5 * plan[:, 1:].sum(1)
    sorted_loss = harness.build_loss("soft_topk", 11, sorted=True, **kw)
    assert abs(sorted_loss(s, y).item() - (-torch.log(q * (1 - 2e-7) + 1e-7)).mean().item()) < 1e-12
    q = sum(p * soft_topk(s, k, 0.05, tolerance=1e-12)[torch.arange(4), y] for k, p in [(1, 0.2), (2, 0.3), (3, 0.5)])
    unsorted = harness.build_loss("soft_topk", 11, **kw)
    assert abs(unsorted(s, y).item() - (-torch.log(q * (1 - 2e-7) + 1e-7)).mean().item()) < 1e-12


# A preselected row of a trained network's logits (m = 16) on which the soft mask is hard to 1e−17:
# the first five scores are 0.28 above the rest. Its Schur system was 0 by cancellation and the
# backward returned NaN in training (epoch 0, step 25 of the synthetic suite).
NEAR_HARD_ROW = [0.6400, 0.6021, 0.5916, 0.5817, 0.5744, 0.2979, 0.2869, 0.2613, 0.2470, 0.2154, 0.1920, 0.1890,
                 0.1864, 0.1692, 0.1622, 0.1468]


@pytest.mark.parametrize("sorted_", [False, True])
@pytest.mark.parametrize("eps", [0.01, 0.003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_hard_plan_has_finite_gradient_equal_to_finite_differences(sorted_, eps, dtype):
    s = torch.tensor([NEAR_HARD_ROW], dtype=torch.float64)
    pick = [0, 4, 5, 15]

    def f(x):
        return soft_topk_plan(x, 5, eps, sorted_)[0, pick].sum()

    x = s.to(dtype).requires_grad_()
    (grad,) = torch.autograd.grad(f(x), x)
    assert torch.isfinite(grad).all()
    h = 1e-6
    fd = torch.stack([(f(s + h * e) - f(s - h * e)) / (2 * h) for e in torch.eye(16, dtype=torch.float64)])
    assert (grad.double()[0] - fd).abs().max() < (1e-9 if dtype == torch.float64 else 1e-4)


def test_near_hard_training_batch_keeps_the_loss_gradient_finite():
    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([NEAR_HARD_ROW]) * torch.linspace(1, 30, 64).view(-1, 1)  # logit scales 1..30
    logits = torch.cat([rows, torch.randn(64, 84, generator=gen) * 0.1], 1).requires_grad_()
    loss = harness.build_loss("soft_topk", 100, m=16)(logits, torch.zeros(64, dtype=torch.long))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
