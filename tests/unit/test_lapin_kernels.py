"""The CPU kernels of the Lapin losses (losses/lapin_kernels.py, losses/lapin_entropy_kernels.py: smoothed
and hard top-k SVMs, top-k and truncated top-k entropy) against the pure-torch path (itself checked against
brute force in test_lapin.py), an optimality certificate of the projection, and a stable sort for the
selection."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import losses  # noqa: F401  (registers the losses)
from harness import build_loss
from losses import lapin_entropy_kernels, lapin_kernels

KERNEL_LOSSES = [("lapin_svm_alpha", {"gamma": 1.0}), ("lapin_svm_beta", {"gamma": 1.0}), ("lapin_entropy", {}),
                 ("lapin_svm_alpha", {"gamma": 0.0}), ("lapin_svm_beta", {"gamma": 0.0}),
                 ("lapin_truncated_entropy", {})]
# losses whose gradient picks one of several tied entries (a subgradient): compared on untied rows only
PICKS_AT_TIES = {("lapin_svm_alpha", 0.0), ("lapin_svm_beta", 0.0), ("lapin_truncated_entropy", None)}


def _picks(name: str, params: dict) -> bool:
    return (name, params.get("gamma")) in PICKS_AT_TIES


def _kernel(name: str, params: dict):
    """The per-row kernel behind a loss config: (scores, labels, k) -> (loss [B], grad [B, n])."""
    gamma, alpha = params.get("gamma", 0.0), name.endswith("alpha")
    if name == "lapin_entropy":
        return lapin_entropy_kernels.entropy_rows
    if name == "lapin_truncated_entropy":
        return lapin_entropy_kernels.truncated_entropy_rows
    if gamma > 0:
        return lambda s, y, k: lapin_kernels.svm_rows(s, y, k, gamma, alpha)
    return lambda s, y, k: lapin_kernels.hard_svm_rows(s, y, k, alpha)


def _scores(seed: int, b: int, n: int, scale: float, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ~ N(0, scale²) where the label leads in some rows, so that the budget of Δ_k^α is inactive
    (its projection is onto the top-k cone): by 0.7·scale (h = 1 + s_j − s_y mostly < 0), by 0.5 (a few
    h_j > 0), by 1 − 10⁻⁴ over scores of size 10⁻⁵ (all h_j ≈ 10⁻⁴ > 0: supports of ~n entries)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(b, n, generator=gen, dtype=torch.float64) * scale
    y = torch.randint(0, n, (b,), generator=gen)
    rows = torch.arange(b)
    lead, close, near = rows[: b // 8], rows[b // 8 : b // 4], rows[b // 4 : b // 4 + 3]
    s[lead, y[lead]] = s[lead].max(1).values + 0.7 * scale
    s[close, y[close]] = s[close].max(1).values + 0.5
    s[near] = 1e-5 * torch.randn(len(near), n, generator=gen, dtype=torch.float64)
    s[near, y[near]] = 1.0 - 1e-4
    return s.to(dtype), y


def _value_and_grad(fn, s: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = s.clone().requires_grad_(True)
    out = fn(x, y)
    (g,) = torch.autograd.grad(out, x)
    return out.detach(), g


@pytest.mark.parametrize("name,params", KERNEL_LOSSES)
@pytest.mark.parametrize("scale", [0.01, 1.0, 3.0, 10.0, 30.0])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_kernel_equals_torch_path_float64(name: str, params: dict, scale: float, k: int) -> None:
    s, y = _scores(int(scale * 100) + k, 24, 300, scale)
    loss = build_loss(name, 300, k=k, **params)
    val, grad = _value_and_grad(loss, s, y)
    ref, ref_grad = _value_and_grad(loss.torch_forward, s, y)
    assert val.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name,params", KERNEL_LOSSES)
@pytest.mark.parametrize("scale", [1.0, 3.0, 10.0, 30.0])
def test_kernel_float32_close_to_float64(name: str, params: dict, scale: float) -> None:
    s, y = _scores(7, 32, 1000, scale, torch.float32)
    loss = build_loss(name, 1000, k=5, **params)
    ref, ref_grad = _value_and_grad(loss.torch_forward, s.double(), y)  # the same inputs, in float64
    val, grad = _value_and_grad(loss, s, y)
    assert val.dtype == torch.float32 and grad.dtype == torch.float32
    assert val.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name,params", KERNEL_LOSSES + [("lapin_svm_alpha", {"gamma": 0.05}),
                                                         ("lapin_svm_beta", {"gamma": 4.0})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,k", [(2, 1), (7, 6), (7, 1), (40, 39), (40, 17), (300, 299)])
def test_edge_cases_and_ties(name: str, params: dict, dtype: torch.dtype, n: int, k: int) -> None:
    """k = 1, k = n − 1, the partition path (k > 16), and integer scores (many ties, ties at the k-th)."""
    gen = torch.Generator().manual_seed(n * 100 + k)
    tied = torch.randint(-2, 3, (16, n), generator=gen).double()
    untied = _scores(n + k, 16, n, 2.0)[0]
    y = torch.randint(0, n, (32,), generator=gen)
    loss = build_loss(name, n, k=k, **params)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for rows, check_grad in ((torch.cat([tied, untied]), not _picks(name, params)), (untied, True)):
        s, lab = rows.to(dtype), y[-len(rows) :]
        val, grad = _value_and_grad(loss, s, lab)
        ref, ref_grad = _value_and_grad(loss.torch_forward, s.double(), lab)
        assert val.item() == pytest.approx(ref.item(), rel=tol, abs=tol)
        assert not check_grad or torch.allclose(grad.double(), ref_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_alpha_cone_rows_satisfy_the_projection_certificate(k: int) -> None:
    """Rows whose budget is inactive (Σx < 1): x = proj_{Δ_k^α}(v) iff x ∈ Δ_k^α and ⟨v − x, z − x⟩ ≤ 0 for
    every vertex z (0 and 1_S/k, |S| = k); supports wider than the first guess (32 entries) included."""
    n, b = 300, 24
    s, y = _scores(k, b, n, 2.0)
    _, grad = _value_and_grad(build_loss("lapin_svm_alpha", n, k=k, gamma=1.0), s, y)
    x = grad * b  # ∂(mean loss)/∂s_j = x_j / B for j ≠ y
    keep = torch.ones_like(x, dtype=torch.bool).scatter_(1, y[:, None], False)
    x = x[keep].view(b, n - 1)
    v = (1.0 + s - s.gather(1, y[:, None]))[keep].view(b, n - 1)
    total = x.sum(1)
    cone = total < 1 - 1e-9
    assert cone.sum() >= b // 4 and (x[cone] > 0).sum(1).max() > 200
    assert x.min() >= 0 and (x - total[:, None] / k).max() <= 1e-12
    r = v - x
    best_vertex = torch.clamp(r.topk(k, dim=1).values.sum(1) / k, min=0.0)
    assert (best_vertex - (r * x).sum(1)).max() <= 1e-9


@pytest.mark.parametrize("k", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_select_finds_top_k_and_candidates(k: int, dtype) -> None:
    """_select: the k largest without the label column (ties: first column first, as a stable sort) and
    exactly the columns above (k-th largest − slack)."""
    lapin_kernels._compile()
    rng = np.random.default_rng(k)
    n, slack = 500, 0.3
    for rows in (rng.normal(size=(20, n)), rng.integers(-3, 4, size=(20, n)).astype(float),
                 np.sort(rng.normal(size=(4, n)), axis=1)):  # ascending rows: the prefix bound is useless
        for row in rows.astype(dtype):
            y = int(rng.integers(n))
            buf, idx = np.empty(k), np.empty(k, dtype=np.int64)
            cand = np.empty(n + 1, dtype=np.int64)
            c, nans = lapin_kernels._select(row, y, k, slack, buf, idx, cand)
            cols = np.array([j for j in range(n) if j != y])
            order = cols[np.argsort(-row[cols].astype(np.float64), kind="stable")]
            assert nans == 0
            np.testing.assert_array_equal(idx, order[:k])
            np.testing.assert_array_equal(buf, row[order[:k]].astype(np.float64))
            want = [j for j in cols if float(row[j]) > buf[-1] - slack]
            assert sorted(cand[:c].tolist()) == want


@pytest.mark.parametrize("name,params", KERNEL_LOSSES)
def test_nan_row_gives_nan_row_only(name: str, params: dict) -> None:
    s, y = _scores(3, 8, 50, 2.0)
    s[2, 7] = float("nan")
    kernel = _kernel(name, params)
    loss, grad = kernel(s, y, 3)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    clean = torch.cat([s[:2], s[3:]]), torch.cat([y[:2], y[3:]])
    ref_loss, ref_grad = kernel(*clean, 3)
    assert torch.equal(torch.cat([loss[:2], loss[3:]]), ref_loss)
    assert torch.equal(torch.cat([grad[:2], grad[3:]]), ref_grad)
    assert torch.isnan(build_loss(name, 50, k=3, **params)(s, y))


@pytest.mark.parametrize("name,params", KERNEL_LOSSES)
def test_labels_out_of_range_rejected(name: str, params: dict) -> None:
    loss = build_loss(name, 10, k=3, **params)
    s = torch.randn(4, 10)
    for bad in ([0, 1, 2, 10], [0, -1, 2, 3]):
        with pytest.raises(ValueError, match="labels"):
            loss(s, torch.tensor(bad))
    with pytest.raises(ValueError, match="labels"):
        loss(s, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("name,params", KERNEL_LOSSES)
def test_noncontiguous_half_precision_and_upstream_gradient(name: str, params: dict) -> None:
    s, y = _scores(5, 16, 100, 3.0)
    loss = build_loss(name, 100, k=5, **params)
    ref, ref_grad = _value_and_grad(loss.torch_forward, s, y)
    val, grad = _value_and_grad(loss, s.t().contiguous().t(), y)  # column-major
    assert val.item() == pytest.approx(ref.item(), rel=1e-12) and torch.allclose(grad, ref_grad, atol=1e-13)
    _, grad3 = _value_and_grad(lambda a, b: 3.0 * loss(a, b), s, y)
    assert torch.allclose(grad3, 3.0 * ref_grad, atol=1e-13)
    val16, grad16 = _value_and_grad(loss, s.bfloat16(), y)
    assert val16.dtype == torch.float32 and grad16.dtype == torch.bfloat16
    assert val16.item() == pytest.approx(loss.torch_forward(s.bfloat16(), y).item(), rel=1e-5)
    assert torch.isfinite(grad16).all()
