"""Berrada et al. smooth / hard top-k SVM: oracles (brute force, difftopk), limits and stability."""

from __future__ import annotations

import contextlib
import io
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses  # noqa: F401  (registers the losses)
from harness import build_loss
from harness.registry import RegistryError
from losses.berrada import BerradaHardTopK, BerradaSmoothTopK, smooth_topk_svm

METHODS = ("auto", "esp", "newton", "linear", "log")


def _lse(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def brute_smooth(s: np.ndarray, y: int, k: int, alpha: float, tau: float) -> float:
    """τ·LSE over all k-subsets of (Δ + mean)/τ minus τ·LSE over the subsets holding y.

    Written as τ·log1p(exp(LSE_{y∉ȳ} − LSE_{y∈ȳ})) (the same quantity) so that the reference
    stays accurate to 1e-15 relative when the loss is tiny.
    """
    out_terms, y_terms = [], []
    for subset in itertools.combinations(range(len(s)), k):
        mean = sum(s[j] for j in subset) / k
        if y in subset:
            y_terms.append(mean / tau)
        else:
            out_terms.append((alpha + mean) / tau)
    return tau * math.log1p(math.exp(_lse(out_terms) - _lse(y_terms)))


def brute_hard(s: np.ndarray, y: int, k: int, alpha: float) -> float:
    """The paper's l_k: max over k-subsets of (Δ + mean) minus max over subsets holding y."""
    subsets = list(itertools.combinations(range(len(s)), k))
    first = max(alpha * (y not in c) + s[list(c)].mean() for c in subsets)
    second = max(s[list(c)].mean() for c in subsets if y in c)
    return first - second


def _scores(gen: torch.Generator, b: int, n: int, tied: bool, dtype=torch.float64) -> torch.Tensor:
    if tied:  # few distinct values: many exact ties
        return torch.randint(-2, 3, (b, n), generator=gen).to(dtype)
    return (torch.randn(b, n, generator=gen) * 3).to(dtype)


@pytest.mark.parametrize("n", [6, 9, 12])
@pytest.mark.parametrize("tied", [False, True])
def test_smooth_matches_brute_force(n: int, tied: bool) -> None:
    gen = torch.Generator().manual_seed(100 + n + tied)
    b = 3
    s = _scores(gen, b, n, tied)
    y = torch.randint(0, n, (b,), generator=gen)
    for k in range(1, min(5, n - 1) + 1):
        for alpha, tau in [(1.0, 1.0), (0.0, 0.5), (2.5, 3.0), (1.0, 0.2)]:
            ref = torch.tensor(
                [brute_smooth(s[i].numpy(), int(y[i]), k, alpha, tau) for i in range(b)], dtype=torch.float64
            )
            for method in METHODS:
                if method == "newton" and tau < 1.0:
                    continue  # forced Newton is only trusted where it is well conditioned
                got = smooth_topk_svm(s, y, k, alpha, tau, method=method)
                err = ((got - ref).abs() / ref.abs().clamp_min(1e-300)).max().item()
                assert err <= 1e-9, (n, k, alpha, tau, method, err)
            module = build_loss("berrada_smooth", n, k=k, alpha=alpha, tau=tau)
            assert module(s, y).item() == pytest.approx(ref.mean().item(), rel=1e-9)


def test_auto_mixes_paths_and_matches_log_space() -> None:
    """One batch whose rows take the Newton, linear-tree and log-tree paths."""
    gen = torch.Generator().manual_seed(7)
    n, k = 40, 5
    base = torch.randn(6, n, generator=gen, dtype=torch.float64)
    s = base * torch.tensor([1.0, 3.0, 30.0, 80.0, 300.0, 1e4], dtype=torch.float64)[:, None]
    y = torch.randint(0, n, (6,), generator=gen)
    for dtype in (torch.float64, torch.float32):
        sd = s.to(dtype).requires_grad_(True)
        auto = smooth_topk_svm(sd, y, k, 1.0, 0.5)
        (g_auto,) = torch.autograd.grad(auto.sum(), sd)
        s64 = sd.detach().double().requires_grad_(True)  # the same (rounded) inputs, in float64
        ref = smooth_topk_svm(s64, y, k, 1.0, 0.5, method="log")
        (g_ref,) = torch.autograd.grad(ref.sum(), s64)
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        assert torch.allclose(auto.double(), ref, rtol=tol, atol=tol)
        assert (g_auto.double() - g_ref).norm() <= tol * 10 * g_ref.norm()


def test_matches_difftopk_port() -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        difftopk = pytest.importorskip("difftopk")
    gen = torch.Generator().manual_seed(3)
    n, b = 30, 16
    checked = 0
    for k, tau, scale in itertools.product([1, 2, 3, 5], [0.5, 1.0, 2.0], [1.0, 5.0]):
        s = torch.randn(b, n, generator=gen) * scale
        y = torch.randint(0, n, (b,), generator=gen)
        with contextlib.redirect_stdout(io.StringIO()):
            port = difftopk.SmoothTopKLoss(n, k, tau)(s.clone(), y)  # mean over the batch, α = 1
        if not torch.isfinite(port):
            continue
        ours = build_loss("berrada_smooth", n, k=k, alpha=1.0, tau=tau)(s, y)
        assert ours.item() == pytest.approx(port.item(), rel=2e-4, abs=1e-5), (k, tau, scale)
        checked += 1
    assert checked >= 12


def test_k1_alpha0_tau1_is_cross_entropy() -> None:
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(32, 17, generator=gen, dtype=torch.float64) * 4
    y = torch.randint(0, 17, (32,), generator=gen)
    loss = build_loss("berrada_smooth", 17, k=1, alpha=0.0, tau=1.0)
    assert loss(s, y).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-12)
    assert loss(s.float(), y).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_smooth_tends_to_hard_as_tau_vanishes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    n, k = 20, 3
    s = (torch.randn(16, n, generator=gen, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, n, (16,), generator=gen)
    hard = build_loss("berrada_hard", n, k=k)(s, y).item()
    bound = math.log(math.comb(n, k))
    gaps = []
    for tau in [1.0, 1e-1, 1e-2, 1e-3, 1e-4]:
        smooth = build_loss("berrada_smooth", n, k=k, tau=tau)(s, y).item()
        gaps.append(abs(smooth - hard))
        assert gaps[-1] <= tau * bound + 1e-4
    assert gaps[-1] < 1e-3 and gaps[-1] < gaps[0]


@pytest.mark.parametrize("n", [5, 8, 11])
def test_hard_matches_paper_definition(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    for tied in (False, True):
        s = _scores(gen, 6, n, tied)
        y = torch.randint(0, n, (6,), generator=gen)
        for k in range(1, n):
            for alpha in (0.0, 1.0, 2.0):
                ref = np.mean([brute_hard(s[i].numpy(), int(y[i]), k, alpha) for i in range(6)])
                got = build_loss("berrada_hard", n, k=k, alpha=alpha)(s, y).item()
                assert got == pytest.approx(ref, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_large_scores_float32_stable(tau: float) -> None:
    gen = torch.Generator().manual_seed(4)
    n, b, k = 1000, 8, 5
    s64 = torch.randn(b, n, generator=gen, dtype=torch.float64) * 1e4
    s64[:, :3] = 1e4  # ties at the top
    s64[1, :] = -1e4  # a fully tied row
    y = torch.randint(0, n, (b,), generator=gen)
    y[0] = 0
    loss = build_loss("berrada_smooth", n, k=k, tau=tau)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        s = s64.to(dtype).requires_grad_(True)
        value = loss(s, y)
        (g,) = torch.autograd.grad(value, s)
        assert torch.isfinite(value) and torch.isfinite(g).all()
        grads[dtype] = g.double()
    diff = (grads[torch.float32] - grads[torch.float64]).norm()
    assert diff <= 1e-3 * grads[torch.float64].norm()


@pytest.mark.parametrize("scale", [1.0, 20.0])
def test_float32_gradients_match_float64(scale: float) -> None:
    gen = torch.Generator().manual_seed(5)
    s64 = torch.randn(64, 100, generator=gen, dtype=torch.float64) * scale
    y = torch.randint(0, 100, (64,), generator=gen)
    loss = build_loss("berrada_smooth", 100, k=5, tau=1.0)
    out = []
    for dtype in (torch.float32, torch.float64):
        s = s64.to(dtype).requires_grad_(True)
        (g,) = torch.autograd.grad(loss(s, y), s)
        out.append(g.double())
    assert (out[0] - out[1]).norm() <= 1e-4 * out[1].norm()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_gradcheck_smooth(method: str, k: int) -> None:
    gen = torch.Generator().manual_seed(10 + k)
    s = torch.randn(3, 6, generator=gen, dtype=torch.float64).requires_grad_(True)
    y = torch.tensor([0, 3, 5])
    assert torch.autograd.gradcheck(lambda t: smooth_topk_svm(t, y, k, 1.0, 0.7, method), (s,))


@pytest.mark.parametrize("name", ["berrada_hard", "berrada_smooth"])
def test_gradcheck_modules(name: str) -> None:
    s = torch.tensor(
        [[0.3, -1.2, 2.1, 0.9, -0.4, 1.5], [1.1, 0.2, -0.7, 2.4, -1.9, 0.6]], dtype=torch.float64, requires_grad=True
    )
    y = torch.tensor([1, 3])
    loss = build_loss(name, 6, k=2)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (s,))


@pytest.mark.parametrize("name", ["berrada_hard", "berrada_smooth"])
def test_edge_cases_finite(name: str) -> None:
    cases = [
        (torch.zeros(4, 10), torch.tensor([0, 3, 9, 9]), 5),  # all tied
        (torch.randn(1, 10), torch.tensor([4]), 5),  # batch of one
        (torch.tensor([[1.0, 2.0], [3.0, 3.0]]), torch.tensor([0, 1]), 1),  # n = 2
        (torch.randn(3, 6), torch.tensor([0, 1, 5]), 5),  # k = n - 1
    ]
    for s, y, k in cases:
        s = s.clone().requires_grad_(True)
        value = build_loss(name, s.shape[1], k=k)(s, y)
        (g,) = torch.autograd.grad(value, s)
        assert value.ndim == 0 and torch.isfinite(value) and torch.isfinite(g).all()
    half = build_loss(name, 10, k=3)(torch.randn(4, 10).bfloat16(), torch.tensor([0, 1, 2, 3]))
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_invalid_parameters() -> None:
    for cls in (BerradaHardTopK, BerradaSmoothTopK):
        with pytest.raises(ValueError, match="num_classes"):
            cls(5, k=5)
        with pytest.raises(ValueError):
            cls(5, k=0)
        with pytest.raises(ValueError):
            cls(10, k=2, alpha=-1.0)
        with pytest.raises(ValueError):
            build_loss(cls is BerradaHardTopK and "berrada_hard" or "berrada_smooth", 3, k=3)
    with pytest.raises(ValueError, match="tau"):
        BerradaSmoothTopK(10, tau=-0.5)
    with pytest.raises(ValueError, match="tau"):
        BerradaSmoothTopK(10, tau=0.0)
    with pytest.raises(RegistryError):
        build_loss("berrada_smooth", 10, tau=-1.0)
    with pytest.raises(RegistryError):
        build_loss("berrada_smooth", 10, k=2.5)
