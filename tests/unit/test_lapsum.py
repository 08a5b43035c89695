"""LapSum soft top-k: b against bisection (float64), Σp = k, gradients in s, α and k, the hard limit."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import harness
import losses  # noqa: F401
from losses.lapsum import lapsum_threshold, lapsum_topk


def _laplace_cdf(u: np.ndarray) -> np.ndarray:
    return np.where(u > 0, 1 - 0.5 * np.exp(-np.abs(u)), 0.5 * np.exp(-np.abs(u)))


def _bisect_b(x: np.ndarray, k: float, alpha: float) -> float:
    """b with Σ F((x − b)/α) = k by bisection (Σ F decreases in b)."""
    lo, hi = x.min() - 60 * alpha, x.max() + 60 * alpha
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _laplace_cdf((x - mid) / alpha).sum() > k else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("k", [0.2, 1.0, 2.5, 5.0, 9.9])
@pytest.mark.parametrize("alpha", [0.05, 0.7, 4.0])
def test_threshold_matches_bisection_float64(k, alpha):
    s = torch.randn(5, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3
    b = lapsum_threshold(s, k, alpha).squeeze(1)
    p = lapsum_topk(s, k, alpha)
    for row in range(5):
        x = s[row].numpy()
        b_ref = _bisect_b(x, k, alpha)
        assert np.abs(p[row].numpy() - _laplace_cdf((x - b_ref) / alpha)).max() < 1e-9
        slope = np.exp(-np.abs(x - b_ref) / alpha).sum() / (2 * alpha)  # dΣF/db: b is defined to 1e-12/slope
        assert abs(b[row].item() - b_ref) < 1e-9 or slope < 1e-3
    assert torch.allclose(p.sum(1), torch.full((5,), k, dtype=torch.float64), atol=1e-12)


def test_several_k_at_once_and_float32():
    s = torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 10
    ks = torch.tensor([[1.0, 5.0, 17.5]], dtype=torch.float64).expand(4, 3)
    p = lapsum_topk(s, ks, 0.5)
    assert p.shape == (4, 3, 50)
    for j, k in enumerate([1.0, 5.0, 17.5]):
        assert torch.allclose(p[:, j], lapsum_topk(s, k, 0.5), atol=1e-14)
    p32 = lapsum_topk(s.float(), ks.float(), 0.5)
    assert (p32.double() - p).abs().max() < 1e-5


def test_gradcheck_in_scores_alpha_and_k():
    s = (torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    k = torch.tensor([[1.5], [3.0], [4.2]], dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: lapsum_topk(a, b, c), (s, k, alpha))


def test_no_overflow_at_large_scale():
    s = torch.randn(3, 100, generator=torch.Generator().manual_seed(4)) * 1e4
    s.requires_grad_()
    p = lapsum_topk(s, 5, 0.01)
    p[:, :3].sum().backward()
    assert torch.isfinite(p).all() and torch.isfinite(s.grad).all()
    assert torch.allclose(p.sum(1), torch.full((3,), 5.0), atol=1e-3)


def test_hard_limit_is_the_topk_mask():
    s = torch.randn(6, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    hard = torch.zeros_like(s).scatter(1, s.topk(4, dim=1).indices, 1.0)
    assert torch.equal(lapsum_topk(s, 4, 1e-5).round(decimals=9), hard)


def test_loss_is_topk_ce_over_the_mask():
    s = torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([0, 3, 7, 11])
    loss = harness.build_loss("lapsum", 12, p_k=[0.25, 0.0, 0.75], alpha=0.5)
    q = 0.25 * torch.softmax(s, 1)[torch.arange(4), y] + 0.75 * lapsum_topk(s, 3, 0.5)[torch.arange(4), y]
    expected = -torch.log(q * (1 - 2e-7) + 1e-7).mean()
    assert abs(loss(s, y).item() - expected.item()) < 1e-12
    sort = harness.build_loss("lapsum", 12, p_k=[0.25, 0.0, 0.75], alpha=0.5, top1_mode="sort")
    q = 0.25 * lapsum_topk(s, 1, 0.5)[torch.arange(4), y] + 0.75 * lapsum_topk(s, 3, 0.5)[torch.arange(4), y]
    assert abs(sort(s, y).item() - (-torch.log(q * (1 - 2e-7) + 1e-7).mean()).item()) < 1e-12


def test_preselection_matches_full_when_label_in_top_m():
    s = torch.randn(8, 40, generator=torch.Generator().manual_seed(7)) * 3
    y = s.argmax(1)  # label inside the top m
    full = harness.build_loss("lapsum", 40, alpha=1e-3, top1_mode="sort")
    pre = harness.build_loss("lapsum", 40, alpha=1e-3, m=16, top1_mode="sort")
    assert abs(full(s, y).item() - pre(s, y).item()) < 1e-5


@pytest.mark.parametrize("bad", [{"alpha": 0.0}, {"p_k": [0.5, 0.4]}, {"m": 3}])
def test_bad_parameters(bad):
    with pytest.raises((ValueError, harness.registry.RegistryError)):
        harness.build_loss("lapsum", 10, **bad)
