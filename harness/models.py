"""Registered models: `build(input_shape, num_classes, **params) -> nn.Module`."""
from __future__ import annotations

import math

from torch import nn

from harness.registry import Param, register_model


@register_model("linear", params={}, version=1)
def linear(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A linear head on flattened inputs (the paper's head on frozen embeddings)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@register_model(
    "mlp",
    version=1,
    params={
        "hidden": Param(int, 256, ge=1, doc="width of each hidden layer"),
        "depth": Param(int, 1, ge=1, doc="number of hidden layers"),
        "dropout": Param(float, 0.0, ge=0.0, lt=1.0),
    },
)
def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 256, depth: int = 1,
        dropout: float = 0.0) -> nn.Module:
    """Fully connected ReLU network on flattened inputs."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# ---- vision models (CIFAR ResNet-18, a small CPU-friendly CNN, any torchvision classifier) ----
import difflib  # noqa: E402

import torchvision  # noqa: E402

from harness.errors import short_repr  # noqa: E402
from harness.registry import RegistryError  # noqa: E402


@register_model(
    "resnet18_cifar",
    version=1,
    params={"maxpool": Param(bool, False, doc="keep the ImageNet stem's 3×3/2 max-pool after the 3×3 conv")},
)
def resnet18_cifar(input_shape: tuple[int, ...], num_classes: int, maxpool: bool = False) -> nn.Module:
    """torchvision ResNet-18 with a 3×3 stride-1 stem conv (CIFAR stem); max-pool optional."""
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if not maxpool:
        model.maxpool = nn.Identity()
    return model


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register_model(
    "small_cnn",
    version=1,
    params={
        "width": Param(int, 32, ge=1, doc="channels of the first stage (doubled per stage)"),
        "dropout": Param(float, 0.0, ge=0.0, lt=1.0),
    },
)
def small_cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 32, dropout: float = 0.0) -> nn.Module:
    """Three conv-BN-ReLU stages (pooling between), global average pool, linear; fast on CPU."""
    w = width
    layers = [*_conv_block(input_shape[0], w), *_conv_block(w, w), nn.MaxPool2d(2),
              *_conv_block(w, 2 * w), *_conv_block(2 * w, 2 * w), nn.MaxPool2d(2),
              *_conv_block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(4 * w, num_classes))
    return nn.Sequential(*layers)


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's image-classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(params: dict) -> None:
    """Validation hook (at suite load, nothing is built): `arch` must name a torchvision classifier."""
    arch, names = params["arch"], torchvision_classifiers()
    if arch not in names:
        match = difflib.get_close_matches(str(arch), names, n=1, cutoff=0.5)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise RegistryError(f"arch: unknown torchvision model {short_repr(arch)}{hint}; "
                            f"`topk-bench list` or torchvision.models.list_models() name them")


@register_model(
    "torchvision",
    version=1,
    params={"arch": Param(str, "resnet18", doc="any torchvision classification model name (random init)")},
    validate=check_arch,
)
def torchvision_model(input_shape: tuple[int, ...], num_classes: int, arch: str = "resnet18") -> nn.Module:
    """Any torchvision classifier by name, randomly initialised (weights=None) with `num_classes` outputs."""
    try:
        check_arch({"arch": arch})
    except RegistryError as exc:
        raise RegistryError(f"model.params.{exc}") from None
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if arch in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    return torchvision.models.get_model(arch, **kwargs)
