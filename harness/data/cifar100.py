"""CIFAR-100 read with torchvision, split 95/5 into train/val, with optional label noise and subsets.

Protocol (LOSSES.md): a stratified `val_fraction` of the 50 000 training images becomes the
validation split (seeded by `split_seed`, the same for every run seed), the official 10 000 test
images are the test split. Order of operations on the remaining training images: class-balanced
subset (`per_class` or `train_fraction`, seeded by `split_seed`), then label noise (seeded by the
run seed). Validation and test labels are never changed.

Inputs are normalised at load time with the usual CIFAR-100 channel mean/std and stored as float32
tensors [N, 3, 32, 32]. The training transform (`augment=true`) only crops and flips, batched on
the device: random 32×32 crop of the image zero-padded by 4 pixels (the pad value is a black
pixel, i.e. (0 − mean)/std in normalised units, as torchvision's RandomCrop before Normalize)
and a horizontal flip with probability 1/2.
"""
from __future__ import annotations

import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from harness.data.base import DataBundle, Split
from harness.data.labels import balanced_subset, block_groups, group_noise, stratified_split
from harness.errors import DataError
from harness.registry import Param, register_dataset

log = logging.getLogger(__name__)

MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)
FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"

PARAMS = {
    "root": Param(str, "~/.cache/topk-bench/cifar100", identity="ignore", path=True,
                  doc="folder holding cifar-100-python/ (or the .tar.gz)"),
    "download": Param(bool, True, identity="ignore", doc="download when the files are missing"),
    "val_fraction": Param(float, 0.05, ge=0.0, lt=1.0, doc="stratified share of train held out as val"),
    "noise": Param(float, 0.0, ge=0.0, le=1.0, doc="probability of redrawing a training label"),
    "noise_mode": Param(str, "block5", choices=("block5", "coarse"),
                        doc="redraw within blocks of 5 consecutive ids (Berrada) or within the superclass"),
    "train_fraction": Param(float, 1.0, gt=0.0, le=1.0, doc="class-balanced share of train kept"),
    "per_class": Param(int, None, ge=1, optional=True,
                       doc="exact training images per class (overrides train_fraction)"),
    "augment": Param(bool, True, doc="random crop (pad 4) + horizontal flip on training batches"),
    "split_seed": Param(int, 0, ge=0, doc="seed of the val split and subsets (noise uses the run seed)"),
}


class CIFARMissing(DataError):
    """CIFAR-100 files are absent and could not be downloaded."""


def _missing(root: Path, why: str) -> CIFARMissing:
    return CIFARMissing(
        f"cifar100: CIFAR-100 not found in {root} ({why}); put the extracted '{FOLDER}/' folder "
        f"(with train, test, meta) or '{ARCHIVE}' in {root}, or set dataset.params.root"
    )


def _open(root: Path, train: bool, download: bool):
    """torchvision's CIFAR100 for one split; one-line error when files are missing."""
    from torchvision.datasets import CIFAR100

    archive = root / ARCHIVE
    if not (root / FOLDER).is_dir() and archive.is_file():
        log.info("extracting %s", archive)
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, filter="data")
    try:
        return CIFAR100(str(root), train=train, download=False)
    except (RuntimeError, OSError) as exc:  # "Dataset not found or corrupted", missing file
        if not download:
            raise _missing(root, "download=false") from None
        first = " ".join(str(exc).split())
    try:
        root.mkdir(parents=True, exist_ok=True)
        return CIFAR100(str(root), train=train, download=True)
    except Exception as exc:  # offline, DNS, checksum ...
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise _missing(root, f"download failed: {why}; before: {first}") from None


def _coarse_of_fine(root: Path) -> torch.Tensor:
    """Superclass id of each of the 100 fine classes, read from the raw training pickle."""
    path = root / FOLDER / "train"
    with open(path, "rb") as fh:
        raw = pickle.load(fh, encoding="latin1")
    fine = torch.as_tensor(raw["fine_labels"], dtype=torch.long)
    coarse = torch.as_tensor(raw["coarse_labels"], dtype=torch.long)
    mapping = torch.full((100,), -1, dtype=torch.long)
    mapping[fine] = coarse
    if (mapping < 0).any() or not torch.equal(mapping[fine], coarse):
        raise ValueError(f"cifar100: {path}: fine labels do not map to a single coarse label")
    return mapping


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 32, 32, 3] -> normalised float32 [N, 3, 32, 32]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def crop_flip(padding: int = 4):
    """Batched random crop (zero-pad `padding` in raw pixel space) + horizontal flip, on the device."""
    fill = -torch.tensor(MEAN) / torch.tensor(STD)  # a black pixel in normalised units

    def transform(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator).to(x.device)
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        padded = fill.to(x.device, x.dtype).view(1, c, 1, 1).repeat(b, 1, h + 2 * padding, w + 2 * padding)
        padded[:, :, padding : padding + h, padding : padding + w] = x
        rows = (offsets[:, 0:1] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
        cols = (offsets[:, 1:2] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
        batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        chan = torch.arange(c, device=x.device).view(1, c, 1, 1)
        out = padded[batch, chan, rows, cols]
        return torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)

    return transform


@register_dataset("cifar100", version=1, params=PARAMS, num_classes=lambda p: 100)
def load(seed: int, **p) -> DataBundle:
    """CIFAR-100 train/val/test splits (see the module docstring for the protocol)."""
    root = Path(p["root"]).expanduser()
    train_set = _open(root, True, p["download"])
    test_set = _open(root, False, p["download"])
    y_all = torch.as_tensor(train_set.targets, dtype=torch.long)
    split_gen = torch.Generator().manual_seed(p["split_seed"])
    keep, held = stratified_split(y_all, p["val_fraction"], split_gen)
    if p["per_class"] is not None or p["train_fraction"] < 1.0:
        sub = balanced_subset(y_all[keep], split_gen, per_class=p["per_class"], fraction=p["train_fraction"])
        keep = keep[sub]
    y_train = y_all[keep]
    info: dict = {"noise": p["noise"], "noise_mode": p["noise_mode"], "flipped_labels": 0}
    if p["noise"] > 0:
        groups = block_groups(100, 5) if p["noise_mode"] == "block5" else _coarse_of_fine(root)
        y_train, changed = group_noise(y_train, groups, p["noise"], torch.Generator().manual_seed(seed))
        info["flipped_labels"] = int(changed.sum())
        log.info("cifar100: %d of %d training labels changed (%s, p=%g)", info["flipped_labels"],
                 len(y_train), p["noise_mode"], p["noise"])
    x_all = _to_tensor(train_set.data)
    train = Split(x_all[keep], y_train)
    val = Split(x_all[held], y_all[held])
    test = Split(_to_tensor(test_set.data), torch.as_tensor(test_set.targets, dtype=torch.long))
    info.update(
        train_size=len(train), val_size=len(val), test_size=len(test), mean=list(MEAN), std=list(STD),
        normalised="at load time; train_transform only crops and flips" if p["augment"] else "at load time",
    )
    transform = crop_flip(4) if p["augment"] else None
    return DataBundle(train, val, test, 100, (3, 32, 32), train_transform=transform, info=info)
