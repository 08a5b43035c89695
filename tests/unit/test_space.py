"""Search-space hints: validation, parsing, grids; every built-in hint is a valid range of its parameter."""
from __future__ import annotations

import optuna
import pytest

from harness import space
from harness.registry import LOSSES


@pytest.mark.parametrize("make, message", [
    (lambda: space.Log(0.0, 1.0), "must not reach 0"),
    (lambda: space.Log(-1.0, 1.0), "must not reach 0"),
    (lambda: space.Linear(1.0, 1.0), "empty range"),
    (lambda: space.Linear(2.0, 1.0), "inverted range"),
    (lambda: space.Linear(0.0, float("inf")), "finite"),
    (lambda: space.Choice(()), "empty choice"),
    (lambda: space.Choice((1, 1)), "twice"),
])
def test_bad_spaces_are_rejected(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_parse_and_grid():
    assert space.parse({"log": [1e-3, 10]}) == space.Log(1e-3, 10)
    assert space.parse({"linear": [0, 1]}) == space.Linear(0, 1)
    assert space.parse({"choice": ["a", "b"]}) == space.Choice(("a", "b"))
    for bad in ({"log": [1]}, {"log": 1}, {"range": [0, 1]}, [0, 1], {"log": [1, 2], "linear": [1, 2]}):
        with pytest.raises(ValueError):
            space.parse(bad)
    assert space.Log(1e-3, 10).grid(5, False) == pytest.approx([1e-3, 1e-2, 1e-1, 1, 10])
    assert space.Linear(0, 1).grid(3, False) == [0.0, 0.5, 1.0]
    assert space.Linear(1, 4).grid(10, True) == [1, 2, 3, 4]


def test_suggestions_stay_in_range_and_are_rounded():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        value = space.Log(1e-4, 1e-1).suggest(trial, "lr", False)
        assert 1e-4 <= value <= 1e-1 and value == space.round_sig(value)
        assert space.Choice(("x", "y")).suggest(trial, "c", False) in ("x", "y")
        study.tell(trial, value)


def test_when_limits_a_hint_to_matching_rows():
    hint = space.Linear(0.0, 1.0, when={"schedule": ("linear", "step")})
    assert space.applies(hint, {"schedule": "step"}) and not space.applies(hint, {"schedule": "constant"})
    assert space.applies(space.Linear(0.0, 1.0), {})


def test_every_builtin_hint_is_a_valid_range_of_its_parameter():
    hinted = {}
    for entry in LOSSES.entries():
        for name, param in entry.params.items():
            if param.search is None:
                continue
            hinted.setdefault(entry.name, []).append(name)
            for value in param.search.endpoints():
                assert param.check(name, value) == value  # both ends are allowed values
            for key in param.search.when:
                assert key in entry.params, (entry.name, name, key)
    # the knobs worth tuning, per family
    assert hinted["softmax"] == ["label_smoothing"]
    assert set(hinted["berrada_smooth"]) == {"alpha", "tau"} and hinted["berrada_hard"] == ["alpha"]
    assert hinted["lapin_svm_alpha"] == hinted["lapin_svm_beta"] == ["gamma"]
    assert "epsilon" in hinted["noised_topk"]
    assert {"start", "end", "lambda_value", "adaptive_target"} <= set(hinted["topk_transition"])
    assert {"inverse_temperature", "art_lambda"} <= set(hinted["difftopk"])
    assert hinted["lapsum"] == ["alpha"] and hinted["lml"] == ["tau"]
    assert hinted["soft_rank"] == hinted["soft_topk"] == hinted["sparse_topk"] == ["epsilon"]
