"""Top-k metrics from the rank of the true label.

Tie rule (pessimistic): rank = #{j : s_j ≥ s_y}, i.e. 1 + the number of *other* classes
scoring at least as high as the true one. A constant output therefore ranks the true label
last, never first, so a collapsed model cannot look accurate.
"""
from __future__ import annotations

import numpy as np
import torch


def true_label_rank(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1-based rank of the true label for each row (pessimistic ties)."""
    true = scores.gather(1, labels.view(-1, 1))
    return (scores >= true).sum(1)


def topk_curve(ranks: np.ndarray, num_classes: int) -> np.ndarray:
    """accuracy[k-1] = fraction of samples with rank ≤ k, for k = 1..num_classes."""
    counts = np.bincount(ranks, minlength=num_classes + 1)[1:]
    return np.cumsum(counts) / max(1, len(ranks))


def k_for_accuracy(curve: np.ndarray, target: float = 0.99) -> int:
    """Smallest k whose top-k accuracy reaches `target` (num_classes if never)."""
    hits = np.nonzero(curve >= target - 1e-12)[0]
    return int(hits[0]) + 1 if len(hits) else len(curve)


def per_class_topk(ranks: np.ndarray, labels: np.ndarray, k: int, num_classes: int) -> float:
    """Macro (class-averaged) top-k accuracy over the classes present."""
    hit = np.bincount(labels, weights=(ranks <= k).astype(float), minlength=num_classes)
    seen = np.bincount(labels, minlength=num_classes)
    present = seen > 0
    return float((hit[present] / seen[present]).mean()) if present.any() else float("nan")


def summarize(ranks: np.ndarray, labels: np.ndarray, num_classes: int, ks: list[int]) -> dict:
    """Metrics of one split: top-k for every k in `ks`, k for 99 %, macro top-k, the full curve."""
    curve = topk_curve(ranks, num_classes)
    out: dict = {f"top{k}": float(curve[min(k, num_classes) - 1]) for k in ks}
    out["k99"] = k_for_accuracy(curve, 0.99)
    out.update({f"macro_top{k}": per_class_topk(ranks, labels, k, num_classes) for k in ks})
    out["curve"] = [round(float(a), 6) for a in curve]
    return out
