"""Parity of losses.difftopk with the reference difftopk.TopKCrossEntropyLoss, and loss properties."""
import contextlib
import io

import pytest
import torch
import torch.nn.functional as F

import harness
import losses  # noqa: F401
from harness.lossbench import install_torch_sparse_shim

install_torch_sparse_shim()  # pure-torch torch_sparse.spmm so the reference's sparse networks run
with contextlib.redirect_stdout(io.StringIO()):
    import difftopk  # reference (top-level package)

REF = {"odd_even": "odd_even", "bitonic": "bitonic", "bitonic_dense": "bitonic__non_sparse",
       "splitter_selection": "splitter_selection", "neuralsort": "neuralsort", "softsort": "softsort"}
DISTS = ["cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal"]
PK = [0.2, 0.1, 0.3, 0.0, 0.4]


def _cases():
    for srt in REF:
        dists = DISTS if srt not in ("neuralsort", "softsort") else ["logistic_phi"]
        for d in dists:
            yield srt, d


@pytest.mark.parametrize("sorter,dist", list(_cases()))
def test_parity_with_reference(sorter, dist):
    torch.manual_seed(sum(map(ord, sorter + dist)))
    n = 20
    for m in (None, 16):
        for mode in ("sort", "sm", "smce"):
            x = torch.randn(4, n)
            y = torch.randint(0, n, (4,))
            mine = harness.build_loss("difftopk", n, sorter=sorter.replace("_dense", ""), p_k=PK, m=m,
                                      top1_mode=mode, inverse_temperature=2.0, distribution=dist,
                                      art_lambda=0.3)
            with contextlib.redirect_stdout(io.StringIO()):
                ref = difftopk.TopKCrossEntropyLoss(REF[sorter], 2.0, PK, n, m=m, distribution=dist,
                                                    art_lambda=0.3, top1_mode=mode)
            x1 = x.clone().requires_grad_()
            l1 = mine(x1, y)
            l1.backward()
            x2 = x.clone().requires_grad_()
            l2 = ref(x2, y)
            l2.backward()
            assert abs(l1.item() - l2.item()) <= 1e-5 * abs(l2.item()), (m, mode, l1.item(), l2.item())
            assert (x1.grad - x2.grad).abs().max() <= 1e-5 * x2.grad.abs().max() + 1e-9, (m, mode, (x1.grad - x2.grad).abs().max())


def test_pk_top1_sm_is_cross_entropy():
    x, y = torch.randn(8, 20), torch.randint(0, 20, (8,))
    for sorter in ("odd_even", "neuralsort"):
        loss = harness.build_loss("difftopk", 20, sorter=sorter, p_k=[1.0, 0, 0, 0, 0])
        assert torch.allclose(loss(x, y), F.cross_entropy(x, y), atol=1e-5)


@pytest.mark.parametrize("bad", [dict(p_k=[0.5, 0.6]), dict(p_k=[1.5, -0.5]), dict(m=3), dict(m=20)])
def test_validation(bad):
    with pytest.raises(ValueError):
        harness.build_loss("difftopk", 20, **bad)


def test_n_smaller_than_2k_rejected():
    with pytest.raises(ValueError, match="2K"):
        harness.build_loss("difftopk", 8)


@pytest.mark.parametrize("sorter", ["odd_even", "bitonic", "splitter_selection", "neuralsort", "softsort", "sinkhorn"])
def test_batch_of_one_ties_bf16(sorter):
    loss = harness.build_loss("difftopk", 12, sorter=sorter)
    y = torch.tensor([3])
    for x in (torch.randn(1, 12), torch.zeros(1, 12), torch.tensor([[1.0, 1.0, 2.0, 2.0] * 3])):
        x = x.requires_grad_()
        v = loss(x, y)
        v.backward()
        assert torch.isfinite(v) and torch.isfinite(x.grad).all()
    xb = torch.randn(3, 12, dtype=torch.bfloat16)
    v = loss(xb, torch.tensor([0, 5, 11]))
    assert v.dtype == torch.float32 and torch.isfinite(v)


@pytest.mark.parametrize("sorter", ["odd_even", "bitonic", "splitter_selection", "neuralsort", "softsort", "sinkhorn"])
def test_gradcheck_float64(sorter):
    torch.manual_seed(1)
    loss = harness.build_loss("difftopk", 10, sorter=sorter, p_k=[0.5, 0.5], top1_mode="sort",
                              distribution="logistic", sinkhorn_iterations=10, sinkhorn_tolerance=0.0)
    x = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 7])
    assert torch.autograd.gradcheck(lambda s: loss(s, y), (x,))
