"""Differentiable top-k cross-entropy of Petersen et al. (ICML 2022): sorters, networks, loss.

Importing registers the ``difftopk`` loss.  (The reference PyPI package is the
top-level ``difftopk``; this is ``losses.difftopk``.)
"""
from losses.difftopk.loss import DiffTopKLoss  # noqa: F401

__all__ = ["DiffTopKLoss"]
