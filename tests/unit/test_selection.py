"""Model selection on a hand-made history: best_val reads validation only, last reads the last epoch."""
from __future__ import annotations

from types import SimpleNamespace

from harness.leaderboard import columns
from harness.train import History, Trainer

# val top1 peaks at epoch 1, val top5 at epoch 2, val k99 is lowest at epoch 0; test numbers are
# chosen so that any other choice of epoch gives a different answer.
VAL = [{"top1": 0.50, "top5": 0.70, "k99": 3}, {"top1": 0.60, "top5": 0.75, "k99": 5},
       {"top1": 0.55, "top5": 0.90, "k99": 4}, {"top1": 0.40, "top5": 0.80, "k99": 6}]
TEST = [{"top1": 0.11, "top5": 0.21, "k99": 31}, {"top1": 0.12, "top5": 0.22, "k99": 32},
        {"top1": 0.13, "top5": 0.23, "k99": 33}, {"top1": 0.99, "top5": 0.99, "k99": 1}]


def _trainer(primary: str = "top1") -> Trainer:
    trainer = Trainer.__new__(Trainer)
    trainer.spec = SimpleNamespace(eval={"k": [1, 5], "primary": primary, "select": "best_val"})
    trainer.history = History(
        epochs=[{"epoch": i, "val": v, "test": t} for i, (v, t) in enumerate(zip(VAL, TEST))],
        curves=[{"val": [0.1 * i], "test": [0.2 * i]} for i in range(4)],
    )
    return trainer


def test_best_val_picks_each_metric_at_its_best_validation_epoch():
    m = _trainer()._selected_metrics()
    assert m["best_val_epoch"] == {"top1": 1, "top5": 2, "k99": 0}
    assert m["test"]["best_val"] == {"top1": 0.12, "top5": 0.23, "k99": 31}
    assert m["val"]["best"] == {"top1": 0.60, "top5": 0.90, "k99": 3}


def test_last_is_the_last_epoch_even_when_it_is_best_on_test():
    m = _trainer()._selected_metrics()
    assert m["test"]["last"] == TEST[-1] and m["last_epoch"] == 3
    assert m["curve_test_last"] == [0.2 * 3]


def test_curve_follows_the_primary_metric():
    assert _trainer("top1")._selected_metrics()["curve_test_best_val"] == [0.2 * 1]
    assert _trainer("top5")._selected_metrics()["curve_test_best_val"] == [0.2 * 2]


def test_leaderboard_reads_the_selection_the_suite_asks_for():
    for select in ("best_val", "last"):
        cols = columns({"k": [1, 5], "select": select})
        assert cols[0].path == ("metrics", "test", select, "top1")
