"""berrada_smooth's compiled input pass and one-node loss (losses/berrada_shift.py) against the torch pieces they
replace, and the compiled kernel at class counts whose tail and label blocks take the scalar paths."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from losses.berrada import smooth_topk_svm
from losses.berrada_esp import exp_shifted
from losses.berrada_shift import EspLoss, EspMargin, esp_loss, esp_margin, exp_shifted_masked


def _torch_shift(s: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    masked = s.scatter(1, y[:, None], float("-inf"))
    m = masked.amax(1, keepdim=True)
    return exp_shifted(masked, m, y, scale, s.dtype), m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_input_pass_is_bitwise_the_torch_one(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    for n in (2, 10, 64, 65, 130, 1000, 1037):
        for scale in (1.0, 30.0, 1e4):
            s = (torch.randn(40, n, generator=gen, dtype=torch.float64) * scale).to(dtype)
            y = torch.randint(0, n, (40,), generator=gen)
            y[0], y[1] = 0, n - 1  # label in the first block and in the tail
            s[2, y[2]] = 1e6  # the label holds the row's maximum: it must not count
            e, m, a_y = exp_shifted_masked(s, y, 0.2)
            m = torch.from_numpy(m)[:, None]
            e_ref, m_ref = _torch_shift(s, y, 0.2)
            assert torch.equal(m, m_ref) and torch.equal(e, e_ref), (n, scale)
            a_ref = (s.gather(1, y[:, None]).squeeze(1).double() - m_ref.squeeze(1).double()) * 0.2
            assert torch.equal(torch.from_numpy(a_y), a_ref)
            assert e.dtype == dtype


def test_input_pass_nan_and_inf() -> None:
    s = torch.randn(4, 300)
    s[0, 100] = float("nan")  # NaN outside the label: the row's maximum is NaN, as torch.amax
    s[1, :] = float("-inf")
    s[2, 290] = float("inf")  # in the tail
    s[3, 7] = float("nan")  # the label's own NaN is masked out
    y = torch.tensor([5, 3, 1, 7])
    e, m, _ = exp_shifted_masked(s, y, 0.5)
    m = torch.from_numpy(m)[:, None]
    e_ref, m_ref = _torch_shift(s, y, 0.5)
    torch.testing.assert_close(m, m_ref, equal_nan=True)
    torch.testing.assert_close(e, e_ref, equal_nan=True)
    assert torch.isnan(m[0]) and not torch.isnan(m[3])


def _composite(s: torch.Tensor, y: torch.Tensor, k: int, alpha: float, tau: float) -> torch.Tensor:
    """The loss through EspMargin + softplus (autograd through the pieces)."""
    z, ok, grad = esp_margin(s, y, k, 1.0 / (k * tau), True)
    assert bool(ok.all())
    z = EspMargin.apply(s, y, z, ok, grad, 1.0 / (k * tau))
    return (tau * F.softplus(alpha / tau + z)).to(s.dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_one_node_loss_matches_the_composite(dtype: torch.dtype, tol: float) -> None:
    gen = torch.Generator().manual_seed(1)
    for n, k, alpha, tau in ((1000, 5, 1.0, 1.0), (50, 1, 0.5, 0.1), (300, 16, 30.0, 1.0), (7, 6, 1.0, 2.0)):
        for scale in (1.0, 10.0, 30.0):
            s = (torch.randn(24, n, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()
            y = torch.randint(0, n, (24,), generator=gen)
            w = torch.randn(24, generator=gen, dtype=dtype)  # any upstream gradient
            parts, _ = esp_loss(s, y, k, 1.0 / (k * tau), alpha, tau, True)
            assert parts is not None  # every row ok
            out = EspLoss.apply(s, y, *parts, 1.0 / (k * tau), k)
            ref = _composite(s, y, k, alpha, tau)
            g_out, = torch.autograd.grad((out * w).sum(), s)
            g_ref, = torch.autograd.grad((ref * w).sum(), s)
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
            torch.testing.assert_close(g_out, g_ref, rtol=10 * tol, atol=tol * g_ref.abs().max().item())


def test_one_node_loss_gradcheck() -> None:
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 12, (5,), generator=gen)
    for alpha, tau in ((1.0, 1.0), (25.0, 1.0), (1.0, 0.05)):  # softplus' = 1 branch (u > 20) included
        assert torch.autograd.gradcheck(lambda x, a=alpha, t=tau: smooth_topk_svm(x, y, 3, a, t, method="esp"), (s,))


def test_scratch_buffer_is_safe_across_forwards() -> None:
    """Two forwards before one backward (gradient accumulation): each keeps its own gradient."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(16, 500, generator=gen).requires_grad_()
    b = (torch.randn(16, 500, generator=gen) * 10).requires_grad_()
    y = torch.randint(0, 500, (16,), generator=gen)
    la, lb = smooth_topk_svm(a, y, 5, 1.0, 1.0), smooth_topk_svm(b, y, 5, 1.0, 1.0)
    (la.sum() + 2 * lb.sum()).backward()
    for x, w in ((a, 1.0), (b, 2.0)):
        x2 = x.detach().clone().requires_grad_()
        (w * smooth_topk_svm(x2, y, 5, 1.0, 1.0).sum()).backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(smooth_topk_svm(a, y, 5, 1.0, 1.0), la.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_with_the_largest_scores_in_the_tail(dtype: torch.dtype) -> None:
    """The buffer collects from the residue classes and the tail: the top classes placed in each."""
    gen = torch.Generator().manual_seed(4)
    for n in (65, 127, 1037):
        s = torch.randn(12, n, generator=gen, dtype=torch.float64)
        s[:4, -8:] += 6.0  # the top 8 in the tail
        s[4:8, :8] += 6.0  # in the first block
        s[8:, ::64] += 6.0  # in one residue class
        y = torch.randint(0, n, (12,), generator=gen)
        s = s.to(dtype).requires_grad_()
        got = smooth_topk_svm(s, y, 5, 1.0, 1.0, method="esp")
        g_got, = torch.autograd.grad(got.sum(), s)
        s64 = s.detach().double().requires_grad_()
        ref = smooth_topk_svm(s64, y, 5, 1.0, 1.0, method="log")
        g_ref, = torch.autograd.grad(ref.sum(), s64)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(g_got.double(), g_ref, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_second_backward_through_the_same_graph(dtype: torch.dtype) -> None:
    """The first backward hands the kernel's buffer to autograd (scaled in place); a second one through the
    retained graph recomputes it: both give the same gradient, and the first one is not changed."""
    gen = torch.Generator().manual_seed(5)
    s = (torch.randn(16, 300, generator=gen, dtype=torch.float64) * 10).to(dtype).requires_grad_()
    y = torch.randint(0, 300, (16,), generator=gen)
    w = torch.rand(16, generator=gen, dtype=dtype)
    loss = (smooth_topk_svm(s, y, 5, 1.0, 1.0, method="esp") * w).sum()
    first, = torch.autograd.grad(loss, s, retain_graph=True)
    kept = first.clone()
    second, = torch.autograd.grad(2 * loss, s)
    torch.testing.assert_close(second, 2 * kept, rtol=0, atol=0)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    s64 = s.detach().double().requires_grad_()
    ref, = torch.autograd.grad((smooth_topk_svm(s64, y, 5, 1.0, 1.0, method="log") * w.double()).sum(), s64)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(first.double(), ref, rtol=10 * tol, atol=10 * tol)
