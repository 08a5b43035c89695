"""The plugin contract, checked on every registered loss (a new built-in loss is covered automatically).

Per-family oracles live in the family's own test file; here: scalar output, float32 result for
bf16 input, finite values and gradients on extreme scores, ties, a batch of one and the smallest
class count the loss accepts, float64 gradcheck, and one-line rejection of impossible parameters.
"""
from __future__ import annotations

import pytest
import torch

import harness
import losses  # noqa: F401  (registers the built-ins)

BUILTIN = [e.name for e in harness.list_losses() if e.obj is not None and e.obj.__module__.startswith("losses.")]
# parameters that make each loss valid for a small class count (k < n; difftopk needs n ≥ 2K)
SMALL = {"difftopk": {"p_k": [0.5, 0.5]}}
# the top-k cross-entropies over an operator (losses.topk_ce) need K = len(p_k) < n
TOPK_CE = {"lapsum", "sparse_topk", "soft_topk", "lml"}
SMALL.update({name: {"p_k": [0.5, 0.5]} for name in TOPK_CE})
K_LOSSES = {name for name in BUILTIN if "k" in harness.LOSSES.get(name).params}


def _params(name: str) -> dict:
    params = dict(SMALL.get(name, {}))
    if name in K_LOSSES:
        params["k"] = 1
    return params


def _smallest_n(name: str) -> int:
    return 4 if name == "difftopk" else 3 if name in TOPK_CE else 2


def test_every_builtin_family_is_covered():
    families = {harness.LOSSES.get(n).family for n in BUILTIN}
    assert {"softmax", "berrada", "hinge", "lapin", "transition", "noised", "petersen"} <= families


@pytest.mark.parametrize("name", BUILTIN)
def test_scalar_finite_on_extremes_ties_batch_of_one(name):
    n = 7
    loss = harness.build_loss(name, n, **_params(name))
    torch.manual_seed(0)
    cases = {
        "random": torch.randn(5, n),
        "huge": torch.randn(5, n) * 1e4,
        "ties": torch.zeros(5, n),
        "one": torch.randn(1, n),
        "bf16": torch.randn(5, n).bfloat16(),
    }
    for case, scores in cases.items():
        x = scores.clone().requires_grad_()
        value = loss(x, torch.arange(x.shape[0]) % n)
        value.backward()
        assert value.dim() == 0, case
        assert value.dtype == torch.float32, (case, value.dtype)
        assert torch.isfinite(value) and torch.isfinite(x.grad).all(), case


@pytest.mark.parametrize("name", BUILTIN)
def test_smallest_class_count(name):
    n = _smallest_n(name)
    loss = harness.build_loss(name, n, **_params(name))
    x = torch.randn(3, n, requires_grad=True)
    value = loss(x, torch.tensor([0, 1, n - 1]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", [n for n in BUILTIN if n != "noised_topk"])  # Monte-Carlo: own test
def test_gradcheck_float64(name):
    loss = harness.build_loss(name, 6, **_params(name))
    x = (torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    y = torch.tensor([0, 3, 5])
    assert torch.autograd.gradcheck(lambda s: loss(s, y), (x,), atol=1e-6)


@pytest.mark.parametrize("name", sorted(K_LOSSES))
def test_k_not_below_num_classes_is_rejected_in_one_line(name):
    with pytest.raises(ValueError) as info:
        harness.build_loss(name, 5, k=5)
    assert "\n" not in str(info.value) and "k=5" in str(info.value)
