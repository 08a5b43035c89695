"""Suite reading: numbers parse the same way everywhere, limits, eval.k, validation hooks, run counting."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from harness.docload import MAX_DEPTH, MAX_VALUES, BoundedSafeLoader, non_finite_path, read_mapping
from harness.errors import RegistryError, SuiteError
from harness.registry import MODELS, Param
from harness.resources_check import check_slurm_params, parameter_count
from harness.suite import count_runs, load_suite

GOOD = """\
suite: s
seeds: [0]
dataset: {name: synthetic, params: {classes: 8, superclasses: 2, train_size: 64, val_size: 32, test_size: 32}}
model: {name: mlp, params: {hidden: 8}}
train: {epochs: 1, batch_size: 32, optimizer: {lr: 1e-3}}
eval: {k: [1, 2]}
losses: [softmax, {name: berrada_smooth, params: {k: 2, tau: 1e-3}}]
"""


def load(text: str):
    return yaml.load(text, Loader=BoundedSafeLoader)  # noqa: S506 - a SafeLoader subclass


@pytest.mark.parametrize("text,value", [
    ("1e-3", 1e-3), ("1E5", 1e5), ("-2e+2", -200.0), ("1.0e5", 1e5), ("1.5e-3", 1.5e-3), (".5e1", 5.0),
    ("1.0", 1.0), ("1_000.5", 1000.5), (".inf", math.inf),
])
def test_exponent_forms_are_floats(text, value):
    parsed = load(f"x: {text}")["x"]
    assert isinstance(parsed, float) and parsed == value


@pytest.mark.parametrize("text,value", [
    ("10", 10), ("-3", -3), ("0x10", 16), ("'1e-3'", "1e-3"), ("1e", "1e"), ("e5", "e5"), ("1.2.3", "1.2.3"),
    ("true", True), ("cuda:1", "cuda:1"),
])
def test_other_scalars_unchanged(text, value):
    parsed = load(f"x: {text}")["x"]
    assert type(parsed) is type(value) and parsed == value


def test_plain_safe_loader_is_not_modified():
    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"  # our resolver lives on the subclass only


def test_tau_and_lr_both_parse_as_floats(tmp_path):
    for name, text in (("a.yaml", GOOD), ("b.yaml", GOOD.replace("1e-3", "1E-3"))):
        path = tmp_path / name
        path.write_text(text)
        suite = load_suite(path)
        assert suite.model.train.optimizer.lr == 1e-3
        tau = suite.runs[1].loss.params["tau"]
        assert isinstance(tau, float) and tau == 1e-3
    toml = tmp_path / "c.toml"
    toml.write_text("""suite = "s"
seeds = [0]
losses = ["softmax", {name = "berrada_smooth", params = {k = 2, tau = 1e-3}}]
dataset = {name = "synthetic", params = {classes = 8, superclasses = 2, train_size = 64, val_size = 32, test_size = 32}}
model = {name = "mlp", params = {hidden = 8}}
train = {epochs = 1, batch_size = 32, optimizer = {lr = 1e-3}}
eval = {k = [1, 2]}
""")
    assert [r.run_id for r in load_suite(toml).runs] == [r.run_id for r in load_suite(tmp_path / "a.yaml").runs]


def test_param_check_numbers():
    p = Param(float, 1.0, gt=0)
    assert p.check("tau", "1e-3") == 1e-3  # a quoted number reads as pydantic reads `lr: "1e-3"`
    assert p.check("tau", 2) == 2.0 and isinstance(p.check("tau", 2), float)
    assert Param(int, 1).check("k", "7") == 7
    assert Param(str, "a").check("name", "1e-3") == "1e-3"  # a string parameter keeps its string
    for bad in (math.inf, -math.inf, math.nan, "inf", "nan", "1e400"):
        with pytest.raises(RegistryError, match="tau"):
            p.check("tau", bad)
    with pytest.raises(RegistryError, match="finite"):
        Param(list, [1.0]).check("p_k", [0.5, [math.nan]])
    with pytest.raises(RegistryError) as info:
        Param(int, 1).check("k", "x" * 10_000)
    assert len(str(info.value)) < 200


def test_non_finite_path_names_the_key():
    assert non_finite_path({"a": [1.0, {"b": math.nan}]}) == ("a[1].b", pytest.approx(math.nan, nan_ok=True))
    assert non_finite_path({"a": [1.0, 2]}) is None


def test_limits_are_just_above_legal_documents(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("x: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n")
    assert read_mapping(ok)["x"] is not None
    deep = tmp_path / "deep.yaml"
    deep.write_text("x: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n")
    with pytest.raises(SuiteError, match="nested more than"):
        read_mapping(deep)
    wide = tmp_path / "wide.yaml"  # many shared aliases whose expansion stays under the cap is fine
    wide.write_text("a: &a [1, 2, 3]\nb: [" + ", ".join(["*a"] * 100) + "]\n")
    assert len(read_mapping(wide)["b"]) == 100
    big = tmp_path / "big.yaml"
    big.write_text("a: &a [" + ", ".join(["0"] * 1000) + "]\nb: [" + ", ".join(["*a"] * (MAX_VALUES // 1000)) + "]\n")
    with pytest.raises(SuiteError, match="expands to more than"):
        read_mapping(big)


def test_eval_k_range_and_duplicates(tmp_path):
    path = tmp_path / "s.yaml"
    for ks, message in (("[0]", "eval.k[0]"), ("[-3, 1]", "eval.k[0]"), ("[1, 9]", "exceeds the 8 classes"),
                        ("[2, 2]", "listed twice")):
        path.write_text(GOOD.replace("k: [1, 2]", f"k: {ks}"))
        with pytest.raises(SuiteError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_suite(path)
    path.write_text(GOOD.replace("k: [1, 2]", "k: [1, 8]"))
    assert load_suite(path).runs[0].eval["k"] == [1, 8]  # k = classes is allowed


def test_hooks_run_at_load_without_building(tmp_path, monkeypatch):
    built = []
    entry = MODELS.get("torchvision")
    monkeypatch.setattr(entry, "obj", lambda *a, **k: built.append(a))
    path = tmp_path / "s.yaml"
    path.write_text(GOOD.replace("{name: mlp, params: {hidden: 8}}", "{name: torchvision, params: {arch: resnet81}}"))
    with pytest.raises(SuiteError, match=r"model\.params\.arch: unknown torchvision model 'resnet81' \(did you mean"):
        load_suite(path)
    path.write_text(GOOD.replace("{name: mlp, params: {hidden: 8}}", "{name: torchvision, params: {arch: resnet18}}"))
    assert load_suite(path).runs[0].model.params == {"arch": "resnet18"}
    assert built == []
    path.write_text(GOOD.replace("superclasses: 2", "superclasses: 8"))  # = classes: allowed
    assert load_suite(path).runs
    path.write_text(GOOD.replace("superclasses: 2", "superclasses: 9"))
    with pytest.raises(SuiteError, match=r"dataset\.params\.superclasses: 9 must be ≤ classes \(8\)"):
        load_suite(path)


def test_count_runs_matches_expansion(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD.replace("seeds: [0]", "seeds: [0, 1, 2]").replace("hidden: 8", "hidden: [8, 16]")
                    .replace("tau: 1e-3", "tau: [1e-3, 1.0], alpha: [0.5, 1.0]")
                    .replace("superclasses: 2", "superclasses: 2, noise: [0.0, 0.1]"))
    suite = load_suite(path)
    total, factors = count_runs(suite.model)
    assert total == len(suite.runs) == 2 * 2 * (1 + 4) * 3
    assert factors == "2 datasets × 2 models × 5 loss configurations × 3 seeds"
    with pytest.raises(SuiteError, match="expands to 60 runs"):
        load_suite(path, max_runs=59)
    assert len(load_suite(path, max_runs=60).runs) == 60


def test_difftopk_p_k_list_of_lists_counts_as_one_axis(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(GOOD.replace("losses: [softmax, {name: berrada_smooth, params: {k: 2, tau: 1e-3}}]",
                                 "losses: [{name: difftopk, params: {p_k: [[0.5, 0.5], [1.0, 0.0]], m: 4}},"
                                 " {name: difftopk, params: {p_k: [0.25, 0.75], m: 4}}]"))
    suite = load_suite(path)
    assert count_runs(suite.model)[0] == len(suite.runs) == 3


@pytest.mark.parametrize("params", [{}, {"slurm_partition": "gpu", "mem_gb": 16, "gpus_per_node": 1,
                                         "cluster": "debug", "slurm_additional_parameters": {"x": 1}}])
def test_valid_slurm_parameters_accepted(params):
    check_slurm_params(params)


def test_parameter_count_on_meta_equals_built_model():
    for name, params in (("mlp", {"hidden": 32, "depth": 2, "dropout": 0.0}), ("small_cnn", {"width": 4,
                                                                                             "dropout": 0.0})):
        build = MODELS.get(name).obj
        shape = (3, 8, 8)
        real = sum(p.numel() for p in build(shape, 10, **params).parameters())
        assert parameter_count(build, shape, 10, params) == real
    assert torch.empty(1).device.type == "cpu"  # the meta device does not leak out


def test_model_memory_boundary(tmp_path, monkeypatch):
    """16 bytes a parameter (weights, grads, two Adam moments) against the device's memory."""
    import harness.resources_check as rc

    path = tmp_path / "s.yaml"
    path.write_text(GOOD.replace("hidden: 8", "hidden: 10"))
    suite = load_suite(path)
    params = (16 * 10 + 10) + (10 * 8 + 8)  # synthetic dim 16 -> hidden 10 -> 8 classes
    monkeypatch.setattr(rc, "_available_memory", lambda device: (params * 16, "GPU 0"))
    rc.check_model_memory(suite, "cuda")
    monkeypatch.setattr(rc, "_available_memory", lambda device: (params * 16 - 1, "GPU 0"))
    with pytest.raises(SuiteError, match=f"model: mlp\\[.*\\] has {params:,} parameters.*GPU 0"):
        rc.check_model_memory(suite, "cuda")
