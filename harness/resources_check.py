"""Checks of `resources` settings and of the machine, done before any run starts.

- `check_device_name`: the spelling of a device (auto, cpu, cuda, cuda:N).
- `check_slurm_params`: `resources.slurm` keys against what submitit's AutoExecutor accepts.
- `check_device_available`: CUDA requested on a machine without it (or a GPU index it lacks).
- `check_model_memory`: a model whose weights, gradients and optimizer state cannot fit in memory,
  estimated from its parameter count (built on the meta device: nothing is allocated).
Each raises a one-line `UserError` subclass naming the key (or flag) and the allowed values.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
from typing import Any

from harness.errors import SuiteError, UserError, short_repr

log = logging.getLogger(__name__)

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:[0-9]{1,3})?)$")
DEVICES_ALLOWED = "auto, cpu, cuda, cuda:N"
# weights + gradients + two Adam moments, in float32
BYTES_PER_PARAM = 4 * 4


def check_device_name(device: str, where: str) -> str:
    """Return `device` when it is auto, cpu, cuda or cuda:N; else a one-line error naming `where`."""
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise UserError(f"{where}: unknown device {short_repr(device)}; allowed: {DEVICES_ALLOWED}")
    return device


def slurm_keys() -> tuple[dict[str, type], set[str], set[str]]:
    """(generic typed parameters, cluster-prefixed names, executor names) accepted by submitit's AutoExecutor."""
    from submitit.auto.auto import AutoExecutor
    from submitit.core import plugins

    executors = plugins.get_executors()
    generic = dict(AutoExecutor._typed_parameters())
    prefixed = {f"{name}_{arg}" for name, ex in executors.items() for arg in ex._valid_parameters()}
    prefixed |= {f"{name}_{arg}" for name in executors for arg in generic}
    return generic, prefixed, set(executors)


def check_slurm_params(params: dict[str, Any]) -> None:
    """Refuse keys of `resources.slurm` that submitit would reject (or that the harness sets itself)."""
    if not params:
        return
    generic, prefixed, clusters = slurm_keys()
    for key, value in params.items():
        where = f"resources.slurm.{key}"
        if key == "timeout_min":
            raise SuiteError(f"{where}: set resources.timeout_min instead (the harness passes it to Slurm)")
        if key == "cluster":
            if value is not None and value not in clusters:
                allowed = ", ".join(sorted(clusters))
                raise SuiteError(f"{where}: unknown cluster {short_repr(value)}; allowed: {allowed}")
            continue
        if key in generic:
            want = (int, float) if generic[key] is float else generic[key]
            if isinstance(value, bool) and want is not bool or not isinstance(value, want):
                raise SuiteError(f"{where}: expected {generic[key].__name__}, got {short_repr(value)}")
            continue
        # submitit still accepts un-prefixed Slurm names (deprecated): suggest the prefixed one
        if f"slurm_{key}" in prefixed:
            raise SuiteError(f"{where}: write it as 'slurm_{key}' (submitit's name for Slurm's '{key}')")
        if key not in prefixed:
            allowed = sorted(set(generic) - {"timeout_min"} | {"cluster"} | prefixed)
            match = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise SuiteError(f"{where}: unknown Slurm parameter{hint}; allowed: {', '.join(allowed)}")


def check_device_available(device: str, where: str) -> None:
    """One line when `device` asks for CUDA (or a GPU index) this machine does not have."""
    check_device_name(device, where)
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{where}: '{device}' requested but CUDA is not available on this machine; "
                        f"use auto or cpu")
    count = torch.cuda.device_count()
    if ":" in device and int(device.split(":")[1]) >= count:
        raise UserError(f"{where}: '{device}' requested but this machine has {count} GPU(s) (cuda:0..{count - 1})")


def _available_memory(device: str) -> tuple[int, str] | None:
    """Bytes of memory a run on `device` can use and its name, or None when unknown."""
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        index = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM"
    except (ValueError, OSError, AttributeError):
        return None


def parameter_count(build: Any, input_shape: tuple[int, ...], num_classes: int, params: dict) -> int:
    """Parameters of the model `build(input_shape, num_classes, **params)`, built on the meta device."""
    import torch

    with torch.device("meta"):
        model = build(input_shape, num_classes, **params)
    return sum(p.numel() for p in model.parameters())


def check_model_memory(suite: Any, device: str) -> None:
    """Refuse a suite whose model needs more memory (weights, grads, Adam state) than the device has."""
    from harness.registry import DATASETS, MODELS

    memory = _available_memory(device)
    if memory is None:
        return
    available, name = memory
    seen: set[tuple] = set()
    for spec in suite.runs:
        ds = DATASETS.get(spec.dataset.name)
        shape_of = ds.extra.get("input_shape")
        if shape_of is None:
            continue
        shape, classes = tuple(shape_of(spec.dataset.params)), ds.extra["num_classes"](spec.dataset.params)
        key = (spec.model.name, repr(spec.model.params), shape, classes)
        if key in seen:
            continue
        seen.add(key)
        try:
            count = parameter_count(MODELS.get(spec.model.name).obj, shape, classes, spec.model.params)
        except Exception as exc:  # noqa: BLE001 - an estimate only: a model the meta device cannot build is skipped
            log.debug("no memory estimate for %s: %s", spec.model.label(), exc)
            continue
        need = count * BYTES_PER_PARAM
        if need > available:
            raise SuiteError(
                f"{suite.path}: model: {spec.model.label()} "
                f"has {count:,} parameters: training needs about {need / 2**30:.1f} GiB "
                f"(weights, gradients, optimizer state) but the {name} has {available / 2**30:.1f} GiB"
            )
