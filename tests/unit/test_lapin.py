"""Lapin et al. top-k SVMs and top-k entropies against brute-force definitions written here."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses  # noqa: F401  (registers the losses)
from harness import build_loss
from harness.registry import RegistryError
from losses.lapin import (
    TopKEntropy,
    TopKSVMAlpha,
    TopKSVMBeta,
    TruncatedTopKEntropy,
    project_capped_simplex,
    project_topk_simplex,
)

LAPIN = ("lapin_svm_alpha", "lapin_svm_beta", "lapin_entropy", "lapin_truncated_entropy")
SVMS = ("lapin_svm_alpha", "lapin_svm_beta")


def _data(seed: int, b: int, n: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(b, n, generator=gen, dtype=torch.float64) * scale
    return s, torch.randint(0, n, (b,), generator=gen)


def _others(row: np.ndarray, label: int) -> np.ndarray:
    return np.array([row[j] - row[label] for j in range(len(row)) if j != label])


# ----------------------------------------------------------------------------- brute force oracles
def bf_hard(row: np.ndarray, label: int, k: int, variant: str) -> float:
    """Max over k-subsets S of (1/k)Σ_S h (α, floored at 0) or (1/k)Σ_S h_+ (β)."""
    h = 1.0 + _others(row, label)
    subsets = itertools.combinations(range(len(h)), k)
    if variant == "alpha":
        return max(0.0, max(h[list(c)].sum() / k for c in subsets))
    return max(np.maximum(h[list(c)], 0.0).sum() / k for c in subsets)


def _constraints(n: int, k: int, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """G x ≤ g describing Δ_k^α or Δ_k^β in ℝ^n."""
    rows, rhs = [-np.eye(n)], [np.zeros(n)]
    if variant == "alpha":
        rows.append(np.eye(n) - np.ones((n, n)) / k)
        rhs.append(np.zeros(n))
    else:
        rows.append(np.eye(n))
        rhs.append(np.full(n, 1.0 / k))
    rows.append(np.ones((1, n)))
    rhs.append(np.ones(1))
    return np.vstack(rows), np.concatenate(rhs)


def bf_project(v: np.ndarray, k: int, variant: str) -> np.ndarray:
    """Projection by active-set enumeration: the closest feasible KKT point over all active sets."""
    n = len(v)
    g_mat, g = _constraints(n, k, variant)
    best, best_x = math.inf, None
    for size in range(0, n + 1):
        for act in itertools.combinations(range(len(g)), size):
            x = v.copy()
            if act:
                a, b = g_mat[list(act)], g[list(act)]
                lam = np.linalg.pinv(a @ a.T) @ (a @ v - b)
                x = v - a.T @ lam
            if np.all(g_mat @ x <= g + 1e-10):
                dist = float(np.sum((x - v) ** 2))
                if dist < best:
                    best, best_x = dist, x
    assert best_x is not None
    return best_x


def bf_smooth(row: np.ndarray, label: int, k: int, gamma: float, variant: str) -> float:
    h = 1.0 + _others(row, label)
    x = bf_project(h / gamma, k, variant)
    return float(h @ x - 0.5 * gamma * x @ x)


def bf_topk_entropy(row: np.ndarray, label: int, k: int) -> float:
    """max_{x∈Δ_k^α} ⟨a,x⟩ − (1−s)log(1−s) − Σx log x by nested 1-D searches (no closed form)."""
    a = _others(row, label)
    n = len(a)

    def inner(s: float) -> float:
        if s <= 0.0:
            return 0.0
        lo, hi = -200.0, 200.0  # x_i = min(s/k, e^{a_i − θ}); Σx decreasing in θ
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if np.minimum(s / k, np.exp(a - mid)).sum() > s:
                lo = mid
            else:
                hi = mid
        x = np.minimum(s / k, np.exp(a - 0.5 * (lo + hi)))
        if n == k:
            x = np.full(n, s / k)
        x = x * (s / x.sum())
        ent = -(1.0 - s) * math.log(1.0 - s) if s < 1.0 else 0.0
        return float(a @ x - np.sum(x * np.log(x)) + ent)

    lo, hi, phi = 0.0, 1.0, (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(80):  # golden section on the concave f(s)
        c, d = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if inner(c) > inner(d):
            hi = d
        else:
            lo = c
    return inner(0.5 * (lo + hi))


def bf_truncated(row: np.ndarray, label: int, k: int) -> float:
    a = np.sort(_others(row, label))[::-1]
    return float(np.log1p(np.exp(a[k - 1 :]).sum()))


def _mean(fn, s: torch.Tensor, y: torch.Tensor, *args) -> float:
    return float(np.mean([fn(r, int(lab), *args) for r, lab in zip(s.numpy(), y.numpy())]))


# ------------------------------------------------------------------------------------ definitions
@pytest.mark.parametrize("variant", ["alpha", "beta"])
@pytest.mark.parametrize("n", [2, 5, 8])
def test_hard_svm_matches_subset_enumeration(variant: str, n: int) -> None:
    s, y = _data(n, 16, n, scale=1.0)
    for k in range(1, n):
        got = build_loss(f"lapin_svm_{variant}", n, k=k)(s, y).item()
        assert got == pytest.approx(_mean(bf_hard, s, y, k, variant), abs=1e-12), k


@pytest.mark.parametrize("variant", ["alpha", "beta"])
@pytest.mark.parametrize("gamma", [0.3, 1.0, 4.0])
def test_smooth_svm_matches_active_set_enumeration(variant: str, gamma: float) -> None:
    n = 5
    s, y = _data(int(gamma * 10), 6, n, scale=1.5)
    for k in range(1, n):
        got = build_loss(f"lapin_svm_{variant}", n, k=k, gamma=gamma)(s, y).item()
        ref = _mean(bf_smooth, s, y, k, gamma, variant)
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-9), k


@pytest.mark.parametrize("variant", ["alpha", "beta"])
def test_smooth_svm_tends_to_hard(variant: str) -> None:
    s, y = _data(3, 32, 10)
    for k in (1, 3, 5):
        hard = build_loss(f"lapin_svm_{variant}", 10, k=k)(s, y).item()
        gaps = [hard - build_loss(f"lapin_svm_{variant}", 10, k=k, gamma=g)(s, y).item()
                for g in (1.0, 1e-2, 1e-5)]
        assert all(gap >= -1e-12 for gap in gaps)  # smoothing lowers the loss
        assert gaps[0] >= gaps[1] >= gaps[2] and gaps[2] < 1e-5


def test_smooth_svm_float32_close_to_float64() -> None:
    s, y = _data(5, 64, 100, scale=3.0)
    for name in SVMS:
        loss = build_loss(name, 100, k=5, gamma=0.5)
        got32 = loss(s.float(), y)
        assert got32.dtype == torch.float32
        assert got32.item() == pytest.approx(loss(s, y).item(), rel=1e-5)


@pytest.mark.parametrize("n", [2, 4, 6])
def test_topk_entropy_matches_nested_search(n: int) -> None:
    s, y = _data(40 + n, 6, n, scale=2.0)
    for k in range(1, n):
        got = build_loss("lapin_entropy", n, k=k)(s, y).item()
        assert got == pytest.approx(_mean(bf_topk_entropy, s, y, k), rel=1e-8, abs=1e-10), k


def test_topk_entropy_decreases_in_k_and_k1_is_ce() -> None:
    s, y = _data(7, 32, 20, scale=3.0)
    ce = F.cross_entropy(s, y).item()
    vals = [build_loss("lapin_entropy", 20, k=k)(s, y).item() for k in range(1, 20)]
    assert vals[0] == pytest.approx(ce, rel=1e-13)
    assert all(a >= b - 1e-12 for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("n", [2, 5, 9])
def test_truncated_entropy_matches_sorting(n: int) -> None:
    s, y = _data(60 + n, 16, n)
    for k in range(1, n):
        got = build_loss("lapin_truncated_entropy", n, k=k)(s, y).item()
        assert got == pytest.approx(_mean(bf_truncated, s, y, k), rel=1e-12), k
    ce = F.cross_entropy(s, y).item()
    assert build_loss("lapin_truncated_entropy", n, k=1)(s, y).item() == pytest.approx(ce)


# ------------------------------------------------------------------------------------- robustness
CONFIGS = [
    ("lapin_svm_alpha", {"k": 3}), ("lapin_svm_alpha", {"k": 3, "gamma": 1.0}),
    ("lapin_svm_beta", {"k": 3}), ("lapin_svm_beta", {"k": 3, "gamma": 0.5}),
    ("lapin_entropy", {"k": 3}), ("lapin_entropy", {"k": 1}),
    ("lapin_truncated_entropy", {"k": 3}),
]


@pytest.mark.parametrize("name,params", CONFIGS)
def test_gradcheck(name: str, params: dict) -> None:
    s, y = _data(11, 4, 7, scale=1.0)
    s.requires_grad_(True)
    loss = build_loss(name, 7, **params)
    assert torch.autograd.gradcheck(lambda x: loss(x, y), (s,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name,params", CONFIGS)
def test_finite_on_extremes_ties_and_small_inputs(name: str, params: dict) -> None:
    torch.manual_seed(0)
    loss = build_loss(name, 7, **params)
    y = torch.randint(0, 7, (8,))
    cases = [
        torch.randn(8, 7) * 1e4,
        torch.full((8, 7), 1e4),
        torch.randint(-1, 2, (8, 7)).float(),
        torch.zeros(8, 7),
    ]
    big = torch.randn(8, 7)
    big[:, 0], big[:, 1] = 1e4, -1e4
    cases.append(big)
    for s in cases:
        s = s.clone().requires_grad_(True)
        out = loss(s, y)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(s.grad).all(), s
    one = torch.randn(1, 7, requires_grad=True)
    assert torch.isfinite(loss(one, y[:1]))
    small = build_loss(name, 2, **{**params, "k": 1})
    s2 = torch.tensor([[3.0, -1.0], [1e4, -1e4], [0.0, 0.0]], requires_grad=True)
    out = small(s2, torch.tensor([0, 1, 1]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s2.grad).all()


def test_ties_match_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    s = torch.randint(-2, 3, (12, 5), generator=gen).double() * 0.5
    y = torch.randint(0, 5, (12,), generator=gen)
    for k in (1, 2, 4):
        for variant in ("alpha", "beta"):
            got = build_loss(f"lapin_svm_{variant}", 5, k=k)(s, y).item()
            assert got == pytest.approx(_mean(bf_hard, s, y, k, variant), abs=1e-12)
            ref = _mean(bf_smooth, s[:4], y[:4], k, 1.0, variant)
            got = build_loss(f"lapin_svm_{variant}", 5, k=k, gamma=1.0)(s[:4], y[:4]).item()
            assert got == pytest.approx(ref, rel=1e-9, abs=1e-9)
        got = build_loss("lapin_entropy", 5, k=k)(s[:4], y[:4]).item()
        assert got == pytest.approx(_mean(bf_topk_entropy, s[:4], y[:4], k), rel=1e-8)


@pytest.mark.parametrize("name", LAPIN)
def test_invalid_k_raises(name: str) -> None:
    for bad_k in (10, 11):
        with pytest.raises(ValueError, match="k="):
            build_loss(name, 10, k=bad_k)
    with pytest.raises(RegistryError):
        build_loss(name, 10, k=0)


@pytest.mark.parametrize("cls", [TopKSVMAlpha, TopKSVMBeta])
def test_bad_gamma_rejected(cls) -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gamma"):
            cls(10, k=2, gamma=bad)
    with pytest.raises(RegistryError, match="gamma"):
        build_loss("lapin_svm_alpha", 10, gamma=-0.5)
    assert isinstance(TopKEntropy(3, k=2), torch.nn.Module)
    assert isinstance(TruncatedTopKEntropy(3, k=2), torch.nn.Module)


@pytest.mark.parametrize("scale", [1e-3, 0.3, 3.0, 30.0])
def test_projection_optimality_certificate_large_n(scale: float) -> None:
    """x = proj_C(v) iff x ∈ C and ⟨v − x, z − x⟩ ≤ 0 for every vertex z of C (covers the
    partial-sort fast path and, for clustered values, its full-sort fallback)."""
    gen = torch.Generator().manual_seed(int(scale * 1000))
    v = 1.0 + torch.randn(64, 300, generator=gen, dtype=torch.float64) * scale
    v[:8] -= 1.5  # rows with an inactive budget (cone case of Δ_k^α)
    v[8:16] = 1e-4 * (1.0 + 0.1 * v[8:16])  # inactive budget, support wider than the fast path
    for k in (1, 5, 40):
        for variant, proj in (("alpha", project_topk_simplex), ("beta", project_capped_simplex)):
            x = proj(v, k)
            tot = x.sum(1)
            assert x.min() >= 0 and tot.max() <= 1 + 1e-12
            cap = tot / k if variant == "alpha" else torch.full_like(tot, 1.0 / k)
            assert (x - cap[:, None]).max() <= 1e-12
            r = v - x
            at_x = (r * x).sum(1)
            top = r.topk(k, dim=1).values
            best_vertex = top.sum(1) / k if variant == "alpha" else top.clamp(min=0).sum(1) / k
            assert (torch.maximum(best_vertex, torch.zeros_like(at_x)) - at_x).max() <= 1e-9
