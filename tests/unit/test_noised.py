"""Garcin et al. noised top-k hinge: parity with pytopk, availability, robustness."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import losses  # noqa: F401  (registers the losses)
from harness import LOSSES, build_loss
from harness.registry import RegistryError


def _data(seed: int, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(b, n, generator=gen) * 2
    return s, torch.randint(0, n, (b,), generator=gen)


def test_entry_requires_pytopk_and_reports_it_missing(monkeypatch) -> None:
    entry = LOSSES.get("noised_topk")
    assert entry.requires == ("pytopk",)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pytopk" else real(name, *a)
    )
    assert entry.unavailable_reason is not None and "pytopk" in entry.unavailable_reason
    with pytest.raises(RegistryError, match="unavailable"):
        build_loss("noised_topk", 10)


def test_matches_pytopk_balanced() -> None:
    pytopk = pytest.importorskip("pytopk")
    s, y = _data(0, 32, 20)
    for k, eps, ns in [(1, 1.0, 5), (5, 0.1, 3), (3, 2.0, 1)]:
        torch.manual_seed(123)
        got = build_loss("noised_topk", 20, k=k, epsilon=eps, n_sample=ns)(s, y)
        torch.manual_seed(123)
        ref = pytopk.BalNoisedTopK(k=k, epsilon=eps, n_sample=ns)(s, y)
        assert torch.isfinite(got) and got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_matches_pytopk_imbalanced() -> None:
    pytopk = pytest.importorskip("pytopk")
    s, y = _data(1, 32, 6)
    counts = [100, 50, 20, 10, 5, 1]
    torch.manual_seed(7)
    got = build_loss("noised_topk", 6, k=2, imbalanced=True, max_m=0.3, scale=2.0,
                     class_counts=counts)(s, y)
    torch.manual_seed(7)
    ref = pytopk.ImbalNoisedTopK(k=2, epsilon=1.0, max_m=0.3, cls_num_list=counts, scale=2.0)(s, y)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match="class_counts"):
        build_loss("noised_topk", 6, imbalanced=True, k=2, class_counts=[1, 2])


def test_small_epsilon_tends_to_calibrated_hinge() -> None:
    pytest.importorskip("pytopk")
    s, y = _data(2, 64, 10)
    torch.manual_seed(0)
    got = build_loss("noised_topk", 10, k=3, epsilon=1e-6)(s, y).item()
    kth = s.topk(4, dim=1).values[:, 3]
    ref = torch.clamp(1 + kth - s.gather(1, y[:, None]).squeeze(1), min=0).mean().item()
    assert got == pytest.approx(ref, abs=1e-4)


def test_gradcheck_with_fixed_noise() -> None:
    pytest.importorskip("pytopk")
    s, y = _data(3, 4, 6)
    s = s.double().requires_grad_(True)
    loss = build_loss("noised_topk", 6, k=2, epsilon=0.5, n_sample=3)

    def fn(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # same Z at every evaluation: a piecewise-linear function of s
        return loss(x, y)

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-5)


def test_finite_on_extremes_and_small_inputs() -> None:
    pytest.importorskip("pytopk")
    torch.manual_seed(0)
    loss = build_loss("noised_topk", 7, k=3)
    y = torch.randint(0, 7, (8,))
    for x in (torch.randn(8, 7) * 1e4, torch.full((8, 7), 1e4),
              torch.randint(-1, 2, (8, 7)).float()):
        x = x.requires_grad_(True)
        out = loss(x, y)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    assert torch.isfinite(loss(torch.randn(1, 7), y[:1]))
    small = build_loss("noised_topk", 2, k=1)
    assert torch.isfinite(small(torch.tensor([[1e4, -1e4], [0.0, 0.0]]), torch.tensor([1, 0])))


def test_invalid_params() -> None:
    pytest.importorskip("pytopk")
    for k in (10, 11):
        with pytest.raises(ValueError, match="k="):
            build_loss("noised_topk", 10, k=k)
    with pytest.raises(RegistryError, match="epsilon"):
        build_loss("noised_topk", 10, epsilon=0.0)
    with pytest.raises(RegistryError, match="n_sample"):
        build_loss("noised_topk", 10, n_sample=0)
