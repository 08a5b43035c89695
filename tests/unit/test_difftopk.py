"""Parity of losses.difftopk with the reference difftopk.TopKCrossEntropyLoss, and loss properties."""
import contextlib
import io

import pytest
import torch
import torch.nn.functional as F

import harness
import losses  # noqa: F401
from losses.reference_difftopk import install_torch_sparse_shim

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


def _to_double(obj):
    """The reference keeps its network matrices as float32 tensors in nested lists/tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_double(o) for o in obj)
    return obj


def _reference(method, n, m, dist, mode, dtype):
    with contextlib.redirect_stdout(io.StringIO()):
        ref = difftopk.TopKCrossEntropyLoss(method, 2.0, PK, n, m=m, distribution=dist, art_lambda=0.3, top1_mode=mode)
    if dtype == torch.float64 and hasattr(ref, "top_k_net"):
        ref.top_k_net.sorting_network = _to_double(ref.top_k_net.sorting_network)
    return ref


class _TorchWithDoubleFloatTensor:
    """`torch` as the reference's NeuralSort sees it in float64 runs (it hard-codes torch.FloatTensor)."""

    def __getattr__(self, name):
        return getattr(torch, "DoubleTensor" if name == "FloatTensor" else name)


def _value_and_grad(fn, x, y):
    """Loss and gradient; the reference builds some constants with the default dtype (and FloatTensor)."""
    x = x.clone().requires_grad_()
    default, neuralsort_torch = torch.get_default_dtype(), difftopk.neuralsort.torch
    torch.set_default_dtype(x.dtype)
    if x.dtype == torch.float64:
        difftopk.neuralsort.torch = _TorchWithDoubleFloatTensor()
    try:
        value = fn(x, y)
        value.backward()
    finally:
        torch.set_default_dtype(default)
        difftopk.neuralsort.torch = neuralsort_torch
    return value.item(), x.grad


@pytest.mark.parametrize("sorter,dist", list(_cases()))
def test_parity_with_reference(sorter, dist):
    """float64: equal to 1e-9. float32: values to 1e-5 relative; gradients to 1e-5 of their largest entry,
    or, where float32 itself cannot resolve that (many layers, steep relaxations), no further from the
    float64 result than twice the reference's own float32 error (values: than its own error, or 1e-6
    relative: the CPU networks compute float32 scores in float64 and round once)."""
    torch.manual_seed(sum(map(ord, sorter + dist)))
    n = 20
    for m in (None, 16):
        for mode in ("sort", "sm", "smce"):
            x = torch.randn(4, n, dtype=torch.float64)
            y = torch.randint(0, n, (4,))
            mine = harness.build_loss("difftopk", n, sorter=sorter.replace("_dense", ""), p_k=PK, m=m,
                                      top1_mode=mode, inverse_temperature=2.0, distribution=dist, art_lambda=0.3)
            out = {}
            for dtype in (torch.float64, torch.float32):
                ref = _reference(REF[sorter], n, m, dist, mode, dtype)
                out[dtype] = (_value_and_grad(mine, x.to(dtype), y), _value_and_grad(ref, x.to(dtype), y))
            (v64, g64), (r64, rg64) = out[torch.float64]
            (v32, g32), (r32, rg32) = out[torch.float32]
            scale = rg64.abs().max().item()
            assert v64 == pytest.approx(r64, rel=1e-9) and (g64 - rg64).abs().max() <= 1e-9 * scale, (m, mode)
            if v32 != pytest.approx(r32, rel=1e-5):  # the compiled networks run float32 in float64 (exact-er)
                assert abs(v32 - r64) <= max(abs(r32 - r64), 1e-6 * abs(r64)), (m, mode, v32, r32, r64)
            ref_noise = (rg32.double() - rg64).abs().max().item()  # the reference's own float32 error
            if (g32 - rg32).abs().max().item() > 1e-5 * scale:
                assert (g32.double() - rg64).abs().max().item() <= 2 * ref_noise, (m, mode, ref_noise)


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
    # Sinkhorn's gradient is implicit (exact at the fixed point): converge fully before comparing
    loss = harness.build_loss("difftopk", 10, sorter=sorter, p_k=[0.5, 0.5], top1_mode="sort",
                              distribution="logistic", sinkhorn_iterations=3000, sinkhorn_tolerance=1e-13)
    x = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 7])
    assert torch.autograd.gradcheck(lambda s: loss(s, y), (x,))
