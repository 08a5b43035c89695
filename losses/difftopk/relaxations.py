"""Sigmoid relaxations of a conditional swap (Petersen et al. 2021, 2022).

``swap_probability(v, ...)`` with ``v = b - a`` is α = F(β·v), the weight with which the soft
minimum takes ``a`` (α → 1 when b ≫ a, α = 1/2 when a = b); β is the steepness (inverse
temperature) and F a CDF:

* logistic:      F(x) = 1 / (1 + e^{−x})
* logistic_phi:  logistic with the ART scaling x = β·v / |v|^λ ("activation replacement trick")
* gaussian:      F = Φ, the standard normal CDF
* reciprocal:    F(x) = (x / (2 + |x|) + 1) / 2
* cauchy:        F(x) = arctan(x)/π + 1/2
* optimal:       F(x) = x + 1/2 on |x| ≤ 1/4, 1 − 1/(16x) above, 1/(16|x|) below — the
                 monotonic, error-bounded sigmoid of Petersen et al. 2022.
"""
from __future__ import annotations

import math

import torch

DISTRIBUTIONS = ("cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal")
_ART_EPS = 1e-10  # keeps |v|^-λ finite at v = 0


def optimal_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """The piecewise 'optimal' sigmoid; the unused branches see |x| ≥ 1/4, so no division by 0."""
    outer = x.abs().clamp(min=0.25)
    return torch.where(x > 0.25, 1 - 1 / (16 * outer), torch.where(x < -0.25, 1 / (16 * outer), x + 0.5))


def swap_probability(v: torch.Tensor, distribution: str, steepness: float, art_lambda: float) -> torch.Tensor:
    """α = F(steepness · v) for the chosen distribution (v = b − a)."""
    x = v * steepness
    if distribution == "logistic":
        return torch.sigmoid(x)
    if distribution == "logistic_phi":
        return torch.sigmoid(x / (v.abs() + _ART_EPS).pow(art_lambda))
    if distribution == "gaussian":  # Φ(v/σ) with σ = 1/steepness, written as the reference does
        return 0.5 + 0.5 * torch.erf(v / (1 / steepness) / math.sqrt(2))
    if distribution == "reciprocal":
        return 0.5 + 0.5 * x / (2 + x.abs())
    if distribution == "cauchy":
        return torch.atan(x) / math.pi + 0.5
    if distribution == "optimal":
        return optimal_sigmoid(x)
    raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
