"""Seeded synthetic data where top-1 and top-k trade off, with its exact Bayes optimum.

Classes are grouped into superclasses whose members lie close together (top-1 is ambiguous
inside a superclass, top-k with k ≥ its size is not). Each class is an equal mixture of `modes`
isotropic Gaussians N(μ, sample_noise²·I); each mode centre is drawn around its superclass centre
(std `class_spread`), or, for a share `overlap` of the modes, around another random superclass's
centre, so that look-alike groups overlap. `superclass_sizes` gives groups of mixed sizes.
Label noise redraws a training label uniformly within its superclass; val/test stay clean.
`long_tail` > 1 gives the training split CIFAR-100-LT's exponential profile (class 0 = head, with
train_size / classes samples; see `labels.long_tail_counts`); val/test stay balanced.

Because the generator knows its densities, `info["reference"]` holds the Bayes-optimal top-k
accuracy of the test split (see `bayes.py`). `synthetic_hard` is the same generator with defaults
where softmax is far from saturated at top-5 (look-alike groups of 4–24 classes, overlapping).
"""
from __future__ import annotations

import torch

from harness.data.base import DataBundle, Split
from harness.data.bayes import bayes_reference
from harness.data.labels import long_tail_counts
from harness.errors import DataError
from harness.registry import Param, register_dataset

PARAMS = {
    "classes": Param(int, 20, ge=2, doc="number of classes"),
    "superclasses": Param(int, 4, ge=1, doc="classes are split evenly into this many groups"),
    "modes": Param(int, 3, ge=1, doc="Gaussian modes per class"),
    "dim": Param(int, 16, ge=1, doc="input dimension"),
    "superclass_spread": Param(float, 4.0, gt=0, doc="std of superclass centres"),
    "class_spread": Param(float, 1.0, ge=0, doc="std of mode centres around their superclass centre"),
    "sample_noise": Param(float, 0.7, ge=0, doc="std of samples around their mode centre"),
    "noise": Param(float, 0.0, ge=0.0, le=1.0, doc="training label-noise rate (within superclass)"),
    "train_size": Param(int, 4000, ge=1),
    "val_size": Param(int, 1000, ge=1),
    "test_size": Param(int, 2000, ge=1),
    "data_seed": Param(int, 0, ge=0, doc="seed of the data itself (runs' seeds vary the model)"),
    # added later: left out of the run id at their defaults, so existing records keep their ids
    "superclass_sizes": Param(list, None, optional=True, identity="unless_default",
                              doc="sizes of the superclasses (sum = classes); overrides superclasses"),
    "overlap": Param(float, 0.0, ge=0.0, le=1.0, identity="unless_default",
                     doc="share of modes centred on another random superclass (overlapping groups)"),
    "long_tail": Param(float, 1.0, ge=1.0, identity="unless_default",
                       doc="imbalance ratio of the training classes (1: balanced)"),
}

# Bayes optimum of the test split at these defaults: top-1 ≈ 62 %, top-5 ≈ 91 %, top-10 ≈ 98 %.
HARD_DEFAULTS = {
    "classes": 100, "superclass_sizes": [4, 6, 8, 10, 12, 16, 20, 24], "modes": 4, "dim": 16,
    "superclass_spread": 4.0, "class_spread": 0.5, "sample_noise": 0.7, "overlap": 0.25, "noise": 0.2,
    "train_size": 20000, "val_size": 2000, "test_size": 5000,
}
HARD_PARAMS = {k: Param(**{**p.__dict__, "default": HARD_DEFAULTS.get(k, p.default), "identity": "value"})
               for k, p in PARAMS.items()}


def superclass_of(p: dict) -> torch.Tensor:
    """Superclass id of every class (sorted), from `superclass_sizes` or an even split."""
    c, sizes = p["classes"], p["superclass_sizes"]
    if sizes is None:
        if p["superclasses"] > c:
            raise DataError(f"superclasses: {p['superclasses']} must be ≤ classes ({c})")
        return torch.arange(c) * p["superclasses"] // c
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes) or sum(sizes) != c:
        raise DataError(f"superclass_sizes: must be positive integers summing to classes={c}, got {sizes}")
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def validate(p: dict) -> None:
    """Suite-time check (one-line DataError): groups, and no class emptied by the long-tail cut."""
    superclass_of(p)
    if p["long_tail"] > 1:
        long_tail_counts(p["train_size"] // p["classes"], p["classes"], p["long_tail"])


def _centres(p: dict) -> tuple[torch.Tensor, torch.Generator]:
    """Mode centres [classes, modes, dim] and the data generator positioned after drawing them."""
    g = torch.Generator().manual_seed(p["data_seed"])
    sup = superclass_of(p)
    s = int(sup.max()) + 1
    c, m, d = p["classes"], p["modes"], p["dim"]
    super_centres = torch.randn(s, d, generator=g) * p["superclass_spread"]
    home = sup.view(c, 1).expand(c, m)
    if p["overlap"] > 0 and s > 1:  # own stream: overlap = 0 reproduces the original data exactly
        g2 = torch.Generator().manual_seed(p["data_seed"] + 7919)
        moved = torch.rand(c, m, generator=g2) < p["overlap"]
        other = (home + 1 + torch.randint(s - 1, (c, m), generator=g2)) % s  # a superclass ≠ home
        home = torch.where(moved, other, home)
    centres = super_centres[home] + torch.randn(c, m, d, generator=g) * p["class_spread"]
    return centres, g


def _load(p: dict) -> DataBundle:
    """Build the train/val/test splits (deterministic in `data_seed`)."""
    sup = superclass_of(p)
    s = int(sup.max()) + 1
    c, m, d = p["classes"], p["modes"], p["dim"]
    centres, g = _centres(p)

    def sample(n: int, y: torch.Tensor | None = None) -> Split:
        y = torch.randint(c, (n,), generator=g) if y is None else y
        mode = torch.randint(m, (len(y),), generator=g)
        x = centres[y, mode] + torch.randn(len(y), d, generator=g) * p["sample_noise"]
        return Split(x, y)

    info: dict = {}
    train_y = None
    if p["long_tail"] > 1:  # exactly CIFAR-100-LT's profile, cut from train_size / classes per class
        counts = long_tail_counts(p["train_size"] // c, c, p["long_tail"])
        train_y = torch.repeat_interleave(torch.arange(c), counts)
        train_y = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(p["data_seed"] + 1))]
        info["long_tail"] = p["long_tail"]
    train = sample(p["train_size"], train_y)  # the label noise (below) comes after the cut
    val, test = sample(p["val_size"]), sample(p["test_size"])
    flipped = 0
    if p["noise"] > 0:
        y = train.y
        redraw = torch.rand(len(y), generator=g) < p["noise"]
        size = torch.bincount(sup, minlength=s)[sup[y]]
        first = torch.searchsorted(sup.contiguous(), sup[y])  # first class id of the superclass
        new = first + (torch.rand(len(y), generator=g) * size).long()
        noisy = torch.where(redraw, new, y)
        flipped = int((noisy != y).sum())
        train = Split(train.x, noisy)
    counts = torch.bincount(train.y, minlength=c)
    if int(counts.min()) < 1:
        raise DataError(f"synthetic: class {int(counts.argmin())} has no training sample "
                        f"(train_size={p['train_size']} for {c} classes); raise train_size")
    info.update(flipped_labels=flipped, train_size=len(train),
                reference=bayes_reference(test.x, test.y, centres, p["sample_noise"]))
    mean, std = train.x.mean(0), train.x.std(0).clamp_min(1e-6)
    norm = lambda split: Split((split.x - mean) / std, split.y)  # noqa: E731
    return DataBundle(norm(train), norm(val), norm(test), c, (d,), info=info, class_counts=counts.tolist())


def reference(p: dict) -> dict:
    """The Bayes-optimal test curves (`info["reference"]`) of a parameter set."""
    return _load(p).info["reference"]


@register_dataset("synthetic", version=1, params=PARAMS, num_classes=lambda p: p["classes"], validate=validate,
                  reference=reference, input_shape=lambda p: (p["dim"],))
def load(seed: int, **p) -> DataBundle:
    """Gaussian-mode classes in superclasses (see the module docstring); `seed` is unused."""
    return _load(p)


@register_dataset("synthetic_hard", version=1, params=HARD_PARAMS, num_classes=lambda p: p["classes"],
                  validate=validate, reference=reference, input_shape=lambda p: (p["dim"],))
def load_hard(seed: int, **p) -> DataBundle:
    """`synthetic` with defaults where top-5 is far from saturated (mixed, overlapping groups)."""
    return _load(p)
