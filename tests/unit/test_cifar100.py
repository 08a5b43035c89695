"""CIFAR-100 loader on a tiny archive in the real on-disk format, read by torchvision's own class."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR100

from harness.data import cifar100
from harness.errors import DataError
from harness.registry import DATASETS

PER_CLASS, TEST = 10, 200


def coarse_of(fine: np.ndarray) -> np.ndarray:
    """Superclasses of 5 non-consecutive classes each (unlike block5)."""
    return (fine * 7) % 20


def write_tiny_cifar(root: Path, per_class: int = PER_CLASS, test: int = TEST, seed: int = 0) -> Path:
    """`root/cifar-100-python/{train,test,meta}`: Python-2 style pickles (str keys when read with
    encoding='latin1', as torchvision reads the real files)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, fine in (("train", np.repeat(np.arange(100), per_class)), ("test", np.arange(test) % 100)):
        fine = rng.permutation(fine)
        entry = {
            "batch_label": f"{name} batch",
            "data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8),
            "fine_labels": fine.tolist(),
            "coarse_labels": coarse_of(fine).tolist(),
            "filenames": [f"img_{i}.png" for i in range(len(fine))],
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)],
            "coarse_label_names": [f"super{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def skip_checksums(monkeypatch) -> None:
    """Bypass only torchvision's md5 checks (of the data files and of `meta`)."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())


@pytest.fixture
def tiny(tmp_path, monkeypatch) -> Path:
    skip_checksums(monkeypatch)
    return write_tiny_cifar(tmp_path / "cifar")


def load(root: Path, seed: int = 0, **params):
    entry = DATASETS.get("cifar100")
    return entry.obj(seed=seed, **entry.validate_params({"root": str(root), "download": False, **params}))


def test_shapes_splits_and_normalisation(tiny):
    b = load(tiny, val_fraction=0.1)
    assert b.num_classes == 100 and b.input_shape == (3, 32, 32)
    assert (len(b.train), len(b.val), len(b.test)) == (900, 100, TEST)
    assert torch.equal(torch.bincount(b.val.y), torch.ones(100, dtype=torch.long))  # stratified
    assert b.train.x.shape == (900, 3, 32, 32) and b.train.x.dtype == torch.float32
    raw = pickle.loads((tiny / "cifar-100-python" / "test").read_bytes(), encoding="latin1")
    img = torch.tensor(raw["data"][0], dtype=torch.float32).view(3, 32, 32) / 255
    mean, std = torch.tensor(cifar100.MEAN).view(3, 1, 1), torch.tensor(cifar100.STD).view(3, 1, 1)
    assert torch.allclose(b.test.x[0], (img - mean) / std, atol=1e-6)
    assert int(b.test.y[0]) == raw["fine_labels"][0]
    assert b.info["flipped_labels"] == 0 and b.info["train_size"] == 900
    assert DATASETS.get("cifar100").extra["num_classes"]({}) == 100
    # the val split depends on split_seed, not on the run seed
    assert torch.equal(load(tiny, seed=5, val_fraction=0.1).val.x, b.val.x)


def test_augmentation_shape_determinism_and_content(tiny):
    b = load(tiny, val_fraction=0.1)
    x = b.train.x[:16]
    out1 = b.train_transform(x, torch.Generator().manual_seed(1))
    out2 = b.train_transform(x, torch.Generator().manual_seed(1))
    assert out1.shape == x.shape and torch.equal(out1, out2)
    assert not torch.equal(out1, b.train_transform(x, torch.Generator().manual_seed(2)))
    fill = (-torch.tensor(cifar100.MEAN) / torch.tensor(cifar100.STD)).view(1, 3, 1, 1)
    padded = fill.repeat(16, 1, 40, 40)
    padded[:, :, 4:36, 4:36] = x
    for i in range(16):  # every output is a 32×32 window of the padded image, maybe flipped
        windows = [padded[i, :, r : r + 32, c : c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(out1[i], w) or torch.equal(out1[i], w.flip(2)) for w in windows)
    assert load(tiny, augment=False).train_transform is None


def test_block5_noise_changes_only_train_within_blocks(tiny):
    clean = load(tiny, val_fraction=0.1)
    noisy = load(tiny, val_fraction=0.1, noise=0.5)
    changed = noisy.train.y != clean.train.y
    assert int(changed.sum()) == noisy.info["flipped_labels"]
    expected = 0.5 * 0.8 * 900
    assert abs(int(changed.sum()) - expected) < 4 * (900 * 0.4 * 0.6) ** 0.5
    assert torch.equal(noisy.train.y // 5, clean.train.y // 5)
    assert torch.equal(noisy.val.y, clean.val.y) and torch.equal(noisy.test.y, clean.test.y)
    assert torch.equal(noisy.train.x, clean.train.x)
    assert torch.equal(load(tiny, val_fraction=0.1, noise=0.5).train.y, noisy.train.y)  # seeded
    assert not torch.equal(load(tiny, seed=1, val_fraction=0.1, noise=0.5).train.y, noisy.train.y)


def test_coarse_noise_uses_superclasses_from_the_pickle(tiny):
    clean = load(tiny, val_fraction=0.1)
    noisy = load(tiny, val_fraction=0.1, noise=1.0, noise_mode="coarse")
    changed = noisy.train.y != clean.train.y
    assert changed.float().mean() > 0.7
    sup = torch.from_numpy(coarse_of(np.arange(100)))
    assert torch.equal(sup[noisy.train.y], sup[clean.train.y])
    assert (noisy.train.y[changed] // 5 != clean.train.y[changed] // 5).any()  # not block5


def test_subsets(tiny):
    b = load(tiny, val_fraction=0.1, per_class=4)
    assert torch.equal(torch.bincount(b.train.y), torch.full((100,), 4)) and len(b.val) == 100
    b = load(tiny, val_fraction=0.1, train_fraction=1 / 3)
    assert torch.equal(torch.bincount(b.train.y), torch.full((100,), 3))
    with pytest.raises(ValueError, match="per_class=20"):
        load(tiny, val_fraction=0.1, per_class=20)


def test_extracted_archive_is_used(tmp_path, monkeypatch):
    import tarfile

    skip_checksums(monkeypatch)
    src = write_tiny_cifar(tmp_path / "src")
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    assert len(load(root, val_fraction=0.1).train) == 900


def test_missing_files_offline_give_one_line(tmp_path, monkeypatch):
    def offline(self):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(CIFAR100, "download", offline)
    entry = DATASETS.get("cifar100")
    with pytest.raises(DataError) as err:
        entry.obj(seed=0, **entry.validate_params({"root": str(tmp_path / "none")}))
    msg = str(err.value)
    assert "\n" not in msg and "cifar-100-python/" in msg and str(tmp_path / "none") in msg
    assert "download failed" in msg
    with pytest.raises(DataError, match="download=false"):
        load(tmp_path / "none")
