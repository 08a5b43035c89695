"""Label helpers shared by datasets: seeded label noise, class-balanced and long-tailed subsets.

All functions are vectorised (no Python loop over samples or classes) and draw their random
numbers from an explicit CPU `torch.Generator`, so results depend only on the seed.
"""
from __future__ import annotations

import math

import torch

from harness.errors import DataError


def block_groups(num_classes: int, block: int = 5) -> torch.Tensor:
    """Group id of every class when classes are cut into blocks of `block` consecutive ids.

    This is the noise grouping of Berrada et al.'s code (blocks of 5 on CIFAR-100); the last
    block is shorter when `block` does not divide `num_classes`.
    """
    if block < 1:
        raise ValueError(f"block must be ≥ 1, got {block}")
    return torch.arange(num_classes) // block


def group_noise(
    labels: torch.Tensor, groups: torch.Tensor, p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Redraw each label with probability `p` uniformly among the classes of its group.

    `groups[c]` is the group id of class c. A redrawn label may land on its own class, so the
    expected fraction of *changed* labels is p·(1 − 1/group size) (p·4/5 for blocks of 5).
    Returns (new_labels, changed_mask).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {p}")
    labels = labels.long().cpu()
    groups = groups.long().cpu()
    n = labels.shape[0]
    redraw = torch.rand(n, generator=generator) < p
    u = torch.rand(n, generator=generator)  # drawn even when p = 0 so streams stay aligned
    members = torch.argsort(groups, stable=True)  # classes sorted by group
    size = torch.bincount(groups)  # classes per group
    start = torch.cumsum(size, 0) - size  # first position of each group in `members`
    g = groups[labels]
    pick = start[g] + (u * size[g]).long().clamp_max(size[g] - 1)
    noisy = torch.where(redraw, members[pick], labels)
    return noisy, noisy != labels


def per_class_rank(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random rank 0..n_c−1 of every sample within its class (a seeded per-class shuffle)."""
    labels = labels.long().cpu()
    perm = torch.randperm(labels.shape[0], generator=generator)
    order = perm[torch.argsort(labels[perm], stable=True)]  # grouped by class, random within
    counts = torch.bincount(labels)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(labels.shape[0]) - start[labels[order]]
    return rank


def stratified_split(
    labels: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (kept, held_out) holding out round(n_c·fraction) samples of each class c.

    Both index tensors are sorted. Used for CIFAR-100's 95/5 train/val split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    labels = labels.long().cpu()
    counts = torch.bincount(labels)
    held = torch.round(counts.double() * fraction).long()
    rank = per_class_rank(labels, generator)
    mask = rank < held[labels]
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def balanced_subset(
    labels: torch.Tensor,
    generator: torch.Generator,
    per_class: int | None = None,
    fraction: float | None = None,
) -> torch.Tensor:
    """Sorted indices of a class-balanced random subset.

    Exactly `per_class` samples of every class (error when a class has fewer), or
    max(1, round(n_c·fraction)) samples of each class c (so class proportions are kept).
    """
    labels = labels.long().cpu()
    counts = torch.bincount(labels)
    present = counts > 0
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be ≥ 1, got {per_class}")
        short = torch.nonzero(present & (counts < per_class)).flatten()
        if len(short):
            c = int(short[0])
            raise ValueError(f"per_class={per_class} but class {c} has only {int(counts[c])} training samples")
        take = torch.full_like(counts, per_class)
    elif fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        take = torch.round(counts.double() * fraction).long().clamp_min(1)
    else:
        return torch.arange(labels.shape[0])
    rank = per_class_rank(labels, generator)
    return torch.nonzero(rank < take[labels]).flatten()


def long_tail_counts(n_max: int, num_classes: int, ratio: float) -> torch.Tensor:
    """Exponential class profile of CIFAR-100-LT: n_c = ⌊n_max · ratio^(−c/(C−1))⌋, c = 0..C−1.

    Class 0 is the head (n_max samples), class C−1 the tail (⌊n_max / ratio⌋); ratio 1 keeps every
    class at n_max. Cao et al.'s LDAM code (the usual CIFAR-LT recipe) truncates the same way.
    A class left with no sample raises DataError (one line) naming the numbers.
    """
    if ratio < 1:
        raise DataError(f"long_tail: imbalance ratio must be ≥ 1, got {ratio:g}")
    c = torch.arange(num_classes, dtype=torch.float64)
    exponent = c / (num_classes - 1) if num_classes > 1 else torch.zeros_like(c)
    counts = torch.floor(n_max * ratio ** (-exponent) + 1e-9).long()
    if num_classes and int(counts.min()) < 1:
        empty = int((counts < 1).sum())
        raise DataError(f"long_tail={ratio:g} leaves {empty} of {num_classes} classes empty (class "
                        f"{int(torch.nonzero(counts < 1)[0])} on): the head class has only "
                        f"{n_max} training samples (need ≥ {math.ceil(ratio)}); lower long_tail or add data")
    return counts


def long_tail_subset(labels: torch.Tensor, num_classes: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of a random long-tailed subset: class c keeps min(n_c, its count) samples.

    n_max is the largest class count and n_c follows `long_tail_counts`; which samples of a class
    are kept is a seeded per-class shuffle. Ratio 1 keeps everything.
    """
    labels = labels.long().cpu()
    have = torch.bincount(labels, minlength=num_classes)
    if ratio == 1:
        return torch.arange(labels.shape[0])
    missing = torch.nonzero(have == 0).flatten()
    if len(missing):
        raise DataError(f"long_tail: class {int(missing[0])} has no training sample before the cut")
    want = torch.minimum(long_tail_counts(int(have.max()), num_classes, ratio), have)
    rank = per_class_rank(labels, generator)
    return torch.nonzero(rank < want[labels]).flatten()
