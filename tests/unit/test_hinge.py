"""Crammer-Singer and Yang-Koyejo calibrated hinge against numpy brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import losses  # noqa: F401  (registers the losses)
from harness import build_loss
from harness.registry import RegistryError
from losses.hinge import CalibratedHinge, CrammerSinger


def np_crammer_singer(s: np.ndarray, y: np.ndarray) -> float:
    out = []
    for row, label in zip(s, y):
        margins = [1.0 + row[j] - row[label] for j in range(len(row)) if j != label]
        out.append(max(0.0, max(margins)))
    return float(np.mean(out))


def np_calibrated_hinge(s: np.ndarray, y: np.ndarray, k: int) -> float:
    """(1 + s_[k+1] − s_y)_+ with s_[k+1] the (k+1)-th largest of the whole score vector."""
    out = []
    for row, label in zip(s, y):
        kth1 = sorted(row.tolist(), reverse=True)[k]
        out.append(max(0.0, 1.0 + kth1 - row[label]))
    return float(np.mean(out))


def _data(seed: int, b: int, n: int, tied: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if tied:
        s = torch.randint(-2, 3, (b, n), generator=gen).double() * 0.5
    else:
        s = torch.randn(b, n, generator=gen, dtype=torch.float64) * 2
    return s, torch.randint(0, n, (b,), generator=gen)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n", [2, 5, 13])
def test_crammer_singer_matches_numpy(n: int, tied: bool) -> None:
    s, y = _data(n + 10 * tied, 32, n, tied)
    got = build_loss("crammer_singer", n)(s, y).item()
    assert got == pytest.approx(np_crammer_singer(s.numpy(), y.numpy()), rel=1e-12, abs=1e-12)
    got32 = build_loss("crammer_singer", n)(s.float(), y)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(got, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n", [2, 6, 13])
def test_calibrated_hinge_matches_numpy(n: int, tied: bool) -> None:
    s, y = _data(n + 20 * tied, 32, n, tied)
    for k in range(1, n):
        got = build_loss("calibrated_hinge", n, k=k)(s, y).item()
        ref = np_calibrated_hinge(s.numpy(), y.numpy(), k)
        assert got == pytest.approx(ref, rel=1e-12, abs=1e-12), k


def test_calibrated_hinge_uses_full_score_vector() -> None:
    """With y ranked inside the top k the reference is (k+1)-th of all scores, not of s without y."""
    s = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]], dtype=torch.float64)
    # k = 2, y = 0: s_[3] = 3 -> 1 + 3 - 5 < 0 -> 0; y = 3: 1 + 3 - 2 = 2.
    loss = build_loss("calibrated_hinge", 5, k=2)
    assert loss(s, torch.tensor([0])).item() == 0.0
    assert loss(s, torch.tensor([3])).item() == pytest.approx(2.0)
    assert loss(s, torch.tensor([2])).item() == pytest.approx(1.0)


@pytest.mark.parametrize("name,params", [("crammer_singer", {}), ("calibrated_hinge", {"k": 2})])
def test_gradcheck(name: str, params: dict) -> None:
    s = torch.tensor(
        [[0.3, -1.2, 2.1, 0.9, -0.4, 1.5], [1.1, 0.2, -0.7, 2.4, -1.9, 0.6]], dtype=torch.float64, requires_grad=True
    )
    y = torch.tensor([1, 3])
    loss = build_loss(name, 6, **params)
    assert torch.autograd.gradcheck(lambda t: loss(t, y), (s,))


@pytest.mark.parametrize("name,params", [("crammer_singer", {}), ("calibrated_hinge", {"k": 1})])
def test_edge_cases_finite(name: str, params: dict) -> None:
    for s, y in [
        (torch.zeros(3, 4), torch.tensor([0, 1, 3])),
        (torch.randn(1, 4), torch.tensor([2])),
        (torch.tensor([[1.0, 1.0]]), torch.tensor([1])),
        (torch.randn(2, 4) * 1e4, torch.tensor([0, 3])),
    ]:
        s = s.clone().requires_grad_(True)
        value = build_loss(name, s.shape[1], **params)(s, y)
        (g,) = torch.autograd.grad(value, s)
        assert value.ndim == 0 and torch.isfinite(value) and torch.isfinite(g).all()


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        CalibratedHinge(5, k=5)
    with pytest.raises(ValueError):
        CalibratedHinge(5, k=0)
    with pytest.raises(ValueError):
        build_loss("calibrated_hinge", 3, k=3)
    with pytest.raises(ValueError):
        CrammerSinger(1)
    with pytest.raises(RegistryError):
        build_loss("crammer_singer", 5, k=2)
