"""PAV against brute-force isotonic optimisation; permutahedron projections, soft ranks and the sparse
top-k against cvxpy (float64); exact backward by gradcheck; hard limits; torchsort parity if installed."""
from __future__ import annotations

import itertools
import importlib.util

import numpy as np
import pytest
import torch

import harness
import losses  # noqa: F401
from losses.isotonic import isotonic_decreasing, permutahedron_projection
from losses.soft_rank import soft_rank
from losses.sparse_topk import sparse_topk

cp = pytest.importorskip("cvxpy")


def _block_value(s: np.ndarray, w: np.ndarray, mode: str) -> float:
    if mode == "l2":
        return float(np.mean(s - w))
    if mode == "kl":
        return float(np.log(np.exp(s).sum()) - np.log(np.exp(w).sum()))
    lo, hi = s.min() - 10 - abs(w.sum()), s.max() + 10  # Σ (s − γ)³ = Σ w, decreasing in γ
    for _ in range(120):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ((s - mid) ** 3).sum() > w.sum() else (lo, mid)
    return 0.5 * (lo + hi)


def _objective(v: np.ndarray, s: np.ndarray, w: np.ndarray, mode: str) -> float:
    u = s - v
    if mode == "l2":
        return float(0.5 * (u ** 2).sum() + (w * v).sum())
    if mode == "kl":
        return float(np.exp(u).sum() + (np.exp(w) * v).sum())
    return float((u ** 4 / 4).sum() + (w * v).sum())


def _brute_isotonic(s: np.ndarray, w: np.ndarray, mode: str) -> np.ndarray:
    """Every partition into contiguous blocks with its blocks' optimal values; the best monotone one."""
    n, best, best_v = len(s), np.inf, None
    for cuts in itertools.product([0, 1], repeat=n - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        v = np.concatenate([np.full(b - a, _block_value(s[a:b], w[a:b], mode)) for a, b in zip(bounds, bounds[1:])])
        if np.all(np.diff(v) <= 1e-12):
            obj = _objective(v, s, w, mode)
            if obj < best:
                best, best_v = obj, v
    return best_v


@pytest.mark.parametrize("mode", ["l2", "kl", "p4/3"])
def test_pav_equals_brute_force(mode):
    rng = np.random.default_rng(0)
    for trial in range(8 if mode == "p4/3" else 20):
        n = 7
        s = np.sort(rng.normal(size=n) * 3)[::-1] + rng.normal(size=n) * 2  # nearly sorted: mixed blocks
        w = np.sort(rng.uniform(0, 2, size=n))[::-1]
        w = np.log(np.arange(n, 0, -1.0)) if mode == "kl" else w
        v, _ = isotonic_decreasing(s[None].copy(), w[None].copy(), mode)
        assert np.abs(v[0] - _brute_isotonic(s, w, mode)).max() < 1e-9, trial


def _cvxpy_projection(z: np.ndarray, w: np.ndarray, mode: str) -> np.ndarray:
    """argmin over the permutahedron P(w) (majorisation: top-j partial sums) of the mode's objective."""
    n = len(z)
    x = cp.Variable(n)
    cum = np.cumsum(np.sort(w)[::-1])
    cons = [cp.sum(x) == cum[-1]] + [cp.sum_largest(x, j) <= cum[j - 1] for j in range(1, n)]
    if mode == "l2":
        obj = 0.5 * cp.sum_squares(x - z)
    elif mode == "kl":
        obj = cp.sum(cp.kl_div(x, np.exp(z)))
    else:
        obj = 0.75 * cp.sum(cp.power(cp.abs(x), 4 / 3)) - z @ x
    cp.Problem(cp.Minimize(obj), cons).solve(solver="CLARABEL", tol_gap_abs=1e-13, tol_gap_rel=1e-13,
                                             tol_feas=1e-13)
    return x.value


# cvxpy's solver is the limit here (power cone ~1e-9, exp cone ~1e-7); the 1e-9 oracles are the brute-force
# PAV above and the 1-D bisection for the capped simplex below
@pytest.mark.parametrize("mode,tol", [("l2", 1e-9), ("p4/3", 1e-8), ("kl", 1e-6)])
def test_projection_equals_cvxpy(mode, tol):
    z = np.random.default_rng(1).normal(size=(4, 6)) * 2
    w = np.array([1.0, 1.0, 0.6, 0.2, 0.0, 0.0]) if mode != "kl" else np.log(np.arange(6, 0, -1.0))
    y = permutahedron_projection(torch.tensor(z), torch.tensor(w), mode).numpy()
    for row in range(4):
        ref = _cvxpy_projection(z[row], np.exp(w) if mode == "kl" else w, mode)
        assert np.abs(y[row] - ref).max() < tol


@pytest.mark.parametrize("mode", ["l2", "kl", "p4/3"])
def test_projection_gradcheck(mode):
    z = (torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2).requires_grad_()
    w = torch.tensor([1.0, 1, 1, 0.5, 0, 0, 0, 0], dtype=torch.float64)
    w = torch.arange(8, 0, -1.0, dtype=torch.float64).log() if mode == "kl" else w
    assert torch.autograd.gradcheck(lambda a: permutahedron_projection(a, w, mode), (z,))


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_soft_rank_limits_and_float32(reg):
    theta = torch.randn(5, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hard = theta.argsort(1, descending=True).argsort(1).to(theta.dtype) + 1  # 1 = largest
    assert torch.allclose(soft_rank(theta, 1e-4, reg), hard, atol=1e-9)
    r = soft_rank(theta, 1.0, reg)
    assert torch.allclose(r.sum(1), torch.full((5,), 30 * 31 / 2, dtype=torch.float64))
    assert (soft_rank(theta.float(), 1.0, reg).double() - r).abs().max() < 1e-4  # ranks up to 30: 1e-5 relative
    if reg == "l2":  # ε → ∞: every rank is the mean
        assert torch.allclose(soft_rank(theta, 1e6, reg), torch.full_like(theta, 15.5), atol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("torchsort") is None,
                    reason="torchsort is not installed: it has no wheels and builds a C++ extension against the "
                    "local torch (CPU: `pip install --no-build-isolation torchsort` with nvcc off PATH; with nvcc "
                    "on PATH its CUDA build needs TORCH_CUDA_ARCH_LIST), so it is not in the test extra")
@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_soft_rank_matches_torchsort(reg):
    import torchsort

    theta = torch.randn(4, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    weights = torch.randn(4, 25, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ours = soft_rank(theta, 0.7, reg)
    ref = torchsort.soft_rank(-theta, regularization=reg, regularization_strength=0.7)  # ascending ranks of −θ
    assert torch.allclose(ours, ref, atol=1e-9)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), theta)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), theta)
    assert torch.allclose(g_ours, g_ref, atol=1e-9)


@pytest.mark.parametrize("p", ["4/3", "2"])
def test_sparse_topk_cvxpy_sparsity_and_hard_limit(p):
    s = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    y = sparse_topk(s, 3, 0.5, p)
    q = 3.0 if p == "4/3" else 1.0  # KKT on the capped simplex: y_i = clip((z_i − τ)^(q), 0, 1), Σ y = k
    for row in range(4):
        z = s[row].numpy() / 0.5
        lo, hi = z.min() - 2, z.max() + 2
        for _ in range(200):
            tau = 0.5 * (lo + hi)
            lo, hi = (tau, hi) if np.clip(np.maximum(z - tau, 0) ** q, 0, 1).sum() > 3 else (lo, tau)
        ref = np.clip(np.maximum(z - 0.5 * (lo + hi), 0) ** q, 0, 1)
        assert np.abs(y[row].numpy() - ref).max() < 1e-9
    y32 = sparse_topk(s.float(), 3, 0.5, p).double()
    assert (y32 - y).abs().max() < 1e-5
    assert (y == 0).any() and torch.allclose(y.sum(1), torch.full((4,), 3.0, dtype=torch.float64))
    big = torch.randn(6, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    hard = torch.zeros_like(big).scatter(1, big.topk(5, dim=1).indices, 1.0)
    assert torch.allclose(sparse_topk(big, 5, 1e-6, p), hard, atol=1e-9)


def test_sparse_topk_loss_uses_the_mixture_weights():
    s = torch.randn(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 2, 5, 8])
    loss = harness.build_loss("sparse_topk", 9, p_k=[0.0, 0.5, 0.5], top1_mode="sort", epsilon=1e-7)
    rank = s.argsort(1, descending=True).argsort(1)[torch.arange(4), y] + 1
    q = 0.5 * (rank <= 2).double() + 0.5 * (rank <= 3).double()  # hard limit of the mixture
    assert abs(loss(s, y).item() - (-torch.log(q * (1 - 2e-7) + 1e-7)).mean().item()) < 1e-9


def test_soft_rank_loss_is_the_rank_hinge():
    s = torch.randn(4, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    y = torch.tensor([0, 2, 5, 8])
    loss = harness.build_loss("soft_rank", 9, k=2, epsilon=0.3)
    r = soft_rank(s, 0.3)[torch.arange(4), y]
    assert abs(loss(s, y).item() - torch.relu(r - 2).mean().item()) < 1e-12
    pre = harness.build_loss("soft_rank", 9, k=2, epsilon=1e-6, m=4)
    top = s.argmax(1)
    assert abs(pre(s, top).item()) < 1e-12 and abs(loss(s, top).item() - torch.relu(soft_rank(s, 0.3)[torch.arange(4), top] - 2).mean().item()) < 1e-12


def _both_paths(z: torch.Tensor, w: torch.Tensor, mode: str, monkeypatch) -> tuple:
    """(y, grad) through the default CPU path and with the sparse-head shortcut switched off."""
    import losses.isotonic as iso

    out = []
    for head in (True, False):
        with monkeypatch.context() as patch:
            if not head:
                patch.setattr(iso, "_sparse_head", lambda *args: 0)
            x = z.clone().requires_grad_()
            y = permutahedron_projection(x, w, mode)
            weights = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=z.dtype)
            (y * weights).sum().backward()
            out.append((y.detach(), x.grad))
    return out


@pytest.mark.parametrize("scale", [1.0, 3.0, 30.0])
def test_sparse_head_path_is_the_full_path_bit_for_bit(scale, monkeypatch):
    """w zero beyond K: the projection from the largest scores only equals the full sort + PAV exactly."""
    import losses.isotonic as iso

    z = torch.randn(64, 2000, generator=torch.Generator().manual_seed(11)) * scale
    z[0, :50] = z[0, :50].max()  # a tie group at the top
    z[2, 500:600] = z[2, 500]  # and one in the tail
    w = torch.zeros(2000)
    w[:5] = 0.5
    w64 = w[None].double().numpy()
    mode = "p4/3"
    assert iso._sparse_head(w64, mode, 2000) == 5 and iso._sparse_head(w64, "l2", 2000) == 0
    assert iso._project_head(z.numpy(), w64, mode, 5) is not None  # the shortcut is taken
    (y_head, g_head), (y_full, g_full) = _both_paths(z, w, mode, monkeypatch)
    assert torch.equal(y_head, y_full) and torch.equal(g_head, g_full)
    assert torch.allclose(y_full.sum(1), torch.full((64,), 2.5), atol=1e-4)
    ties = torch.round(z * 4) / 4  # ties across the cut: the shortcut declines, the full path runs
    assert iso._project_head(ties.numpy(), w64, mode, 5) is None
    (y_head, g_head), (y_full, g_full) = _both_paths(ties, w, mode, monkeypatch)
    assert torch.equal(y_head, y_full) and torch.equal(g_head, g_full)


def test_float32_path_matches_float64_and_keeps_nan():
    z = torch.randn(8, 300, generator=torch.Generator().manual_seed(12), dtype=torch.float64) * 3
    w = torch.arange(300, 0, -1.0, dtype=torch.float64)
    for mode in ["l2", "p4/3"]:
        x32 = z.float().requires_grad_()
        x64 = z.clone().requires_grad_()
        y32, y64 = permutahedron_projection(x32, w, mode), permutahedron_projection(x64, w, mode)
        assert y32.dtype == torch.float32 and (y32.double() - y64).abs().max() < 1e-4 * y64.abs().max()
        y32[:, 7].sum().backward()
        y64[:, 7].sum().backward()
        assert (x32.grad.double() - x64.grad).abs().max() < 1e-4
    bad = z.float().clone()
    bad[2, 5] = float("nan")
    assert torch.isnan(permutahedron_projection(bad, w, "l2")[2]).any()


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_rank_at_equals_the_gathered_soft_rank(reg, dtype):
    """The label-only soft rank (O(block) backward) equals the full one gathered, values and gradients."""
    from losses.soft_rank import soft_rank_at

    theta = torch.randn(16, 200, generator=torch.Generator().manual_seed(13)).to(dtype)
    theta[0, :20] = theta[0, 0]  # ties
    index = torch.randint(0, 200, (16,), generator=torch.Generator().manual_seed(14))
    index[0] = 3
    weights = torch.randn(16, generator=torch.Generator().manual_seed(15)).to(dtype)
    a, b = theta.clone().requires_grad_(), theta.clone().requires_grad_()
    full = soft_rank(a, 0.5, reg).gather(1, index.view(-1, 1)).squeeze(1)
    at = soft_rank_at(b, index, 0.5, reg)
    (full * weights).sum().backward()
    (at * weights).sum().backward()
    assert torch.equal(full, at)
    assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)  # float32 kl: the last bit of a few entries
    if dtype == torch.float64:
        x = theta[:3, :12].clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda v: soft_rank_at(v, index[:3] % 12, 0.5, reg), (x,))
