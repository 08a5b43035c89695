"""Registry: schemas, did-you-mean, third-party entry points, unavailable plugins."""
from __future__ import annotations

import importlib.metadata
import sys

import pytest

import harness
from harness.registry import Param, Registry, RegistryError


def test_param_checks():
    p = Param(float, 1.0, gt=0)
    assert p.check("tau", 2) == 2.0 and isinstance(p.check("tau", 2), float)
    with pytest.raises(RegistryError, match="tau: -1.0 out of range"):
        p.check("tau", -1)
    with pytest.raises(RegistryError, match="expected int"):
        Param(int, 1).check("k", True)
    with pytest.raises(RegistryError, match="did you mean 'odd_even'"):
        Param(str, "a", choices=("odd_even", "bitonic")).check("sorter", "odd_evn")
    assert Param(int, None, optional=True).check("m", None) is None


def test_build_loss_validates_and_lists():
    loss = harness.build_loss("softmax", 10, label_smoothing=0.1)
    assert loss.label_smoothing == 0.1
    with pytest.raises(RegistryError, match="did you mean 'softmax'"):
        harness.build_loss("softmaxx", 10)
    names = [e.name for e in harness.list_losses()]
    assert "softmax" in names
    entry = harness.LOSSES.get("ce")  # alias
    assert entry.name == "softmax" and entry.family and entry.paper and entry.version >= 1


def test_third_party_entry_point(monkeypatch, tmp_path):
    """A module named by an entry point registers its losses on import; a broken one is listed."""
    (tmp_path / "my_topk_plugin.py").write_text(
        "from harness.registry import Param, LOSSES\n"
        "@LOSSES.register('my_plugin_loss', family='third-party', params={'k': Param(int, 2, ge=1)})\n"
        "class MyLoss:\n"
        "    def __init__(self, num_classes, k=2):\n"
        "        self.k = k\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    group = "topk_bench.losses_test"
    eps = [importlib.metadata.EntryPoint("mine", "my_topk_plugin", group),
           importlib.metadata.EntryPoint("broken", "no_such_module_xyz", group)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: eps if group == "topk_bench.losses_test" else [])
    reg = Registry("loss", group)
    monkeypatch.setattr("harness.registry.LOSSES", reg)
    assert reg.names() == ["broken", "my_plugin_loss"]
    assert reg.get("broken").unavailable_reason.startswith("plugin failed to import")
    assert reg.get("my_plugin_loss").validate_params({}) == {"k": 2}
    sys.modules.pop("my_topk_plugin", None)
