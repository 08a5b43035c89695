"""CIFAR-shaped random images with random labels: a dataset for throughput, not for accuracy.

Epoch and step times of a model depend on the shapes, not on the pixels, so this stands in for
CIFAR-100 when timing (`suites/cifar100-timing.yaml`) without the download. The same crop + flip
augmentation as `cifar100` runs on the training device, so the hot path is the real one.
"""
from __future__ import annotations

import torch

from harness.data.base import DataBundle, Split
from harness.data.cifar100 import crop_flip
from harness.registry import Param, register_dataset

PARAMS = {
    "classes": Param(int, 100, ge=2),
    "train_size": Param(int, 47500, ge=1, doc="CIFAR-100's 95 % training split by default"),
    "val_size": Param(int, 2500, ge=1),
    "test_size": Param(int, 10000, ge=1),
    "image_size": Param(int, 32, ge=8),
    "augment": Param(bool, True, doc="random crop (pad 4) + horizontal flip on the device"),
    "data_seed": Param(int, 0, ge=0),
}


@register_dataset("random_images", version=1, params=PARAMS, num_classes=lambda p: p["classes"],
                  input_shape=lambda p: (3, p["image_size"], p["image_size"]))
def load(seed: int, **p) -> DataBundle:
    """Standard-normal images [N, 3, s, s] with uniform random labels (deterministic in data_seed)."""
    g = torch.Generator().manual_seed(p["data_seed"])
    shape = (3, p["image_size"], p["image_size"])

    def split(n: int) -> Split:
        return Split(torch.randn(n, *shape, generator=g), torch.randint(p["classes"], (n,), generator=g))

    train, val, test = split(p["train_size"]), split(p["val_size"]), split(p["test_size"])
    return DataBundle(train, val, test, p["classes"], shape, train_transform=crop_flip(4) if p["augment"] else None,
                      info={"purpose": "timing only: pixels and labels are random"})
