"""Top-m preselection (losses.select): the compiled CPU selection against torch.topk and a stable sort."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from losses.select import top_other_indices
from losses.topk_ce import preselect


def _reference(s: torch.Tensor, labels: torch.Tensor, count: int) -> np.ndarray:
    """Stable descending order of the other scores (NaN largest, ties by index), first ``count``."""
    rows = []
    for row, y in zip(s.double().numpy(), labels.numpy()):
        key = np.where(np.isnan(row), np.inf, row)
        order = [j for j in np.argsort(-key, kind="stable") if j != y]
        rows.append(order[:count])
    return np.array(rows)


@pytest.mark.parametrize("n,count", [(1000, 15), (10_000, 15), (2000, 65), (100, 31), (40, 15), (17, 15), (20, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_topk_on_random_scores(n, count, dtype):
    g = torch.Generator().manual_seed(n + count)
    s = (torch.randn(64, n, generator=g) * 5).to(dtype)
    labels = torch.randint(0, n, (64,), generator=g)
    idx = top_other_indices(s, labels, count)
    ref = s.scatter(1, labels.unsqueeze(1), float("-inf")).topk(count, dim=1).indices
    assert torch.equal(idx, ref)
    assert np.array_equal(idx.numpy(), _reference(s, labels, count))


def test_ties_infinities_and_nan():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(-3, 4, (32, 1000), generator=g).float()  # many ties (and the chunked path: n ≥ 16·count)
    s[0, 5] = float("inf")
    s[1, :] = 2.0  # all equal
    s[2, :] = float("-inf")
    s[3, 7] = float("nan")  # NaN is the largest, as in torch.topk
    s[4, 900:] = float("nan")
    labels = torch.randint(0, 1000, (32,), generator=g)
    labels[0] = 5  # the +inf is the label's own score: left out
    labels[3] = 0
    idx = top_other_indices(s, labels, 15)
    assert np.array_equal(idx.numpy(), _reference(s, labels, 15))
    assert idx[3, 0] == 7 and (idx != labels.unsqueeze(1)).all()


def test_label_is_the_largest_and_preselect_layout():
    s = torch.arange(50.0).repeat(3, 1)
    labels = torch.tensor([49, 0, 25])
    sub, new_labels = preselect(s, labels, 16)
    assert torch.equal(new_labels, torch.zeros(3, dtype=torch.long))
    assert sub[:, 0].tolist() == [49.0, 0.0, 25.0]
    assert sub[0, 1:].tolist() == list(map(float, range(48, 33, -1)))
    assert sub[1, 1:].tolist() == list(map(float, range(49, 34, -1)))


def test_preselect_gradient_reaches_the_selected_scores():
    s = torch.randn(8, 300, generator=torch.Generator().manual_seed(2), requires_grad=True)
    labels = torch.randint(0, 300, (8,))
    sub, _ = preselect(s, labels, 16)
    sub.sum().backward()
    assert int(s.grad.sum()) == 8 * 16 and set(s.grad.unique().tolist()) == {0.0, 1.0}
    assert bool((s.grad.gather(1, labels.unsqueeze(1)) == 1).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_scores_in_the_strided_remainder_and_label_chunk(dtype):
    """n = 1000 reads as 31 complete strides of 32 chunks plus 8 leftover scores: put the largest scores
    there and in the label's strided chunk (labels among them), with ties across chunks."""
    g = torch.Generator().manual_seed(7)
    s = torch.randn(16, 1000, generator=g).to(dtype)
    s[:, 992:] += 10  # the leftover scores are the largest
    s[:, 5::32] += 9  # one strided chunk (c = 5) is next
    s[:8, 990:] = 11.0  # ties across chunks and the remainder
    labels = torch.tensor([995, 5, 37, 999, 992, 0, 1, 2] * 2)
    idx = top_other_indices(s, labels, 15)
    assert np.array_equal(idx.numpy(), _reference(s, labels, 15))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("step", [0.0, 0.05, 0.25, 1.0])
def test_ties_among_few_candidates_and_the_label_above_the_threshold(dtype, step):
    """Scores rounded to a grid (ties near the top, yet few candidates above the threshold, so the rank
    placement decides their order) and labels on some rows' largest scores, which must stay out."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(128, 1000, generator=g, dtype=torch.float64) * 3
    if step:
        s = torch.round(s / step) * step
    s = s.to(dtype)
    labels = torch.randint(0, 1000, (128,), generator=g)
    labels[::3] = s[::3].argmax(1)  # the label is a candidate, then it must not count
    labels[1::3] = s[1::3].argsort(1, descending=True)[:, 20]  # a candidate just below the selection
    for count in (5, 15, 31):
        idx = top_other_indices(s, labels, count)
        assert np.array_equal(idx.numpy(), _reference(s, labels, count)), (step, count)
