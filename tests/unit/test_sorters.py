"""Top-K rows of the relaxed permutation from every sorter."""
import pytest
import torch

from losses.difftopk.networks import TorchNetwork
from losses.difftopk.sinkhorn import sinkhorn_topk
from losses.difftopk.sorters import (
    network_topk,
    neuralsort_topk,
    softsort_topk,
    topk_readout,
)

K = 3


def _hard(x, k):
    idx = x.topk(k, dim=1).indices.flip(1)  # ascending among the top-k
    return torch.nn.functional.one_hot(idx, x.shape[1]).float()  # [B, k, n]


@pytest.mark.parametrize("kind,n", [("odd_even", 13), ("bitonic", 16), ("bitonic", 8), ("splitter_selection", 13),
                                     ("splitter_selection", 16)])
def test_network_high_temperature_is_hard_topk(kind, n):
    torch.manual_seed(0)
    x = torch.randperm(n).float().unsqueeze(0).repeat(3, 1)
    x[1] = x[1].flip(0)
    x[2] = x[2][torch.randperm(n)]
    P = network_topk(x, TorchNetwork(kind, n, K), topk_readout(n, K, x.dtype, x.device), 1e4, "logistic", 0.5)
    assert torch.allclose(P, _hard(x, K), atol=1e-4)


@pytest.mark.parametrize("fn", [neuralsort_topk, softsort_topk])
def test_relaxed_high_temperature_is_hard_topk(fn):
    x = torch.randperm(15).float().view(1, -1)
    assert torch.allclose(fn(x, K, 1e3), _hard(x, K), atol=1e-4)


def test_sinkhorn_high_temperature_is_hard_topk():
    x = torch.randperm(8).float().view(1, -1)
    P = sinkhorn_topk(x, K, 10.0, 500, 1e-6)
    assert torch.allclose(P, _hard(x, K), atol=1e-2)


def test_sinkhorn_full_rows_and_columns_sum_to_one():
    x = torch.randn(4, 12)
    P = sinkhorn_topk(x, 12, 0.3, 200, 1e-5)  # full sort: [B, n, n]
    assert P.shape == (4, 12, 12)
    assert torch.allclose(P.sum(1), torch.ones(4, 12), atol=1e-4)
    assert torch.allclose(P.sum(2), torch.ones(4, 12), atol=1e-4)


def test_sinkhorn_topk_columns_sum_to_one():
    P = sinkhorn_topk(torch.randn(4, 16), 5, 0.1, 50, 1e-4)
    assert torch.allclose(P.sum(2), torch.ones(4, 5), atol=1e-3)
    assert (P.sum(1) <= 1 + 1e-3).all()


def test_network_rows_are_distributions():
    x = torch.randn(5, 37)
    for kind in ("odd_even", "bitonic", "splitter_selection"):
        P = network_topk(x, TorchNetwork(kind, 37, 4), topk_readout(37, 4, x.dtype, x.device), 1.0, "cauchy", .5)
        assert torch.allclose(P.sum(2), torch.ones(5, 4), atol=1e-5)


@pytest.mark.parametrize("kind", ["odd_even", "bitonic", "splitter_selection"])
@pytest.mark.parametrize("dist", ["logistic_phi", "gaussian", "optimal"])
def test_label_mass_backward_equals_autograd_through_the_rows(kind, dist):
    """The hand-written label-mass pass equals reading the label's entry off the top-K rows (autograd)."""
    from losses.difftopk.label_mass import network_label_mass

    torch.manual_seed(2)
    n, weights = 13, torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 5, 12, 7])
    net = TorchNetwork(kind, n, K)
    rows = network_topk(x, net, topk_readout(n, K, x.dtype, x.device), 1.5, dist, 0.5)  # [B, K, n]
    expected = (rows * weights.view(1, -1, 1)).sum(1).gather(1, y[:, None]).squeeze(1)
    got = network_label_mass(x, y, net, weights, 1.5, dist, 0.5)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)
    g_got, = torch.autograd.grad(got.sum(), x)
    g_exp, = torch.autograd.grad(expected.sum(), x)
    assert torch.allclose(g_got, g_exp, rtol=1e-10, atol=1e-12)
