"""Reference implementations that bench-loss times side by side with ours (the `difftopk` package).

`difftopk` 0.2.0 ports Berrada's smooth top-k SVM and implements Petersen et al.'s top-k CE.
Its sparse networks (sparse bitonic, splitter selection) call `torch_sparse.spmm`, which does not
install everywhere; `install_torch_sparse_shim` provides a pure-torch stand-in so they can run.
"""
from __future__ import annotations

import contextlib
import io
import sys
import types
import warnings
from typing import Any, Callable

import torch

# our difftopk sorter -> the reference's `diffsort_method` names for it (bitonic: sparse and dense)
REFERENCE_METHODS = {
    "odd_even": ("odd_even",), "bitonic": ("bitonic", "bitonic__non_sparse"),
    "splitter_selection": ("splitter_selection",), "neuralsort": ("neuralsort",), "softsort": ("softsort",),
}
SPARSE_METHODS = ("bitonic", "splitter_selection")


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


def reference_specs(name: str, params: dict[str, Any], n: int) -> list[tuple[str, dict[str, Any]]]:
    """[(row label, spec)] of the reference equivalents of one of our loss configs (may be empty)."""
    import harness

    if name == "difftopk":
        ours = harness.build_loss(name, n, **params)
        return [(f"ref:TopKCrossEntropyLoss[{method}]",
                 {"cls": "TopKCrossEntropyLoss",
                  "kwargs": dict(diffsort_method=method, inverse_temperature=ours.inverse_temperature,
                                 p_k=list(ours.p_k), n=n, m=ours.m, distribution=ours.distribution,
                                 art_lambda=ours.art_lambda, top1_mode=ours.top1_mode)})
                for method in REFERENCE_METHODS.get(ours.sorter, ())]
    if name == "berrada_smooth":
        ours = harness.build_loss(name, n, **params)
        if ours.alpha != 1.0:  # the port fixes α = 1
            return []
        return [(f"ref:{cls}", {"cls": cls, "kwargs": dict(num_classes=n, k=ours.k, tau=ours.tau)})
                for cls in ("SmoothTopKLoss", "SmoothHardTopKLoss")]
    return []


def build_reference(spec: dict[str, Any], device: torch.device) -> Callable:
    """Instantiate a reference loss from a spec of `reference_specs`."""
    ref = import_reference()
    if ref is None:
        raise ModuleNotFoundError("reference package difftopk is not installed")
    with contextlib.redirect_stdout(io.StringIO()):
        return getattr(ref, spec["cls"])(device=str(device), **spec["kwargs"]).to(device)
