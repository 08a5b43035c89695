"""The plugin contract (harness.testing), checked on every built-in loss (a new one is covered automatically).

The checks themselves live in harness/testing.py, the code plugin authors run (`topk-bench check-loss`
or `contract_cases` in their own pytest suite); per-family oracles live in each family's test file.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import harness
from harness.testing import check_extremes, check_k_rejected, contract_cases

BUILTIN = [e.name for e in harness.list_losses() if e.obj is not None and e.obj.__module__.startswith("losses.")]


def test_every_builtin_family_is_covered():
    families = {harness.LOSSES.get(n).family for n in BUILTIN}
    assert {"softmax", "berrada", "hinge", "lapin", "transition", "noised", "petersen"} <= families


@pytest.mark.parametrize("case", contract_cases(BUILTIN), ids=str)
def test_contract(case):
    case.run()


class _NaNOnTies(nn.Module):
    """Breaks the contract: NaN when every score ties, and no check of k."""

    def __init__(self, num_classes: int, k: int = 1) -> None:
        super().__init__()

    def forward(self, scores, labels):
        spread = scores.float().std(dim=1)
        return (scores.float().sum(dim=1) / spread).mean()


def test_checks_catch_a_broken_loss(monkeypatch):
    """The checks fail on a loss that breaks the contract (they are not vacuous)."""
    reg = harness.registry.Registry("loss", None, check=harness.registry._check_loss)
    reg.register("broken_for_test", params={"k": harness.Param(int, 1, ge=1)})(_NaNOnTies)
    monkeypatch.setattr("harness.testing.LOSSES", reg)
    monkeypatch.setattr("harness.LOSSES", reg)
    with pytest.raises(AssertionError, match="ties"):
        check_extremes("broken_for_test")
    with pytest.raises(AssertionError, match="accepted"):
        check_k_rejected("broken_for_test")
    assert torch.isnan(_NaNOnTies(3)(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)))


def test_check_loss_command(capsys):
    from harness.cli import main

    assert main(["check-loss", "softmax", "berrada_smooth"]) == 0
    out = capsys.readouterr().out
    assert "ok   softmax-extremes" in out and "ok   berrada_smooth-k_rejected" in out and "all checks passed" in out
    assert main(["check-loss", "sofmax"]) == 2
    assert "did you mean 'softmax'" in capsys.readouterr().err
    assert main(["check-loss"]) == 2
