"""Vision models: forward shapes on 32×32 input, torchvision models by name."""
from __future__ import annotations

import pytest
import torch

from harness.registry import MODELS, RegistryError


def build(name: str, num_classes: int = 100, **params):
    entry = MODELS.get(name)
    return entry.obj((3, 32, 32), num_classes, **entry.validate_params(params))


@pytest.mark.parametrize("name,params", [("resnet18_cifar", {}), ("resnet18_cifar", {"maxpool": True}),
                                         ("small_cnn", {}), ("small_cnn", {"width": 8, "dropout": 0.1})])
def test_forward_shapes(name, params):
    model = build(name, **params).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_resnet18_cifar_stem_and_channels_last():
    model = build("resnet18_cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert not isinstance(build("resnet18_cifar", maxpool=True).maxpool, torch.nn.Identity)
    model = model.to(memory_format=torch.channels_last).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert model(x).shape == (2, 100)


def test_small_cnn_learns_on_cpu():
    torch.manual_seed(0)
    model = build("small_cnn", num_classes=4, width=4)
    x, y = torch.randn(16, 3, 8, 8), torch.arange(4).repeat(4)
    x[torch.arange(16), y % 3, :, :] += 2.0 * (1 + (y == 3).float()).view(16, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_by_name(arch):
    model = build("torchvision", num_classes=7, arch=arch).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_torchvision_unknown_name():
    with pytest.raises(RegistryError, match="did you mean 'resnet18'"):
        build("torchvision", arch="resnet81")


def test_random_images_train_one_epoch_end_to_end(write_suite, tmp_path):
    """The timing stand-in for CIFAR-100: CIFAR shapes, on-device crop + flip, through `topk-bench run`."""
    from harness.cli import main
    from harness.store import RunStore

    path = write_suite("""
suite: ri
seeds: [0]
dataset: {name: random_images, params: {classes: 10, train_size: 64, val_size: 16, test_size: 16}}
model: {name: small_cnn, params: {width: 4}}
train: {epochs: 1, batch_size: 32, channels_last: true}
losses: [softmax]
resources: {device: cpu}
""")
    assert main(["run", str(path), "--results-dir", str(tmp_path / "r")]) == 0
    (record,) = RunStore(tmp_path / "r", "ri").records()
    assert record["status"] == "done" and record["timings"]["median_epoch_s"] > 0
    assert record["data_info"]["purpose"].startswith("timing only")
