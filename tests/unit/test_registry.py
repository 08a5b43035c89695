"""Registry: schemas, did-you-mean, third-party entry points, unavailable plugins."""
from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import harness
from harness.registry import Param, Registry, RegistryError, _check_loss


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
        "from torch import nn\n"
        "from harness.registry import Param, LOSSES\n"
        "@LOSSES.register('my_plugin_loss', family='third-party', params={'k': Param(int, 2, ge=1)})\n"
        "class MyLoss(nn.Module):\n"
        "    def __init__(self, num_classes, k=2):\n"
        "        super().__init__()\n"
        "        self.k = k\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    group = "topk_bench.losses_test"
    eps = [importlib.metadata.EntryPoint("mine", "my_topk_plugin", group),
           importlib.metadata.EntryPoint("broken", "no_such_module_xyz", group)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: eps if group == "topk_bench.losses_test" else [])
    reg = Registry("loss", group, check=_check_loss)
    monkeypatch.setattr("harness.registry.LOSSES", reg)
    assert reg.names() == ["broken", "my_plugin_loss"]
    assert reg.get("broken").unavailable_reason.startswith("plugin failed to import")
    assert reg.get("my_plugin_loss").validate_params({}) == {"k": 2}
    sys.modules.pop("my_topk_plugin", None)


ROOT = Path(__file__).resolve().parents[2]


def _no_entry_points(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [])


def test_builtins_register_without_entry_points():
    """Built-ins are imported directly: with no entry points at all (not installed) they are all there."""
    code = ("import importlib.metadata as m\norig = m.entry_points\n"
            "m.entry_points = lambda **kw: [] if str(kw.get('group')).startswith('topk_bench') else orig(**kw)\n"
            "import harness\n"
            "print(harness.LOSSES.names(), harness.DATASETS.names(), harness.MODELS.names())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("'softmax'", "'berrada_smooth'", "'difftopk'", "'synthetic'", "'features'", "'mlp'"):
        assert name in proc.stdout, (name, proc.stdout)
    assert "builtin" not in proc.stdout


def _bare_venv(tmp_path: Path) -> Path:
    """A venv that sees this venv's packages except this project's distribution (not installed there)."""
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    mirror = tmp_path / "site"
    mirror.mkdir()
    for item in site.iterdir():
        low = item.name.lower()
        if not (low.startswith(("topk_loss_bench", "topk_bench", "__editable__", "_topk")) or low.endswith(".pth")):
            (mirror / item.name).symlink_to(item)
    (next((env / "lib").glob("python3*")) / "site-packages" / "mirror.pth").write_text(str(mirror) + "\n")
    return env / "bin" / "python"


def test_python_m_harness_from_a_clone_without_installing(tmp_path):
    python = _bare_venv(tmp_path)
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('harness'))"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert probe.stdout.strip() == "None", probe.stdout  # really not installed there
    proc = subprocess.run([str(python), "-m", "harness", "list"], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("softmax", "berrada_smooth", "difftopk", "synthetic", "features", "mlp", "resnet18_cifar"):
        assert f"\n{name} " in proc.stdout, name
    assert "builtin" not in proc.stdout


def _package(tmp_path: Path, name: str, modules: dict[str, str]) -> None:
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("".join(f"from {name} import {m}  # noqa\n" for m in modules))
    for module, text in modules.items():
        (tmp_path / name / f"{module}.py").write_text(text)


def test_broken_builtin_module_fails_loudly(tmp_path, monkeypatch):
    """A broken built-in raises (with a note naming it) instead of dropping every module after it."""
    register = ("from torch import nn\nfrom harness.registry import LOSSES\n"
                "@LOSSES.register('{0}')\nclass L(nn.Module):\n    pass\n")
    _package(tmp_path, "fake_builtin_losses", {"first": register.format("first_loss"),
                                               "broken": "raise ImportError('no module named nonexistent')\n",
                                               "last": register.format("last_loss")})
    monkeypatch.syspath_prepend(str(tmp_path))
    _no_entry_points(monkeypatch)
    reg = Registry("loss", "topk_bench.losses", builtins=("fake_builtin_losses",), check=_check_loss)
    monkeypatch.setattr("harness.registry.LOSSES", reg)
    with pytest.raises(ImportError, match="nonexistent") as info:
        reg.names()
    assert any("built-in loss module 'fake_builtin_losses'" in note for note in info.value.__notes__)
    with pytest.raises(ImportError):  # and again on the next use: never a half-filled registry
        reg.get("first_loss")
    for module in [m for m in sys.modules if m.startswith("fake_builtin_losses")]:
        monkeypatch.delitem(sys.modules, module)


def test_loss_must_be_an_nn_module():
    with pytest.raises(RegistryError, match="'not_a_module'.*not a torch.nn.Module subclass"):
        harness.register_loss("not_a_module")(lambda num_classes: None)

    with pytest.raises(RegistryError, match="not a torch.nn.Module subclass"):
        @harness.register_loss("plain_class")
        class Plain:
            def __call__(self, scores, labels):
                return scores.sum()

    assert "not_a_module" not in harness.LOSSES and "plain_class" not in harness.LOSSES


def test_dataset_needs_an_explicit_num_classes():
    def load(seed, **params):
        return None

    with pytest.raises(TypeError, match="num_classes"):
        harness.register_dataset("ds_without_classes")(load)
    with pytest.raises(RegistryError, match="num_classes=callable"):
        harness.register_dataset("ds_with_constant", num_classes=10)(load)
    with pytest.raises(RegistryError, match="num_classes=callable"):
        harness.DATASETS.register("ds_direct")(load)
    assert harness.DATASETS.get("synthetic").extra["num_classes"]({"classes": 7}) == 7
    assert "ds_without_classes" not in harness.DATASETS


def test_provenance_of_builtins_and_of_a_plugin_distribution(tmp_path, monkeypatch):
    entry = harness.LOSSES.get("softmax")
    assert entry.provenance() == {"name": "softmax", "version": entry.version, "module": "losses.softmax",
                                  "distribution": "topk-loss-bench", "distribution_version": harness.__version__}
    assert harness.DATASETS.get("synthetic").distribution == "topk-loss-bench"
    # a third-party module shipped by an installed distribution "acme-topk" 2.3.4
    (tmp_path / "acme_topk_losses.py").write_text(
        "from torch import nn\nfrom harness.registry import LOSSES\n"
        "@LOSSES.register('acme_loss', version=3)\nclass Acme(nn.Module):\n    pass\n")
    dist = tmp_path / "acme_topk-2.3.4.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-topk\nVersion: 2.3.4\n")
    (dist / "top_level.txt").write_text("acme_topk_losses\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    harness.registry._packages_distributions.cache_clear()
    reg = Registry("loss", None, check=_check_loss)
    monkeypatch.setattr("harness.registry.LOSSES", reg)
    try:
        importlib.import_module("acme_topk_losses")
        assert reg.get("acme_loss").provenance() == {
            "name": "acme_loss", "version": 3, "module": "acme_topk_losses",
            "distribution": "acme-topk", "distribution_version": "2.3.4"}
    finally:
        sys.modules.pop("acme_topk_losses", None)
        harness.registry._packages_distributions.cache_clear()
