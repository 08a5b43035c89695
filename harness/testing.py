"""The loss plugin contract as reusable checks, for this project's tests and for plugin authors.

Every registered loss must give a finite float32 scalar with finite gradients on random, huge and
tied scores, a batch of one and bf16 input; work at its smallest class count; pass a float64
gradcheck; and, when it has a `k` parameter, refuse k ≥ num_classes with a one-line ValueError
that names `k=…`. A loss may tune the checks with `register_loss(..., contract={...})`:
`params` (used for every check, e.g. a shorter `p_k`), `min_classes` (default 2) and
`gradcheck` (False for Monte-Carlo losses, which need their own test).

Run them from the command line on any registered loss (built-in or plugin):

    topk-bench check-loss my_loss            # or --all

or from pytest in a plugin's own test suite:

    import pytest
    from harness.testing import contract_cases

    @pytest.mark.parametrize("case", contract_cases(["my_loss"]), ids=str)
    def test_loss_contract(case):
        case.run()
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

import harness
from harness.errors import RegistryError
from harness.registry import LOSSES

log = logging.getLogger(__name__)


def contract_of(name: str) -> dict[str, Any]:
    """The loss's contract settings (`register_loss(..., contract=...)`) with defaults filled in."""
    declared = LOSSES.get(name).extra.get("contract") or {}
    return {"params": dict(declared.get("params", {})), "min_classes": int(declared.get("min_classes", 2)),
            "gradcheck": bool(declared.get("gradcheck", True))}


def _params(name: str) -> dict[str, Any]:
    params = contract_of(name)["params"]
    if "k" in LOSSES.get(name).params:
        params["k"] = 1  # valid at every class count ≥ 2
    return params


def check_extremes(name: str) -> None:
    """Scalar, float32 (also for bf16 input), finite value and gradient on extreme and tied scores."""
    n = max(7, contract_of(name)["min_classes"])
    loss = harness.build_loss(name, n, **_params(name))
    torch.manual_seed(0)
    cases = {"random": torch.randn(5, n), "huge": torch.randn(5, n) * 1e4, "ties": torch.zeros(5, n),
             "one": torch.randn(1, n), "bf16": torch.randn(5, n).bfloat16()}
    for case, scores in cases.items():
        x = scores.clone().requires_grad_()
        value = loss(x, torch.arange(x.shape[0]) % n)
        value.backward()
        assert value.dim() == 0, f"{case} scores: the loss is not a scalar (shape {tuple(value.shape)})"
        assert value.dtype == torch.float32, f"{case} scores: dtype {value.dtype}, expected torch.float32"
        assert torch.isfinite(value), f"{case} scores: loss {value.item()}"
        assert torch.isfinite(x.grad).all(), f"{case} scores: non-finite gradient"


def check_smallest_class_count(name: str) -> None:
    """Finite value and gradient at the smallest class count the loss accepts."""
    n = contract_of(name)["min_classes"]
    loss = harness.build_loss(name, n, **_params(name))
    x = torch.randn(3, n, requires_grad=True)
    value = loss(x, torch.tensor([0, 1, n - 1]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all(), f"{n} classes: loss {value.item()}"


def check_gradcheck(name: str) -> None:
    """torch.autograd.gradcheck in float64 (skipped when the loss declares gradcheck=False)."""
    if not contract_of(name)["gradcheck"]:
        return
    n = max(6, contract_of(name)["min_classes"])
    loss = harness.build_loss(name, n, **_params(name))
    x = (torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    y = torch.tensor([0, 3, 5])
    assert torch.autograd.gradcheck(lambda s: loss(s, y), (x,), atol=1e-6)


def check_k_rejected(name: str) -> None:
    """A loss with a `k` parameter refuses k = num_classes with a one-line ValueError naming `k=`."""
    if "k" not in LOSSES.get(name).params:
        return
    n = max(5, contract_of(name)["min_classes"])
    try:
        harness.build_loss(name, n, **{**_params(name), "k": n})
    except ValueError as exc:
        text = str(exc)
        assert "\n" not in text and f"k={n}" in text, f"k={n} with {n} classes: message {text!r}"
        return
    raise AssertionError(f"k={n} with {n} classes was accepted")


CHECKS: tuple[Callable[[str], None], ...] = (check_extremes, check_smallest_class_count, check_gradcheck,
                                             check_k_rejected)


@dataclass(frozen=True)
class ContractCase:
    """One check on one loss; `run()` raises AssertionError (or the loss's exception) on failure."""

    loss: str
    check: Callable[[str], None]

    def run(self) -> None:
        self.check(self.loss)

    def __str__(self) -> str:
        return f"{self.loss}-{self.check.__name__.removeprefix('check_')}"


def contract_cases(names: Iterable[str] | None = None) -> list[ContractCase]:
    """Every check for each named loss (default: every available registered loss)."""
    if names is None:
        names = [e.name for e in LOSSES.entries() if e.available]
    return [ContractCase(LOSSES.get(name).name, check) for name in names for check in CHECKS]


# ----------------------------------------------------------------------------- CLI: check-loss
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("losses", nargs="*", metavar="NAME", help="registered loss names")
    parser.add_argument("--all", action="store_true", help="every available registered loss")


def run(args: argparse.Namespace) -> int:
    if not args.losses and not args.all:
        raise RegistryError("check-loss: give loss NAMEs or --all")
    names = None if args.all else args.losses
    for name in names or []:
        entry = LOSSES.get(name, where="check-loss")
        if entry.unavailable_reason:
            raise RegistryError(f"check-loss: loss '{name}' is unavailable: {entry.unavailable_reason}")
    failed, cases = 0, contract_cases(names)
    for case in cases:
        try:
            case.run()
        except Exception as exc:  # noqa: BLE001  (report every failing check, then exit 1)
            failed += 1
            print(f"FAIL {case}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        else:
            print(f"ok   {case}")
    print(f"{failed} of {len(cases)} checks failed" if failed else "all checks passed")
    return 1 if failed else 0
