"""long_tail on the features dataset: the exponential profile on train only; an emptied class is one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.errors import DataError
from harness.registry import DATASETS


def features_file(tmp_path, per_class: int = 40, classes: int = 5):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(classes), per_class)
    path = tmp_path / "f.npz"
    np.savez(path, train_features=rng.normal(size=(len(y), 3)).astype(np.float32), train_labels=y,
             val_features=rng.normal(size=(len(y), 3)).astype(np.float32), val_labels=y,
             test_features=rng.normal(size=(len(y), 3)).astype(np.float32), test_labels=y)
    return path


def test_features_long_tail_cuts_train_only(tmp_path):
    entry = DATASETS.get("features")
    p = entry.validate_params({"path": str(features_file(tmp_path)), "long_tail": 8.0})
    data = entry.obj(seed=0, **p)
    counts = torch.bincount(data.train.y, minlength=5).tolist()
    assert counts == [int(40 * 8 ** (-c / 4)) for c in range(5)] == [40, 23, 14, 8, 5]
    assert np.asarray(data.train.x[np.arange(len(data.train))]).shape == (sum(counts), 3)
    assert len(data.val) == len(data.test) == 200  # untouched
    assert data.train_class_counts() == counts
    with pytest.raises(DataError, match="classes empty"):
        entry.obj(seed=0, **{**p, "long_tail": 100.0})
    # the default keeps the run id of records written before the parameter existed
    assert "long_tail" not in entry.identity_params({**p, "long_tail": 1.0})
