"""`topk-bench extract-features`: embed images with a frozen backbone into the features .npz format.

Sources: an ImageFolder root holding `train/` and `val/` (optionally `test/`) class folders, or
CIFAR-100 (its train and test splits are written as `train_*` and `val_*`, so the `features`
dataset holds out part of train as val and uses the file's val as test, as in the paper).
Backbones: any torchvision classification model name, or `timm:<name>` when timm is installed.
The classifier (the last `nn.Linear`) is replaced by the identity, so the output is the
penultimate embedding. Weights: `--weights default` (torchvision's default weights; needs them
cached or internet), `--weights none` (random init, for tests) or a local state-dict file
(.pt/.pth/.safetensors). The result is written atomically (temp file, then rename).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.errors import DataError

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the extract-features command."""
    parser.add_argument("--source", choices=("imagefolder", "cifar100"), default="imagefolder",
                        help="ImageFolder root with train/ and val/ subfolders, or CIFAR-100")
    parser.add_argument("--root", required=True, help="ImageFolder root, or the CIFAR-100 root folder")
    parser.add_argument("--model", default="resnet50", help="torchvision model name or timm:<name>")
    parser.add_argument("--weights", default="default",
                        help="'default' (torchvision/timm pretrained), 'none' (random init) or a state-dict file")
    parser.add_argument("--out", required=True, help="output .npz path")
    parser.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop")
    parser.add_argument("--crop", type=int, default=224, help="centre-crop size fed to the backbone")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="storage dtype of the features")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per split (smoke tests)")


def _strip_head(model: nn.Module) -> nn.Module:
    """Replace the last nn.Linear (the classifier) by the identity."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to remove")
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, nn.Identity())
    return model


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = [k for k in missing if k.split(".")[0] in ("fc", "classifier", "head", "heads")]
    if [k for k in missing if k not in head] or unexpected:
        raise ValueError(f"--weights {path}: does not fit the model (missing {len(missing)} keys, "
                         f"unexpected {len(unexpected)}, e.g. {(missing + unexpected)[0]})")


def build_backbone(name: str, weights: str) -> tuple[nn.Module, object | None]:
    """Backbone without its classifier, and torchvision's preprocessing of its weights (or None)."""
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ValueError("--model timm:…: timm is not installed (pip install timm)") from None
        model = timm.create_model(name[5:], pretrained=weights == "default", num_classes=0)
        if weights not in ("default", "none"):
            _load_weights(model, Path(weights))
        return model, None
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"--model {name}: not a torchvision classification model")
    preprocess = None
    if weights == "default":
        w = torchvision.models.get_model_weights(name).DEFAULT
        preprocess = w.transforms()
        try:
            model = torchvision.models.get_model(name, weights=w)
        except Exception as exc:  # offline and not cached
            raise ValueError(f"--weights default: cannot fetch {w} ({' '.join(str(exc).split())}); "
                             "pass a local file with --weights PATH") from None
    else:
        model = torchvision.models.get_model(name, weights=None)
        if weights != "none":
            _load_weights(model, Path(weights))
    return _strip_head(model), preprocess


def _datasets(args: argparse.Namespace, transform) -> tuple[dict[str, torch.utils.data.Dataset], list[str]]:
    from torchvision import datasets

    root = Path(args.root).expanduser()
    if args.source == "cifar100":
        from harness.data.cifar100 import _open

        train, test = _open(root, True, False), _open(root, False, False)
        train.transform = test.transform = transform
        return {"train": train, "val": test}, list(train.classes)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise ValueError(f"--root {root}: expected train/ and val/ subfolders of class folders")
    out = {s: datasets.ImageFolder(str(root / s), transform=transform) for s in ("train", "val", "test")
           if (root / s).is_dir()}
    classes = out["train"].classes
    for s, ds in out.items():
        if ds.classes != classes:
            raise ValueError(f"--root {root}: {s}/ has different class folders from train/")
    return out, classes


@torch.no_grad()
def _embed(model: nn.Module, ds, args: argparse.Namespace, device: torch.device, split: str):
    from tqdm import tqdm

    if args.limit is not None:
        ds = torch.utils.data.Subset(ds, range(min(args.limit, len(ds))))
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    feats, labels = [], []
    for xb, yb in tqdm(loader, desc=f"extract {split}", unit="batch", file=sys.stderr, disable=None):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(xb.to(device, non_blocking=True))
        out = out.float().flatten(1)
        feats.append(out.cpu().numpy().astype(args.dtype))
        labels.append(yb.numpy().astype(np.int64))
    return np.concatenate(feats), np.concatenate(labels)


def run(args: argparse.Namespace) -> int:
    """Extract features for every split and write the .npz; 0 on success, 2 on a user error."""
    from torchvision import transforms as T

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                              else args.device)
        model, preprocess = build_backbone(args.model, args.weights)
        model = model.eval().to(device)
        transform = preprocess or T.Compose([
            T.Resize(args.resize), T.CenterCrop(args.crop), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        splits, classes = _datasets(args, transform)
        arrays: dict[str, np.ndarray] = {"class_names": np.array(classes, dtype=str)}
        for split, ds in splits.items():
            arrays[f"{split}_features"], arrays[f"{split}_labels"] = _embed(model, ds, args, device, split)
            log.info("%s: %d × %s features", split, *arrays[f"{split}_features"].shape[:1],
                     arrays[f"{split}_features"].shape[1:])
    except (ValueError, FileNotFoundError, RuntimeError) as exc:  # the CLI prints one line, exit 2
        raise DataError(f"extract-features: {exc}") from None
    out = Path(args.out).expanduser()
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, out)
    log.info("wrote %s", out)
    return 0
