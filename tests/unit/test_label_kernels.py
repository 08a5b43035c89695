"""The label-only CPU kernels of the operator losses against their general paths (values and gradients):
``projection_at`` (isotonic_label: values sort, head partition), ``lml_at`` and ``lapsum_thresholds_fixed``;
float32 and float64, ties, k = 1 and k = n − 1, small and large logit scales, the wide-row fallbacks."""
from __future__ import annotations

import pytest
import torch

import losses  # noqa: F401
from losses.isotonic import permutahedron_projection, projection_at
from losses.lapsum import lapsum_threshold, lapsum_thresholds_fixed
from losses.lml import FAST_RANGE, lml, lml_at


def _scores(batch: int, n: int, scale: float, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    s = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * scale
    s[0, : n // 3] = s[0, 0]  # ties
    s[1, 1] = s[1, 0]
    return s.to(dtype)


def _both(general, fast, s: torch.Tensor, weights: torch.Tensor):
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    va, vb = general(a), fast(b)
    (va * weights).sum().backward()
    (vb * weights).sum().backward()
    return va.detach(), vb.detach(), a.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["l2", "kl", "p4/3"])
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_projection_at_equals_the_gathered_projection(dtype, mode, scale):
    n = 600  # p4/3 with w zero beyond 5: the head path (M = 32 ≤ n/4), rows needing more retry or sort
    s = _scores(12, n, scale, dtype)
    index = torch.randint(0, n, (12,), generator=torch.Generator().manual_seed(1))
    index[0], index[1], index[2] = 2, 1, int(s[2].argmax())  # a tied label, a tied pair, the largest score
    if mode == "kl":
        w = torch.arange(n, 0, -1, dtype=dtype).log()
    else:
        w = torch.zeros(n, dtype=dtype)
        w[:5] = 0.5
        w[:1] = 1.0
    weights = torch.randn(12, dtype=dtype, generator=torch.Generator().manual_seed(2))
    va, vb, ga, gb = _both(lambda z: permutahedron_projection(z, w, mode).gather(1, index.view(-1, 1)).squeeze(1),
                           lambda z: projection_at(z, w, index, mode), s, weights)
    assert torch.allclose(va, vb, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=1e-12)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    # row 0: 200 tied scores where w is flat, at a kink of the projection; the full path's PAV may split
    # the tie between blocks by rounding, the label path keeps the tie in one block (one subgradient each)
    assert torch.allclose(ga[1:], gb[1:], rtol=tol, atol=tol * ga.abs().max().item())
    if mode == "l2" and bool(gb[0].ne(0).any()):  # l2: a block's gradient of y_label sums to 0
        assert abs(gb[0].sum().item()) < 1e-5


def test_projection_at_gradcheck_and_nan():
    s = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    w = torch.tensor([1.0, 0.5, 0.5, 0, 0, 0, 0, 0, 0], dtype=torch.float64)
    index = torch.tensor([0, 4, 8])
    assert torch.autograd.gradcheck(lambda z: projection_at(z, w, index, "l2"), (s,))
    assert torch.autograd.gradcheck(lambda z: projection_at(z, w, index, "p4/3"), (s,))
    bad = s.detach().clone()
    bad[1, 3] = float("nan")
    out = projection_at(bad, w, index, "l2")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.01, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("k", [1, 5, 39])
def test_lml_at_equals_the_gathered_lml(dtype, scale, k):
    n = 40 if k == 39 else 300
    s = _scores(10, n, scale, dtype)
    index = torch.randint(0, n, (10,), generator=torch.Generator().manual_seed(4))
    index[0], index[2] = 1, int(s[2].argmax())
    weights = torch.randn(10, dtype=dtype, generator=torch.Generator().manual_seed(5))
    va, vb, ga, gb = _both(lambda x: lml(x, k, 0.7).gather(1, index.view(-1, 1)).squeeze(1),
                           lambda x: lml_at(x, k, index, 0.7), s, weights)
    tol = 1e-9 if dtype == torch.float64 else 2e-6  # both solve to |Σp − k| ≤ 1e−12·n, not to the last bit
    assert (va - vb).abs().max() <= tol
    assert (ga - gb).abs().max() <= tol * max(1.0, ga.abs().max().item())


@pytest.mark.parametrize("n,k", [(50, 49), (100, 1), (1000, 500)])
def test_lml_at_many_rows_saturated_and_sparse(n, k):
    """k = n − 1 at a large scale (masses near 1, a flat dual): the last Halley step must still be exact."""
    x = torch.randn(64, n, dtype=torch.float64, generator=torch.Generator().manual_seed(11)) * 30
    index = torch.randint(0, n, (64,), generator=torch.Generator().manual_seed(12))
    assert (lml_at(x, k, index) - lml(x, k)[torch.arange(64), index]).abs().max() <= 1e-9


def test_lml_at_gradcheck_and_wide_rows():
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).requires_grad_()
    index = torch.tensor([0, 3, 7])
    assert torch.autograd.gradcheck(lambda a: lml_at(a, 3, index, 0.7), (x,))
    wide = torch.randn(3, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    wide[0, 0] = 2 * FAST_RANGE  # the general path
    assert torch.allclose(lml_at(wide, 2, index), lml(wide, 2)[torch.arange(3), index], atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.01, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("ks", [[1.0], [5.0, 2.5], [199.0]])
def test_lapsum_fixed_thresholds_equal_the_general_ones(dtype, scale, ks):
    n = 200
    s = _scores(10, n, scale, dtype)
    weights = torch.randn(10, len(ks), dtype=dtype, generator=torch.Generator().manual_seed(8))
    k = torch.tensor(ks, dtype=dtype).expand(10, len(ks))
    va, vb, ga, gb = _both(lambda x: lapsum_threshold(x, k, 0.7), lambda x: lapsum_thresholds_fixed(x, ks, 0.7),
                           s, weights)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert ((va - vb).abs() <= rtol * (1 + va.abs())).all()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert (ga - gb).abs().max() <= tol * max(1.0, ga.abs().max().item())


def test_lapsum_fixed_gradcheck_and_wide_rows():
    s = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: lapsum_thresholds_fixed(x, [1.0, 4.5], 0.8), (s,))
    wide = torch.randn(3, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(10)) * 1e3  # > 600·α
    k = torch.tensor([[3.0]], dtype=torch.float64).expand(3, 1)
    assert torch.allclose(lapsum_thresholds_fixed(wide, [3.0], 1.0), lapsum_threshold(wide, k, 1.0), rtol=1e-12)
    with pytest.raises(ValueError):
        lapsum_thresholds_fixed(wide, [30.0], 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [0.1, 3.0, 30.0])
def test_lapsum_loss_mass_node_equals_the_mask_formula(dtype, scale):
    """The loss's fused label-mass node: value and gradient of −log(P_K-mixed mass) as from lapsum_topk."""
    import harness
    from losses.lapsum import lapsum_topk

    n = 50
    s = _scores(6, n, scale, dtype)
    y = torch.tensor([2, 1, 0, 49, 7, 30])
    loss = harness.build_loss("lapsum", n, p_k=[0.2, 0.0, 0.5, 0.3], alpha=0.7)

    def reference(x):
        rows = torch.arange(6)
        q = 0.2 * torch.softmax(x, 1)[rows, y] + sum(
            w * lapsum_topk(x, k, 0.7)[rows, y] for k, w in ((3, 0.5), (4, 0.3)))
        return -torch.log(q * (1 - 2e-7) + 1e-7).mean()

    va, vb, ga, gb = _both(reference, lambda x: loss(x, y), s, torch.ones((), dtype=dtype))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(va.item() - vb.item()) <= tol * max(1.0, abs(va.item()))
    assert (ga - gb).abs().max() <= tol * max(1.0, ga.abs().max().item())
