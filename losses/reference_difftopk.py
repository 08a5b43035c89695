"""The reference package `difftopk` 0.2.0, as the `reference=` hooks of our losses (see bench-loss).

`difftopk` 0.2.0 ports Berrada's smooth top-k SVM and implements Petersen et al.'s top-k CE. Its
sparse networks (sparse bitonic, splitter selection) call `torch_sparse.spmm`, which does not
install everywhere; `install_torch_sparse_shim` provides a pure-torch stand-in so they can run
(bench-loss option `torch_sparse_shim`).
"""
from __future__ import annotations

import contextlib
import io
import sys
import types
import warnings
from typing import Any, Callable

import torch

from harness.registry import ReferenceImpl

# our difftopk sorter -> the reference's `diffsort_method` names for it (bitonic: sparse and dense)
REFERENCE_METHODS = {
    "odd_even": ("odd_even",), "bitonic": ("bitonic", "bitonic__non_sparse"),
    "splitter_selection": ("splitter_selection",), "neuralsort": ("neuralsort",), "softsort": ("softsort",),
}
SPARSE_METHODS = ("bitonic", "splitter_selection")
NOT_INSTALLED = "unavailable: difftopk not installed"


def install_torch_sparse_shim() -> None:
    """Register a pure-torch `torch_sparse.spmm` (out[row] += value · matrix[col]) for difftopk."""
    shim = types.ModuleType("torch_sparse")

    def spmm(index: torch.Tensor, value: torch.Tensor, m: int, n: int, matrix: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(m, matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
        return out.index_add(0, index[0], value.unsqueeze(1).to(matrix.dtype) * matrix.index_select(0, index[1]))

    shim.spmm = spmm  # type: ignore[attr-defined]
    sys.modules.setdefault("torch_sparse", shim)
    functional = sys.modules.get("difftopk.functional")
    if functional is not None and not getattr(functional, "SPARSE_INSTALLED", False):
        functional.torch_sparse = sys.modules["torch_sparse"]
        functional.SPARSE_INSTALLED = True


def import_reference() -> Any:
    """The `difftopk` package (its import prints to stdout, which is swallowed), or None.

    Its deprecation warnings about current torch (sparse invariants, `x.T` on 3-D tensors) are
    silenced: they say nothing about the numbers.
    """
    warnings.filterwarnings("ignore", category=UserWarning, module=r"difftopk(\.|$)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import difftopk
        return difftopk
    except Exception:  # noqa: BLE001  (any import failure means: no reference here)
        return None


def _builder(cls: str, kwargs: dict[str, Any], shim: bool) -> Callable[[torch.device], Callable]:
    def build(device: torch.device) -> Callable:
        if shim:
            install_torch_sparse_shim()
        ref = import_reference()
        if ref is None:
            raise ModuleNotFoundError("reference package difftopk is not installed")
        with contextlib.redirect_stdout(io.StringIO()):
            return getattr(ref, cls)(device=str(device), **kwargs).to(device)

    return build


def _impls(specs: list[tuple[str, str, dict[str, Any]]], options: dict[str, Any]) -> list[ReferenceImpl]:
    shim = bool(options.get("torch_sparse_shim"))
    missing = None if import_reference() is not None else NOT_INSTALLED
    out = []
    for label, cls, kwargs in specs:
        if shim and missing is None and kwargs.get("diffsort_method") in SPARSE_METHODS:
            label += "(shim)"
        out.append(ReferenceImpl(label, _builder(cls, kwargs, shim), missing))
    return out


def difftopk_reference(loss: Any, num_classes: int, options: dict[str, Any]) -> list[ReferenceImpl]:
    """`TopKCrossEntropyLoss` of the reference for each of its methods equal to our sorter."""
    specs = [(f"ref:TopKCrossEntropyLoss[{method}]", "TopKCrossEntropyLoss",
              dict(diffsort_method=method, inverse_temperature=loss.inverse_temperature, p_k=list(loss.p_k),
                   n=num_classes, m=loss.m, distribution=loss.distribution, art_lambda=loss.art_lambda,
                   top1_mode=loss.top1_mode))
             for method in REFERENCE_METHODS.get(loss.sorter, ())]
    return _impls(specs, options)


def berrada_smooth_reference(loss: Any, num_classes: int, options: dict[str, Any]) -> list[ReferenceImpl]:
    """The reference's port of Berrada's smooth top-k SVM (it fixes α = 1: no equivalent otherwise)."""
    if loss.alpha != 1.0:
        return []
    specs = [(f"ref:{cls}", cls, dict(num_classes=num_classes, k=loss.k, tau=loss.tau))
             for cls in ("SmoothTopKLoss", "SmoothHardTopKLoss")]
    return _impls(specs, options)
