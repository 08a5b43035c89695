"""Dataset contract: splits of (inputs, labels) and a bundle describing a dataset."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

# A batch-level transform applied on the training device: (x, generator) -> x.
BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class Split:
    """Inputs and integer labels. `x` may be a tensor or a (memory-mapped) numpy array."""

    x: torch.Tensor | np.ndarray
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device) -> "Split":
        """Move to `device` when `x` is a tensor (memory-mapped arrays stay on disk)."""
        if isinstance(self.x, torch.Tensor):
            return Split(self.x.to(device), self.y.to(device))
        return Split(self.x, self.y.to(device))

    def batches(
        self, batch_size: int, device: torch.device, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x, y) batches on `device`; shuffled when a generator is given."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if isinstance(self.x, torch.Tensor):
                xb = self.x[idx.to(self.x.device)]
            else:  # numpy / memmap: sorted fancy indexing reads contiguous-ish pages
                sorted_idx = np.sort(idx.numpy())
                idx = torch.from_numpy(sorted_idx)
                xb = torch.from_numpy(np.asarray(self.x[sorted_idx]))
            yb = self.y[idx.to(self.y.device)]
            yield xb.to(device, non_blocking=True).float(), yb.to(device, non_blocking=True)


@dataclass
class DataBundle:
    """A loaded dataset: train/val/test splits and what a model needs to know."""

    train: Split
    val: Split
    test: Split | None
    num_classes: int
    input_shape: tuple[int, ...]
    train_transform: BatchTransform | None = None
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """Sizes and class counts of every split, computed from the splits (merged into records' data_info).

        `classes` is the model's output size; `classes_in_<split>` counts the distinct labels a
        split actually contains (fewer than `classes` means some classes never occur there).
        """
        out: dict = {"classes": int(self.num_classes)}
        for name in ("train", "val", "test"):
            split = getattr(self, name)
            out[f"{name}_size"] = None if split is None else len(split)
            out[f"classes_in_{name}"] = None if split is None else int(torch.unique(split.y).numel())
        return out
