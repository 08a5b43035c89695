"""Top-k transition loss (Sawada et al. 2020, abstract reading): limits, grouped loss, schedules."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses  # noqa: F401  (registers the losses)
from harness import build_loss
from harness.registry import RegistryError, TrainingProgress


def _data(seed: int, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(b, n, generator=gen, dtype=torch.float64) * 2
    return s, torch.randint(0, n, (b,), generator=gen)


def np_grouped(s: np.ndarray, y: np.ndarray, k: int) -> float:
    out = []
    for row, label in zip(s, y):
        top = np.argsort(-row)[:k]
        p = np.exp(row - row.max())
        p /= p.sum()
        out.append(-math.log(p[top].sum()) if label in top else -math.log(p[label]))
    return float(np.mean(out))


def _progress(fraction_pct: int, acc: dict[int, float] | None = None) -> TrainingProgress:
    return TrainingProgress(epoch=fraction_pct // 10, num_epochs=10, step=fraction_pct,
                            steps_per_epoch=10, train_topk_accuracy=acc or {})


def test_lambda_zero_is_ce_and_one_is_grouped() -> None:
    s, y = _data(0, 64, 12)
    y[:8] = s[:8].argmax(1)  # make sure some labels are inside the top-k set
    loss = build_loss("topk_transition", 12, k=3)
    assert loss.lam == 0.0
    assert loss(s, y).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-13)
    const = build_loss("topk_transition", 12, k=3, schedule="constant", lambda_value=1.0)
    assert const.lam == 1.0
    ref = np_grouped(s.numpy(), y.numpy(), 3)
    assert const(s, y).item() == pytest.approx(ref, rel=1e-12)
    mid = build_loss("topk_transition", 12, k=3, schedule="constant", lambda_value=0.3)
    want = 0.7 * F.cross_entropy(s, y).item() + 0.3 * ref
    assert mid(s, y).item() == pytest.approx(want, rel=1e-12)


def test_grouped_is_ce_when_label_outside_top_k() -> None:
    s, y = _data(1, 32, 10)
    y = s.argmin(1)  # never in the top 3
    loss = build_loss("topk_transition", 10, k=3, schedule="constant")
    assert loss(s, y).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-13)


def test_linear_and_step_schedules() -> None:
    lin = build_loss("topk_transition", 10, schedule="linear", start=0.2, end=0.6)
    step = build_loss("topk_transition", 10, schedule="step", start=0.2, end=0.6)
    for pct, want_lin, want_step in [(0, 0.0, 0.0), (20, 0.0, 0.0), (40, 0.5, 0.0),
                                     (50, 0.75, 0.0), (60, 1.0, 1.0), (99, 1.0, 1.0)]:
        lin.on_progress(_progress(pct))
        step.on_progress(_progress(pct))
        assert lin.lam == pytest.approx(want_lin) and step.lam == want_step, pct
    jump = build_loss("topk_transition", 10, schedule="linear", start=0.3, end=0.3)
    jump.on_progress(_progress(29))
    assert jump.lam == 0.0
    jump.on_progress(_progress(30))
    assert jump.lam == 1.0


def test_adaptive_and_constant_schedules() -> None:
    ada = build_loss("topk_transition", 10, k=5, schedule="adaptive", adaptive_target=0.8)
    ada.on_progress(_progress(0))  # no accuracy yet
    assert ada.lam == 0.0
    ada.on_progress(_progress(5, {1: 0.9, 5: 0.4}))
    assert ada.lam == pytest.approx(0.5)
    ada.on_progress(_progress(11, {5: 0.2}))  # running accuracy dips: λ stays
    assert ada.lam == pytest.approx(0.5)
    ada.on_progress(_progress(20, {5: 0.95}))
    assert ada.lam == 1.0
    const = build_loss("topk_transition", 10, schedule="constant", lambda_value=0.25)
    for pct in (0, 50, 99):
        const.on_progress(_progress(pct))
        assert const.lam == 0.25


def test_gradcheck_and_extremes() -> None:
    s, y = _data(2, 4, 6)
    s.requires_grad_(True)
    loss = build_loss("topk_transition", 6, k=2, schedule="constant", lambda_value=0.5)
    assert torch.autograd.gradcheck(lambda x: loss(x, y), (s,), eps=1e-6, atol=1e-5)
    torch.manual_seed(0)
    y = torch.randint(0, 6, (8,))
    for x in (torch.randn(8, 6) * 1e4, torch.full((8, 6), -1e4),
              torch.randint(-1, 2, (8, 6)).float()):
        x = x.requires_grad_(True)
        out = loss(x, y)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    assert torch.isfinite(loss(torch.randn(1, 6), y[:1]))
    small = build_loss("topk_transition", 2, k=1, schedule="constant")
    assert torch.isfinite(small(torch.tensor([[1e4, -1e4], [0.0, 0.0]]), torch.tensor([1, 0])))
    assert small(torch.randn(3, 2), torch.tensor([0, 1, 0])).dtype == torch.float32


def test_invalid_params() -> None:
    for k in (10, 12):
        with pytest.raises(ValueError, match="k="):
            build_loss("topk_transition", 10, k=k)
    with pytest.raises(ValueError, match="start"):
        build_loss("topk_transition", 10, start=0.7, end=0.5)
    with pytest.raises(RegistryError, match="did you mean"):
        build_loss("topk_transition", 10, schedule="linaer")
    with pytest.raises(RegistryError):
        build_loss("topk_transition", 10, adaptive_target=0.0)
