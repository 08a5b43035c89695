"""The fused CPU path of topk_transition (losses/transition_kernel.py) against brute force and the torch path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses  # noqa: F401  (registers the losses)
from harness import build_loss
from losses.transition import grouped_topk_ce
from losses.transition_kernel import FusedTransition, top_and_max


def _brute_top(s: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, descending, ties towards the lower index (stable sort)."""
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,k", [(1000, 5), (1000, 1), (1000, 64), (130, 16), (64, 64), (63, 7), (5, 5), (2, 1),
                                 (10000, 10)])
def test_top_and_max_matches_brute_force(dtype: type, n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    for scale in (1.0, 30.0):
        s = (rng.standard_normal((17, n)) * scale).astype(dtype)
        s[3] = np.round(s[3])  # ties
        s[4] = 0.0  # all tied
        s[5, ::-1].sort()  # ascending row: the top is at the end (the tail of the blocks)
        top, m = top_and_max(np.ascontiguousarray(s), k)
        np.testing.assert_array_equal(top, _brute_top(s, k))
        np.testing.assert_array_equal(m, s.max(1))
        assert m.dtype == s.dtype


def test_top_and_max_nan_and_inf_rows() -> None:
    s = np.random.default_rng(0).standard_normal((3, 300)).astype(np.float32)
    s[0, 7] = np.nan
    s[1, :] = -np.inf
    s[2, 250] = np.inf
    top, m = top_and_max(s, 4)
    assert top[0, 0] == 7 and np.isnan(m[0])  # NaN ranks first, as in torch.topk
    assert m[1] == -np.inf and sorted(top[1]) == [0, 1, 2, 3]
    assert top[2, 0] == 250 and m[2] == np.inf


def _torch_path(s: torch.Tensor, y: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    return (1.0 - lam) * F.cross_entropy(s, y, reduction="none") + lam * grouped_topk_ce(s, y, k)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("lam", [1.0, 0.3, 0.0])
def test_fused_matches_torch_path(dtype: torch.dtype, tol: float, lam: float) -> None:
    torch.manual_seed(0)
    for n, k in ((1000, 5), (10, 3), (100, 1), (7, 6), (200, 64)):
        for scale in (1.0, 3.0, 30.0, 1e4):
            s = (torch.randn(33, n, dtype=dtype) * scale).requires_grad_()
            y = torch.randint(0, n, (33,))
            y[:5] = s.detach().topk(k, 1).indices[:5, -1]  # labels inside the top k too
            ref = _torch_path(s, y, k, lam)
            out = FusedTransition.apply(s, y, k, lam)
            g_ref, = torch.autograd.grad(ref.mean(), s)
            g_out, = torch.autograd.grad(out.mean(), s)
            assert out.dtype == dtype
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol * max(1.0, scale))
            torch.testing.assert_close(g_out, g_ref, rtol=tol, atol=tol / 33)


def test_fused_gradcheck_and_upstream_gradient() -> None:
    torch.manual_seed(1)
    s = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 8, 5])
    for lam in (1.0, 0.4):
        assert torch.autograd.gradcheck(lambda x, lam=lam: FusedTransition.apply(x, y, 3, lam), (s,), eps=1e-6, atol=1e-7)
    w = torch.tensor([1.0, -2.0, 0.0, 3.5], dtype=torch.float64)  # any upstream gradient, signs included
    g_out, = torch.autograd.grad((FusedTransition.apply(s, y, 3, 0.4) * w).sum(), s)
    g_ref, = torch.autograd.grad((_torch_path(s, y, 3, 0.4) * w).sum(), s)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-12, atol=1e-14)


def test_module_takes_fused_path_on_cpu_and_torch_path_for_large_k() -> None:
    torch.manual_seed(2)
    s, y = torch.randn(16, 300), torch.randint(0, 300, (16,))
    for k in (5, 100):  # 100 > KMAX: torch.topk
        loss = build_loss("topk_transition", 300, k=k, schedule="constant", lambda_value=0.7)
        torch.testing.assert_close(loss(s, y), _torch_path(s, y, k, 0.7).mean(), rtol=1e-6, atol=1e-6)
    nan = s.clone()
    nan[0, 0] = float("nan")
    assert torch.isnan(build_loss("topk_transition", 300, k=5, schedule="constant")(nan, y))
