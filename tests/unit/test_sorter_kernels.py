"""The compiled CPU NeuralSort/SoftSort loss of difftopk (losses.difftopk.sorter_kernels) against the torch path."""
from __future__ import annotations

import math

import pytest
import torch

import harness
import losses  # noqa: F401
from losses.difftopk import loss as loss_module

SORTERS = ("neuralsort", "softsort")
MODES = ("sort", "sm", "smce")
P_KS = ([1.0], [0.5, 0.5], [0.0, 1.0], [0.2, 0.0, 0.8], [0.3, 0.3, 0.0, 0.4], [0.2, 0.1, 0.3, 0.0, 0.4],
        [0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0])


def _run(loss, x, y, compiled: bool, monkeypatch):
    """(value, gradient, grad_fn name) of the loss on a copy of x, by the compiled or the torch path."""
    monkeypatch.setattr(loss_module, "COMPILED", compiled)
    xx = x.detach().clone().requires_grad_()
    v = loss(xx, y)
    name = type(v.grad_fn).__name__
    (v * 1.7).backward()  # an incoming gradient other than 1
    return v.detach(), xx.grad, name


def _close(a, b, tol):
    """|a − b| ≤ tol · max(1, max |b| over finite b); NaN where b is NaN, the same infinities where b is infinite."""
    a, b = a.double(), b.double()
    if not (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()) and (a[b.isinf()] == b[b.isinf()]).all()):
        return False
    ok = b.isfinite()
    return (a[ok] - b[ok]).abs().max().item() <= tol * max(1.0, b[ok].abs().max().item()) if ok.any() else True


def _scores(batch, n, scale, generator, ties=False):
    x = torch.randn(batch, n, generator=generator, dtype=torch.float64) * scale
    x = x.float().double()  # float32-exact, so that the float32 run sees the same scores
    if ties:
        x[0] = x[0, 0]  # every score tied
        x[1] = (x[1] / scale).round() * scale  # many ties, among the top ones too
        x[2, : n // 2] = x[2].max()  # the largest score many times
    return x


def _compare(sorter, mode, p_k, m, n, scale, inverse_temperature, monkeypatch, ties=False, seed=0, batch=12):
    """Compiled vs torch path: float64 to 1e-12, float32 (computed in float64, rounded once) to float32 rounding
    of the float64 result (both relative to max(1, the largest entry))."""
    g = torch.Generator().manual_seed(seed)
    x = _scores(batch, n, scale, g, ties)
    y = torch.randint(0, n, (batch,), generator=g)
    loss = harness.build_loss("difftopk", n, sorter=sorter, p_k=p_k, m=m, top1_mode=mode,
                              inverse_temperature=inverse_temperature)
    vt, gt, name_t = _run(loss, x, y, False, monkeypatch)
    vc, gc, name_c = _run(loss, x, y, True, monkeypatch)
    assert (name_t, name_c) == ("MeanBackward0" if mode != "smce" else "AddBackward0", "CompiledSorterLossBackward")
    assert _close(vc, vt, 1e-12) and _close(gc, gt, 1e-12), (sorter, mode, p_k, m, scale, (vc - vt).item())
    vc32, gc32, _ = _run(loss, x.float(), y, True, monkeypatch)
    assert vc32.dtype == gc32.dtype == torch.float32
    assert _close(vc32, vt, 1e-6) and _close(gc32, gt, 1e-6)


@pytest.mark.parametrize("sorter", SORTERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p_k", P_KS, ids=str)
def test_compiled_equals_torch_every_k_and_mode(sorter, mode, p_k, monkeypatch):
    for m, n in ((16, 200), (None, 23)):
        _compare(sorter, mode, p_k, m, n, 3.0, 1.0, monkeypatch, seed=len(p_k))


@pytest.mark.parametrize("sorter", SORTERS)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("inverse_temperature", [0.05, 1.0, 7.0])
def test_compiled_equals_torch_scales_and_temperatures(sorter, scale, inverse_temperature, monkeypatch):
    for mode in MODES:
        _compare(sorter, mode, [0.2, 0.1, 0.3, 0.0, 0.4], 16, 300, scale, inverse_temperature, monkeypatch)


@pytest.mark.parametrize("sorter", SORTERS)
@pytest.mark.parametrize("mode", MODES)
def test_compiled_equals_torch_with_ties(sorter, mode, monkeypatch):
    """Tied scores: sign(0) = 0 in both, and SoftSort's top-K ties resolved as torch.topk resolves them."""
    for m, n in ((16, 100), (None, 20), (6, 40)):
        for seed in range(3):
            _compare(sorter, mode, [0.2, 0.1, 0.3, 0.0, 0.4], m, n, 2.0, 1.5, monkeypatch, ties=True, seed=seed)


@pytest.mark.parametrize("sorter", SORTERS)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_benchmarked_configuration(sorter, scale, monkeypatch):
    """n = 1000, m = 16, the default P_K and top1_mode, batch 64."""
    g = torch.Generator().manual_seed(7)
    x, y = _scores(64, 1000, scale, g), torch.randint(0, 1000, (64,), generator=g)
    loss = harness.build_loss("difftopk", 1000, sorter=sorter, m=16)
    vt, gt, _ = _run(loss, x, y, False, monkeypatch)
    vc, gc, _ = _run(loss, x, y, True, monkeypatch)
    assert _close(vc, vt, 1e-12) and _close(gc, gt, 1e-12)
    assert (gc != 0).sum(1).le(16).all() and (gc != 0).sum().item() > 64 * 8  # only the preselected entries


@pytest.mark.parametrize("sorter", SORTERS)
@pytest.mark.parametrize("mode", MODES)
def test_compiled_gradcheck_float64(sorter, mode):
    torch.manual_seed(2)
    for m, n in ((6, 12), (None, 9)):
        loss = harness.build_loss("difftopk", n, sorter=sorter, p_k=[0.3, 0.2, 0.5], m=m, top1_mode=mode,
                                  inverse_temperature=0.8)
        x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
        y = torch.tensor([0, 4, n - 1])
        assert type(loss(x, y).grad_fn).__name__ == "CompiledSorterLossBackward"
        assert torch.autograd.gradcheck(lambda s, loss=loss, y=y: loss(s, y), (x,))


@pytest.mark.parametrize("sorter", SORTERS)
def test_nan_and_inf_rows_as_the_torch_path(sorter, monkeypatch):
    """A NaN or ±inf score gives what the torch path gives: the same NaN pattern, equal numbers elsewhere."""
    for mode in MODES:
        for m, n in ((16, 50), (None, 20)):
            g = torch.Generator().manual_seed(3)
            x, y = _scores(6, n, 1.0, g), torch.randint(0, n, (6,), generator=g)
            x[0, 3] = math.nan
            x[1, y[1]] = math.inf
            x[2, y[2]] = -math.inf
            x[3, (y[3] + 1) % n] = math.inf
            x[4, (y[4] + 1) % n] = -math.inf
            loss = harness.build_loss("difftopk", n, sorter=sorter, m=m, top1_mode=mode)
            for rows in ([0, 5], [1, 5], [2, 5], [3, 5], [4, 5]):  # one odd row with a plain one
                vt, gt, _ = _run(loss, x[rows], y[rows], False, monkeypatch)
                vc, gc, _ = _run(loss, x[rows], y[rows], True, monkeypatch)
                assert _close(vc, vt, 1e-12) and _close(gc, gt, 1e-12), (mode, m, rows, vc, vt)


def test_dispatch():
    """CPU float32/float64 (and bf16, computed in float32) run compiled; NeuralSort above 256 sorted classes and
    the networks do not."""
    y = torch.tensor([1, 6])
    for sorter, n, m, compiled in (("neuralsort", 20, None, True), ("softsort", 300, None, True),
                                   ("neuralsort", 300, 16, True), ("neuralsort", 300, None, False),
                                   ("neuralsort", 300, 257, False), ("odd_even", 20, 16 - 8, False)):
        loss = harness.build_loss("difftopk", n, sorter=sorter, m=m)
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = torch.randn(2, n, dtype=dtype, requires_grad=True)
            v = loss(x, y)
            assert (type(v.grad_fn).__name__ == "CompiledSorterLossBackward") == compiled, (sorter, n, m, dtype)
            v.backward()
            assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_bad_label_and_layouts():
    loss = harness.build_loss("difftopk", 20, sorter="softsort", m=8)
    with pytest.raises((IndexError, RuntimeError)):
        loss(torch.randn(2, 20), torch.tensor([1, 20]))
    with pytest.raises(IndexError, match="out of range"):
        harness.build_loss("difftopk", 20, sorter="neuralsort", m=8)(torch.randn(2, 20), torch.tensor([-1, 2]))
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.tensor([0, 5, 19])
    with torch.no_grad():  # a transposed (non-contiguous) view and no autograd
        assert loss(x.t(), y).item() == pytest.approx(loss(x.t().contiguous(), y).item(), rel=1e-15)
