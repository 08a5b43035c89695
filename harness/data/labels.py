"""Label helpers shared by datasets: seeded label noise and class-balanced subsets.

All functions are vectorised (no Python loop over samples or classes) and draw their random
numbers from an explicit CPU `torch.Generator`, so results depend only on the seed.
"""
from __future__ import annotations

import torch


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
