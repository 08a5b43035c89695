"""Seeded synthetic data where top-1 and top-k trade off.

Classes are grouped into superclasses whose members lie close together (top-1 is
ambiguous inside a superclass, top-k with k ≥ its size is not). Each class is a mixture
of several modes, each mode placed near a *random* superclass-mate's region, so a small
model cannot carve out the Bayes-optimal top-1 boundary and must trade top-1 for top-k.
Label noise redraws a training label uniformly within its superclass; val/test stay clean.
"""
from __future__ import annotations

import torch

from harness.data.base import DataBundle, Split
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
}


def _superclass_of(classes: int, superclasses: int) -> torch.Tensor:
    return torch.arange(classes) * superclasses // classes


def validate(p: dict) -> None:
    """Validation hook (at suite load): every superclass needs at least one class."""
    if p["superclasses"] > p["classes"]:
        raise ValueError(f"superclasses: {p['superclasses']} must be ≤ classes ({p['classes']})")


@register_dataset("synthetic", version=1, params=PARAMS, num_classes=lambda p: p["classes"],
                  input_shape=lambda p: (p["dim"],), validate=validate)
def load(seed: int, **p) -> DataBundle:
    """Build the train/val/test splits (deterministic in `data_seed`; `seed` is unused)."""
    validate(p)
    g = torch.Generator().manual_seed(p["data_seed"])
    c, s, m, d = p["classes"], p["superclasses"], p["modes"], p["dim"]
    sup = _superclass_of(c, s)
    super_centres = torch.randn(s, d, generator=g) * p["superclass_spread"]
    mode_centres = super_centres[sup].unsqueeze(1) + torch.randn(c, m, d, generator=g) * p["class_spread"]

    def sample(n: int) -> Split:
        y = torch.randint(c, (n,), generator=g)
        mode = torch.randint(m, (n,), generator=g)
        x = mode_centres[y, mode] + torch.randn(n, d, generator=g) * p["sample_noise"]
        return Split(x, y)

    train, val, test = sample(p["train_size"]), sample(p["val_size"]), sample(p["test_size"])
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
    mean, std = train.x.mean(0), train.x.std(0).clamp_min(1e-6)
    norm = lambda split: Split((split.x - mean) / std, split.y)  # noqa: E731
    return DataBundle(norm(train), norm(val), norm(test), c, (d,), info={"flipped_labels": flipped})
