"""The compiled exact kernel of berrada_smooth (losses/berrada_esp.py): accuracy at every logit scale,
near-hard rows, its fallbacks (float64 redo, log space) and its truncation bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from losses import berrada_esp
from losses.berrada import smooth_topk_svm
from losses.berrada_esp import FLOAT64, OK, esp_constants, esp_ratio, exp_shifted


def _pair(s: torch.Tensor, y: torch.Tensor, k: int, tau: float):
    """(loss, grad) of the compiled path, and of the float64 log-space tree on the same (rounded) scores."""
    sd = s.clone().requires_grad_(True)
    loss = smooth_topk_svm(sd, y, k, 1.0, tau, method="esp")
    (grad,) = torch.autograd.grad(loss.sum(), sd)
    s64 = s.double().requires_grad_(True)
    ref = smooth_topk_svm(s64, y, k, 1.0, tau, method="log")
    (gref,) = torch.autograd.grad(ref.sum(), s64)
    return loss.double(), grad.double(), ref.detach(), gref


def _check(s, y, k, tau, rtol_loss, rtol_grad):
    loss, grad, ref, gref = _pair(s, y, k, tau)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    big = ref > 1e-30  # float32 cannot hold smaller losses to any relative precision
    rel = ((loss - ref).abs() / ref.abs())[big]
    assert rel.max().item() <= rtol_loss, (k, tau, rel.max().item())
    assert ((loss - ref).abs()[~big] <= 1e-30).all()
    assert (grad - gref).norm() <= rtol_grad * gref.norm(), (k, tau, ((grad - gref).norm() / gref.norm()).item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_matches_log_space_at_every_scale(dtype: torch.dtype, k: int) -> None:
    gen = torch.Generator().manual_seed(100 + k)
    tol = (1e-11, 1e-11) if dtype == torch.float64 else (5e-6, 1e-5)
    for n in (40, 1000):
        for scale in (1.0, 3.0, 10.0, 30.0, 100.0):
            for tau in (1.0, 0.1):
                s = (torch.randn(16, n, generator=gen, dtype=torch.float64) * scale).to(dtype)
                y = torch.randint(0, n, (16,), generator=gen)
                _check(s, y, k, tau, *tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_near_hard_rows(dtype: torch.dtype) -> None:
    """Ties at the top, one dominant class, a label far above or below, a huge spread."""
    gen = torch.Generator().manual_seed(7)
    n = 200
    base = torch.randn(8, n, generator=gen, dtype=torch.float64)
    rows = [
        base[0] * 0.0,  # fully tied
        torch.where(torch.arange(n) < 6, 50.0, base[1]),  # six tied at the top, far above the rest
        torch.where(torch.arange(n) == 3, 80.0, base[2]),  # one dominant class
        base[3] * 300.0,  # huge spread
        torch.where(torch.arange(n) < 4, 0.0, -1e4 + base[4]),  # four at the top, the rest hopeless
        base[5] * 3.0 + torch.where(torch.arange(n) % 2 == 0, 20.0, 0.0),  # two tied clusters
    ]
    s = torch.stack(rows).to(dtype)
    for k in (1, 2, 5, 10):
        for y in (torch.zeros(6, dtype=torch.long), torch.full((6,), n - 1)):
            tol = (1e-11, 1e-11) if dtype == torch.float64 else (5e-6, 1e-5)
            _check(s, y, k, 1.0, *tol)
            _check(s, y, k, 0.1, *tol)


def test_rows_take_the_float64_and_log_space_fallbacks() -> None:
    """τ = 0.1 at scale 100 underflows float32 e (status 1); scores ~ 1e4 need log space (status 2)."""
    gen = torch.Generator().manual_seed(11)
    n, k = 500, 5
    s = torch.randn(12, n, generator=gen) * torch.tensor([1.0] * 4 + [100.0] * 4 + [1e4] * 4)[:, None]
    y = torch.randint(0, n, (12,), generator=gen)
    scale = 1.0 / (k * 0.1)
    masked = s.scatter(1, y[:, None], float("-inf"))
    m = masked.amax(1, keepdim=True)
    _, status, _ = esp_ratio(exp_shifted(masked, m, y, scale, torch.float32), k, True)
    assert (status[:4] == OK).all() and (status[4:8] == FLOAT64).all() and (status[8:] != OK).all()
    _, status64, _ = esp_ratio(exp_shifted(masked, m, y, scale, torch.float64), k, True)
    assert (status64[:8] == OK).all() and (status64[8:] != OK).all()  # the caller sends these to log space
    _check(s, y, k, 0.1, 5e-6, 1e-5)


def test_truncation_is_exact() -> None:
    """Elements below θ·e_(k) leave σ_k, σ_{k−1} unchanged to float64 precision; ones above count."""
    n, k = 300, 5
    m_top, theta, _ = esp_constants(n - 1, k)
    log_theta = math.log(theta)
    gen = torch.Generator().manual_seed(3)
    a = torch.zeros(2, n, dtype=torch.float64)
    a[:, :k] = -torch.rand(2, k, generator=gen, dtype=torch.float64)  # the k largest, e_(k) = exp(min)
    kth = a[:, :k].min(1, keepdim=True).values
    a[0, k:] = kth[0] + log_theta - 0.01 - torch.rand(n - k, generator=gen, dtype=torch.float64)  # all dropped
    a[1, k:] = kth[1] + log_theta + 45.0 + torch.rand(n - k, generator=gen, dtype=torch.float64)  # kept
    e = a.exp()
    ratio, status, _ = esp_ratio(e, k, False)
    assert (status == OK).all()
    e_top = e.clone()
    e_top[:, k:] = 0.0
    only_top, _, _ = esp_ratio(e_top, k, False)
    assert abs(ratio[0] - only_top[0]) <= 4e-16 * abs(only_top[0])  # the dropped ones change nothing
    assert abs(ratio[1] - only_top[1]) > 1e-10 * abs(only_top[1])  # the kept ones count
    from losses.berrada import log_esp

    ref = log_esp(a, k)
    ref = (ref[:, k] - ref[:, k - 1]).numpy()
    assert np.allclose(ratio, ref, rtol=1e-13, atol=0)


def test_float32_inputs_get_float64_accuracy_in_the_loss() -> None:
    """Small losses (softplus of a very negative argument) keep their relative precision."""
    gen = torch.Generator().manual_seed(5)
    s = torch.randn(64, 100, generator=gen) * 20
    y = torch.randint(0, 100, (64,), generator=gen)
    s[torch.arange(64), y] = s.amax(1) + 40 + torch.rand(64, generator=gen) * 60  # confident and right
    loss, _, ref, _ = _pair(s, y, 5, 1.0)
    assert (ref < 1e-3).all() and (ref > 1e-30).all()
    assert ((loss - ref).abs() / ref).max() <= 2e-6


def test_kernel_limits_and_auto_above_them() -> None:
    s = torch.randn(4, 60, dtype=torch.float64)
    y = torch.tensor([0, 5, 10, 59])
    with pytest.raises(ValueError, match="esp"):
        smooth_topk_svm(s, y, berrada_esp.KMAX + 1, 1.0, 1.0, method="esp")
    k = berrada_esp.KMAX + 1  # auto falls back to Newton's identities / the trees
    auto = smooth_topk_svm(s, y, k, 1.0, 1.0)
    ref = smooth_topk_svm(s, y, k, 1.0, 1.0, method="log")
    assert torch.allclose(auto, ref, rtol=1e-10, atol=0)


def test_generated_source_is_checked_before_import(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(berrada_esp, "_KERNELS", {})
    berrada_esp._kernel(1)
    (path,) = (tmp_path / "topk-bench" / "esp_kernels").glob("esp_k1_*.py")
    path.write_text(path.read_text() + "\nraise RuntimeError('tampered')\n")
    monkeypatch.setattr(berrada_esp, "_KERNELS", {})
    berrada_esp._kernel(1)  # rewritten from the generated text, then imported
    assert "tampered" not in path.read_text()
    assert path.read_text() == berrada_esp._source(1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_thresholds_are_the_mth_largest_class_maximum(dtype) -> None:
    """The branch-free selection: the m_top-th largest of the residue-class maxima and the tail elements
    (NumPy's sort as the oracle), with ties, 0 when there are fewer values, NaN when one is NaN."""
    thresholds = berrada_esp._compiled_helpers()[2]
    rng = np.random.default_rng(0)
    res = berrada_esp.RESIDUES
    for n, m_top in ((1000, 10), (1000, 32), (64, 2), (130, 20), (40, 12), (5, 10), (200, 1)):
        e = rng.random((9, n)).astype(dtype)
        e[1] = np.round(e[1] * 4) / 4  # ties
        e[2] = 0.0
        e[3, n // 2] = np.nan
        out, cls = np.empty(9), np.empty((9, res), dtype)
        thresholds(e, m_top, out, cls)
        ng = n - n % res
        for b in range(9):
            cand = np.concatenate([e[b, :ng].reshape(-1, res).max(0) if ng else e[b, :0], e[b, ng:]]).astype(float)
            if np.isnan(cand).any():
                assert np.isnan(out[b]), (n, m_top, b)
                continue
            want = np.sort(cand)[::-1][m_top - 1] if len(cand) >= m_top else 0.0
            assert out[b] == want, (n, m_top, b, out[b], want)
