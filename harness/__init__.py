"""topk-bench: a benchmarking harness for top-k classification losses."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

from harness.registry import (  # noqa: E402
    DATASETS,
    Choice,
    Linear,
    Log,
    LOSSES,
    MODELS,
    Entry,
    Param,
    ReferenceImpl,
    RegistryError,
    TrainingProgress,
    register_dataset,
    register_loss,
    register_model,
)

__all__ = [
    "DATASETS", "LOSSES", "MODELS", "Choice", "Entry", "Linear", "Log", "Param", "ReferenceImpl", "RegistryError",
    "TrainingProgress",
    "build_loss", "list_losses", "register_dataset", "register_loss", "register_model",
]


def build_loss(name: str, num_classes: int, **params: Any):
    """Build a registered loss by name; parameters are validated against its schema."""
    entry = LOSSES.get(name)
    reason = entry.unavailable_reason
    if reason:
        raise RegistryError(f"loss '{name}' is unavailable: {reason}")
    return entry.obj(num_classes=num_classes, **entry.validate_params(params, where=name))


def list_losses() -> list[Entry]:
    """Every registered loss (available or not) with its metadata and parameter schema."""
    return LOSSES.entries()
