"""The dataset's true class counts reach a loss that takes `class_counts` (Garcin et al.'s imbalanced loss)."""
from __future__ import annotations

import torch

from harness.store import RunStore
from harness.suite import load_suite
from harness.train import Trainer, run_one

SUITE = """
suite: lt
seeds: [0]
dataset: {name: synthetic, params: {classes: 6, superclasses: 2, modes: 1, dim: 4, train_size: 600,
                                     val_size: 60, test_size: 120, long_tail: 10}}
model: {name: mlp, params: {hidden: 8}}
train: {epochs: 1, batch_size: 64}
eval: {k: [1, 2]}
losses: [{name: noised_topk, params: {k: 2, imbalanced: true}}]
"""


def test_trainer_passes_the_long_tail_counts_to_the_imbalanced_noised_loss(write_suite, tmp_path):
    (spec,) = load_suite(write_suite(SUITE)).runs
    assert spec.loss.params["class_counts"] is None  # the user left it unset
    trainer = Trainer(spec, torch.device("cpu"), None, deadline=float("inf"))
    counts = torch.bincount(trainer.data.train.y, minlength=6)
    assert counts.tolist() == [100, 63, 39, 25, 15, 10] == trainer.data.class_counts  # ⌊100·10^(−c/5)⌋
    # LDAM margins m_c ∝ n_c^(−1/4), the largest (the tail's) equal to max_m = 0.2
    margins = counts.double() ** -0.25
    expected = margins * (0.2 / margins.max())
    torch.testing.assert_close(trainer.loss_fn.m_list.double().cpu(), expected,
                               rtol=1e-5, atol=1e-6)
    record = run_one(spec, RunStore(tmp_path / "results", "lt"), device="cpu")
    assert record["status"] == "done", record.get("error")
    assert "macro_top1" in record["metrics"]["test"]["last"]
