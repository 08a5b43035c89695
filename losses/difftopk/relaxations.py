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


def swap_probability_and_slope(v: torch.Tensor, distribution: str, steepness: float,
                               art_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, dα/dv) without autograd, for hand-written backward passes (the same α as `swap_probability`)."""
    if distribution == "logistic_phi":  # u = β v w, w = (|v|+ε)^-λ; du/dv = β w (1 − λ|v|/(|v|+ε))
        base = v.abs().add_(_ART_EPS)
        w = base.pow(-art_lambda)
        alpha = torch.sigmoid(v * steepness * w)
        slope = alpha * (1 - alpha)
        slope.mul_(w).mul_(1 - art_lambda * (1 - _ART_EPS / base)).mul_(steepness)
        return alpha, slope
    alpha = swap_probability(v, distribution, steepness, art_lambda)
    x = v * steepness
    if distribution == "logistic":
        slope = steepness * alpha * (1 - alpha)
    elif distribution == "gaussian":
        slope = steepness * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    elif distribution == "reciprocal":
        slope = steepness / (2 + x.abs()).pow(2)
    elif distribution == "cauchy":
        slope = steepness / (math.pi * (1 + x * x))
    elif distribution == "optimal":
        outer = x.abs().clamp(min=0.25)
        slope = steepness * torch.where(x.abs() > 0.25, 1 / (16 * outer * outer), torch.ones_like(x))
    else:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    return alpha, slope
