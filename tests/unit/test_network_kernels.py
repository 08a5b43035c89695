"""The compiled CPU label-mass pass of the difftopk networks (losses.difftopk.network_kernels) against the torch path."""
from __future__ import annotations

import pytest
import torch

import harness
import losses  # noqa: F401
from losses.difftopk import loss as loss_module
from losses.difftopk.label_mass import compiled_label_mass, network_label_mass, torch_label_mass
from losses.difftopk.networks import NETWORKS, TorchNetwork
from losses.difftopk.relaxations import DISTRIBUTIONS

SHAPES = [(16, 5), (13, 3), (20, 1), (9, 4), (2, 1)]  # (n, K): powers of two and not, K = 1, n = 2K + 1, n = 2K


def _both(x, y, net, w, steepness, dist, lam):
    out = {}
    for name, fn in (("torch", torch_label_mass), ("compiled", compiled_label_mass)):
        xx = x.detach().clone().requires_grad_()
        v = fn(xx, y, net, w, steepness, dist, lam)
        g, = torch.autograd.grad((v * torch.linspace(0.5, 1.5, v.shape[0], dtype=v.dtype)).sum(), xx)
        out[name] = (v.detach(), g)
    return out["torch"], out["compiled"]


def _close(a, b, tol):
    """|a − b| ≤ tol · max(1, max |b|)."""
    return (a.double() - b.double()).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("kind", NETWORKS)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_compiled_equals_torch_float64_and_float32(kind, dist):
    g = torch.Generator().manual_seed(sum(map(ord, kind + dist)))
    for n, k in SHAPES:
        net = TorchNetwork(kind, n, k)
        w = torch.rand(k, generator=g, dtype=torch.float64)
        for scale, steepness, lam in ((1.0, 1.0, 0.5), (3.0, 2.5, 0.3), (30.0, 0.3, 1.0), (1e-3, 7.0, 0.0)):
            x = torch.randn(12, n, generator=g, dtype=torch.float64) * scale
            if lam < 1:  # (λ = 1: α jumps at a tie, and values equal up to rounding compare either way)
                x[0] = x[0, 0]  # every value tied
                x[1, ::2] = x[1, 1]  # half of them tied
            y = torch.randint(0, n, (12,), generator=g)
            (vt, gt), (vc, gc) = _both(x, y, net, w, steepness, dist, lam)
            assert _close(vc, vt, 1e-12) and _close(gc, gt, 1e-11), (n, k, scale)
            # float32 runs in float64 and rounds once: within float32 rounding of the float64 torch result
            (_, _), (vc32, gc32) = _both(x.float(), y, net, w, steepness, dist, lam)
            assert vc32.dtype == gc32.dtype == torch.float32
            assert _close(vc32, vt, 1e-6) and _close(gc32, gt, 1e-6), (n, k, scale)


@pytest.mark.parametrize("kind", NETWORKS)
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_compiled_gradcheck_float64(kind, dist):
    torch.manual_seed(3)
    n, k = 11, 3
    net = TorchNetwork(kind, n, k)
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    x = (torch.randn(3, n, dtype=torch.float64) * 0.7).requires_grad_()
    y = torch.tensor([0, 4, 10])
    assert torch.autograd.gradcheck(lambda s: compiled_label_mass(s, y, net, w, 1.3, dist, 0.4), (x,))


def test_dispatch_cpu_compiled_other_dtypes_torch():
    net = TorchNetwork("bitonic", 8, 2)
    w = torch.tensor([0.5, 1.0], dtype=torch.float64)
    y = torch.tensor([1, 6])
    for dtype in (torch.float32, torch.float64):
        v = network_label_mass(torch.randn(2, 8, dtype=dtype, requires_grad=True), y, net, w, 1.0, "logistic", 0.5)
        assert type(v.grad_fn).__name__ == "CompiledLabelMassBackward" and v.dtype == dtype
    v = network_label_mass(torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True), y, net, w, 1.0, "logistic", .5)
    assert type(v.grad_fn).__name__ == "_NetworkLabelMassBackward"


def test_hard_limit_and_nan():
    """Steep relaxation: the label's mass is the weight of its hard rank; a NaN score gives NaN, not an error."""
    net = TorchNetwork("odd_even", 10, 3)
    w = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    x = torch.arange(10.0, dtype=torch.float64)[torch.randperm(10, generator=torch.Generator().manual_seed(0))]
    x = x.repeat(10, 1)
    y = torch.arange(10)
    v = compiled_label_mass(x, y, net, w, 1e4, "logistic", 0.5)
    rank = (x > x.gather(1, y[:, None])).sum(1)  # 0 = largest
    expected = torch.where(rank < 3, w.flip(0)[rank.clamp(max=2)], torch.zeros(()))
    assert torch.allclose(v, expected, atol=1e-9)
    x[0, 0] = float("nan")
    assert torch.isnan(compiled_label_mass(x, y, net, w, 1.0, "logistic", 0.5)[0])


@pytest.mark.parametrize("sorter", NETWORKS)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_loss_compiled_equals_torch_path(sorter, scale, monkeypatch):
    """The whole loss at n = 1000, m = 16 (the benchmarked configuration), float32 and float64."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(32, 1000, generator=g, dtype=torch.float64) * scale).float().double()  # float32-exact
    y = torch.randint(0, 1000, (32,), generator=g)
    loss = harness.build_loss("difftopk", 1000, sorter=sorter, m=16)
    results = {}
    for path in ("compiled", "torch"):
        if path == "torch":
            monkeypatch.setattr(loss_module, "network_label_mass", torch_label_mass)
        for dtype in (torch.float64, torch.float32):
            xx = x.detach().to(dtype).clone().requires_grad_()
            v = loss(xx, y)
            v.backward()
            results[path, dtype] = (v.detach(), xx.grad)
    (v, g64), (vt, gt) = results["compiled", torch.float64], results["torch", torch.float64]
    assert _close(v, vt, 1e-12) and _close(g64, gt, 1e-12)
    v32, g32 = results["compiled", torch.float32]
    assert _close(v32, vt, 1e-6) and _close(g32, gt, 1e-6)  # (the torch path's float32 is off by up to ~1e-4)


def test_flat_keeps_only_comparators_that_reach_the_readout():
    net = TorchNetwork("odd_even", 16, 5)
    total = sum(len(layer[0]) for layer in net.layers)
    assert net.flat()[0].shape[0] == 90 < total  # the 30 dropped ones never reach wires 11..15
    assert net.flat(16)[0].shape[0] == total  # every wire read: nothing dropped
    a, b, dmin, dmax = net.flat(1)
    assert (dmax[-1], dmin[-1]) == (15, 14)  # the last comparator feeds the top wire


def test_polynomial_exp_against_libm():
    """The vectorisable exp of the logistic relaxations: ≤ 2 ulp from math.exp where e^x is a normal number,
    clamped beyond (e^x ≥ 3e−308 and ≤ 8e307), NaN kept."""
    import math

    import numpy as np

    from losses.difftopk.network_kernels import _exp

    xs = np.concatenate([np.linspace(-708, 709, 20001), np.random.default_rng(0).normal(0, 5, 20000),
                         [0.0, -0.0, 1e-300, -1e-300, math.log(2) / 2, -math.log(2) / 2]])
    got = np.array([_exp(float(x)) for x in xs])
    want = np.exp(xs)
    assert np.all(np.abs(got - want) <= 2 * np.spacing(want))
    assert _exp(-1e4) == _exp(-708.0) > 0 and _exp(1e4) == _exp(709.0) < math.inf
    assert math.isnan(_exp(math.nan))


def test_label_out_of_range_raises():
    net = TorchNetwork("odd_even", 8, 2)
    w = torch.tensor([0.5, 1.0], dtype=torch.float64)
    for bad in (8, -1):
        with pytest.raises(IndexError, match="out of range"):
            compiled_label_mass(torch.randn(2, 8), torch.tensor([0, bad]), net, w, 1.0, "logistic", 0.5)
