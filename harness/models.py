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
