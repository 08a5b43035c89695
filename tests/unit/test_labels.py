"""Label noise and class-balanced subsets: exact, seeded, vectorised."""
from __future__ import annotations

import pytest
import torch

from harness.data.labels import (
    balanced_subset, block_groups, group_noise, per_class_rank, stratified_split,
)


def _labels(n_per_class: int, classes: int = 100) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(n_per_class)[torch.randperm(classes * n_per_class)]


@pytest.mark.parametrize("p", [0.2, 0.4, 0.6, 0.8])
def test_block5_noise_rate_and_blocks(p):
    y = _labels(1000)  # N = 100 000
    noisy, changed = group_noise(y, block_groups(100, 5), p, torch.Generator().manual_seed(0))
    n = len(y)
    expected = p * 4 / 5 * n
    assert abs(int(changed.sum()) - expected) < 4 * (n * p * 0.8 * (1 - p * 0.8)) ** 0.5
    assert torch.equal(changed, noisy != y)
    assert torch.equal(noisy // 5, y // 5)  # every label stays in its block of 5
    again, _ = group_noise(y, block_groups(100, 5), p, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)  # seeded
    other, _ = group_noise(y, block_groups(100, 5), p, torch.Generator().manual_seed(1))
    assert not torch.equal(noisy, other)


def test_redraw_is_uniform_within_group_and_zero_noise_is_identity():
    y = torch.zeros(50000, dtype=torch.long)
    noisy, _ = group_noise(y, block_groups(100, 5), 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(noisy, minlength=5)[:5].float() / len(y)
    assert torch.allclose(counts, torch.full((5,), 0.2), atol=0.01)
    same, changed = group_noise(y, block_groups(100, 5), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(same, y) and not changed.any()


def test_noise_within_arbitrary_groups_and_short_last_block():
    groups = (torch.arange(100) * 7) % 20  # non-contiguous superclasses of 5
    y = _labels(100)
    noisy, changed = group_noise(y, groups, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(groups[noisy], groups[y]) and changed.float().mean() > 0.7
    g = block_groups(7, 5)  # blocks {0..4}, {5, 6}
    noisy, _ = group_noise(torch.tensor([5, 6] * 500), g, 1.0, torch.Generator().manual_seed(0))
    assert set(noisy.tolist()) == {5, 6}
    with pytest.raises(ValueError):
        group_noise(y, groups, 1.5, torch.Generator())


def test_per_class_rank_is_a_permutation_within_each_class():
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    r = per_class_rank(y, torch.Generator().manual_seed(0))
    for c, n in ((0, 3), (1, 2), (2, 1)):
        assert sorted(r[y == c].tolist()) == list(range(n))


def test_stratified_split_exact_counts():
    y = _labels(500)
    keep, held = stratified_split(y, 0.05, torch.Generator().manual_seed(0))
    assert len(held) == 2500 and len(keep) == 47500
    assert torch.equal(torch.bincount(y[held]), torch.full((100,), 25))
    assert len(set(keep.tolist()) & set(held.tolist())) == 0
    k2, h2 = stratified_split(y, 0.05, torch.Generator().manual_seed(0))
    assert torch.equal(h2, held) and torch.equal(k2, keep)


def test_balanced_subsets_exact_counts():
    y = _labels(50)
    idx = balanced_subset(y, torch.Generator().manual_seed(0), per_class=7)
    assert torch.equal(torch.bincount(y[idx]), torch.full((100,), 7))
    idx = balanced_subset(y, torch.Generator().manual_seed(0), fraction=0.1)
    assert torch.equal(torch.bincount(y[idx]), torch.full((100,), 5))
    assert len(balanced_subset(y, torch.Generator(), fraction=1.0)) == len(y)
    with pytest.raises(ValueError, match="class 0 has only 50"):
        balanced_subset(y, torch.Generator(), per_class=51)


def test_long_tail_counts_follow_cifar_lt():
    from harness.data.labels import long_tail_counts

    counts = long_tail_counts(500, 100, 100.0)
    assert counts[0] == 500 and counts[-1] == 5 and counts[0] / counts[-1] == 100
    assert (counts[:-1] >= counts[1:]).all()
    # Cao et al.'s LDAM recipe: int(n_max * (1/ratio) ** (c / (C - 1)))
    assert counts.tolist() == [int(500 * 0.01 ** (c / 99)) for c in range(100)]
    assert sum(counts.tolist()) == 10847  # CIFAR-100-LT (ratio 100) has 10 847 training images
    assert long_tail_counts(7, 5, 1.0).tolist() == [7] * 5


def test_long_tail_subset_cuts_per_class_and_empty_classes_raise():
    from harness.data.labels import long_tail_subset
    from harness.errors import DataError

    y = _labels(100, classes=10)
    keep = long_tail_subset(y, 10, 20.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(y[keep], minlength=10)
    assert counts[0] == 100 and counts[-1] == 5 and (counts[:-1] >= counts[1:]).all()
    assert torch.equal(keep, torch.sort(keep).values)
    again = long_tail_subset(y, 10, 20.0, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)
    with pytest.raises(DataError, match="classes empty") as err:
        long_tail_subset(y, 10, 200.0, torch.Generator().manual_seed(0))
    assert "\n" not in str(err.value)
