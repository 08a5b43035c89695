"""Checks and conventions shared by the loss families."""
from __future__ import annotations

import torch


def check_k(k: int, num_classes: int) -> None:
    """One-line ValueError unless 1 ≤ k < num_classes (and num_classes ≥ 2)."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be >= 2")
    if k < 1 or k >= num_classes:
        raise ValueError(f"k={k} must satisfy 1 <= k < num_classes={num_classes}")


def check_p_k(p_k: list | tuple) -> list[float]:
    """P_K as floats; one-line ValueError unless it is a non-empty, non-negative distribution (sum 1)."""
    p_k = [float(p) for p in p_k]
    if not p_k:
        raise ValueError("p_k must be a non-empty list")
    if any(p < 0 for p in p_k):
        raise ValueError(f"p_k must be non-negative, got {p_k}")
    if not 0.9999 < sum(p_k) < 1.0001:
        raise ValueError(f"p_k must sum to 1, got {p_k} (sum {sum(p_k)})")
    return p_k


def working_precision(scores: torch.Tensor) -> torch.Tensor:
    """Scores in the precision a loss computes in: float64 stays, everything else becomes float32
    (bf16/fp16 logits from autocast get float32 loss math)."""
    return scores if scores.dtype == torch.float64 else scores.float()
