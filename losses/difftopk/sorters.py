"""Differentiable top-K sorters that only ever build the top-K rows of the relaxed permutation.

Every function returns ``P`` of shape ``[B, K, n]`` (or ``[B, c, n]`` for a custom
read-out): ``P[b, j, i]`` is the probability that class ``i`` lands on rank
``n-K+j`` of the *ascending* order, so ``j = K-1`` is the top-1 rank.  This is the
transpose of ``difftopk``'s ``P_topk[:, :, -K:]`` (``[B, n, K]``).
"""
from __future__ import annotations

import math

import torch

from losses.difftopk.networks import TorchNetwork
from losses.difftopk.relaxations import swap_probability

SORTERS = ("neuralsort", "softsort", "sinkhorn", "odd_even", "bitonic", "splitter_selection")


def topk_readout(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One-hot read-out rows ``[1, K, n]`` selecting the output wires n-K..n-1."""
    init = torch.zeros(1, k, n, dtype=dtype, device=device)
    init[0, torch.arange(k, device=device), torch.arange(n - k, n, device=device)] = 1
    return init


def network_topk(
    x: torch.Tensor,
    network: TorchNetwork,
    readout: torch.Tensor,
    steepness: float,
    distribution: str,
    art_lambda: float,
) -> torch.Tensor:
    """Relaxed sorting/selection network, propagating only ``c`` read-out rows.

    x: ``[B, n]`` values.  readout: ``[1 or B, c, n]`` rows over the *output* wires
    (e.g. :func:`topk_readout` for the top-K rows of P, or one weight row).
    Returns ``readout @ P`` with ``P[b, wire_out, class_in]``: ``[B, c, n]``.
    Cost O(layers * n * c): each layer is a gather of the comparator pairs, a soft
    swap, and an ``index_copy`` back (out of place, autograd-friendly).
    """
    layers = network.on(x.device)
    alphas = []
    for a, b, dst, _src in layers:
        xa = x.index_select(1, a)
        xb = x.index_select(1, b)
        alpha = swap_probability(xb - xa, distribution, steepness, art_lambda)
        beta = 1 - alpha
        mn = alpha * xa + beta * xb
        mx = beta * xa + alpha * xb
        x = x.index_copy(1, dst, torch.cat([mn, mx], 1))
        alphas.append(alpha)
    B = x.shape[0]
    X = readout.to(x.dtype).expand(B, -1, -1)
    for (a, b, dst, src), alpha in zip(reversed(layers), reversed(alphas)):
        L = a.shape[0]
        g = X.index_select(2, dst)
        x_min, x_max = g[..., :L], g[..., L:]
        al = alpha.unsqueeze(1)
        be = 1 - al
        new = torch.cat([al * x_min + be * x_max, be * x_min + al * x_max], 2)
        X = X.index_copy(2, src, new)
    return X


def _abs_row_sums(s: torch.Tensor) -> torch.Tensor:
    """A_j = sum_l |s_j - s_l|; dense for small n, O(n log n) via sorting for large n."""
    n = s.shape[-1]
    if n <= 256:
        return (s.unsqueeze(-1) - s.unsqueeze(-2)).abs().sum(-1)
    v, idx = s.sort(-1)
    cs = v.cumsum(-1)
    t = torch.arange(n, device=s.device, dtype=s.dtype)
    left = t * v - (cs - v)
    right = (cs[..., -1:] - cs) - (n - 1 - t) * v
    return torch.empty_like(s).scatter(-1, idx, left + right)


def neuralsort_topk(s: torch.Tensor, k: int, inverse_temperature: float) -> torch.Tensor:
    """NeuralSort (Grover et al. 2019), top-K rows only, matching difftopk.NeuralSort.

    Row for ascending rank i (1-based, i = n-K+1..n): softmax_j(((2i-n-1) s_j - A_j) / tau).
    """
    n = s.shape[-1]
    tau = 1 / inverse_temperature
    A = _abs_row_sums(s)  # [B, n]
    i = torch.arange(n - k + 1, n + 1, device=s.device, dtype=s.dtype)
    coef = -(n + 1 - 2 * i)  # reference: (-s) * (n + 1 - 2 i)
    logits = (s.unsqueeze(1) * coef.view(1, -1, 1) - A.unsqueeze(1)) / tau
    return logits.softmax(-1)


def softsort_topk(s: torch.Tensor, k: int, inverse_temperature: float) -> torch.Tensor:
    """SoftSort (Prillo & Eisenschlos 2020), top-K rows: softmax_j(-|v_r - s_j| / tau)."""
    tau = 1 / inverse_temperature
    v = s.topk(k, dim=-1, sorted=True).values.flip(-1)  # ascending top-K values
    return ((s.unsqueeze(1) - v.unsqueeze(-1)).abs().neg() / tau).softmax(-1)


def sinkhorn_topk(
    s: torch.Tensor,
    k: int,
    inverse_temperature: float,
    iterations: int = 50,
    tolerance: float = 1e-4,
) -> torch.Tensor:
    """Sinkhorn sort (Cuturi, Teboul & Vert 2019), top-K rows, log-domain.

    Construction: the scores are standardised per row and squashed,
    ``z = (n-1) * sigmoid((s - mean) / std)`` in (0, n-1).  Source measure:
    the n classes with mass 1/n each.  Target measure: the K top rank anchors
    ``n-K, ..., n-1`` with mass 1/n each plus one "rest" anchor at
    ``(n-K-1)/2`` (barycentre of the ranks 0..n-K-1) carrying mass (n-K)/n
    (no rest anchor when K >= n-1: a full sort onto anchors 0..n-1).  Cost is
    squared distance, epsilon = 1/inverse_temperature.  Since the cost is
    convex in 1-D, the unregularised plan is the monotone (sorting) plan, so as
    epsilon -> 0 the top-K rows converge to the hard top-K permutation rows.
    P = n * plan: rows (classes, summed over all anchors) and top-K columns sum
    to 1 up to ``tolerance`` (checked on the class marginal after each sweep,
    every 5 sweeps; the anchor marginal is exact after the last half-step).
    Sweeps start with epsilon-scaling (eps = cost range, divided by 4 per sweep)
    and count towards ``iterations``.
    """
    B, n = s.shape
    eps = 1 / inverse_temperature
    dt, dev = s.dtype, s.device
    mean = s.mean(-1, keepdim=True)
    std = s.std(-1, keepdim=True) if n > 1 else torch.ones_like(mean)
    z = (n - 1) * torch.sigmoid((s - mean) / (std + 1e-8))
    if k >= n - 1:
        y = torch.arange(n, device=dev, dtype=dt)
        log_b = torch.full((n,), -math.log(n), device=dev, dtype=dt)
        first = n - k
    else:
        y = torch.cat([torch.tensor([(n - k - 1) / 2], device=dev, dtype=dt),
                       torch.arange(n - k, n, device=dev, dtype=dt)])
        log_b = torch.cat([torch.tensor([math.log((n - k) / n)], device=dev, dtype=dt),
                           torch.full((k,), -math.log(n), device=dev, dtype=dt)])
        first = 1
    C = (z.unsqueeze(-1) - y.view(1, 1, -1)).pow(2)  # [B, n, r]
    log_a = -math.log(n)
    f = torch.zeros(B, n, device=dev, dtype=dt)
    g = torch.zeros(B, y.shape[0], device=dev, dtype=dt)
    # epsilon-scaling: start at the cost range and halve towards eps (warm-started potentials),
    # then plain sweeps at eps until the class marginal is within tolerance.
    eps0 = max(float((n - 1) ** 2), eps)
    schedule = []
    while eps0 > eps and len(schedule) < iterations - 1:
        schedule.append(eps0)
        eps0 /= 4
    schedule += [eps] * max(1, iterations - len(schedule))
    for it, e in enumerate(schedule):
        f = e * log_a - e * torch.logsumexp((g.unsqueeze(1) - C) / e, dim=2)
        g = e * log_b - e * torch.logsumexp((f.unsqueeze(2) - C) / e, dim=1)
        if e == eps and tolerance > 0 and (it + 1) % 5 == 0:
            with torch.no_grad():
                rows = torch.exp((f.unsqueeze(2) + g.unsqueeze(1) - C) / eps).sum(-1) * n
                if float((rows - 1).abs().max()) < tolerance:
                    break
    P = torch.exp((f.unsqueeze(2) + g.unsqueeze(1) - C) / eps) * n  # [B, n, r]
    return P[..., first:].transpose(1, 2)


def network_label_mass(
    x: torch.Tensor,
    labels: torch.Tensor,
    network: TorchNetwork,
    weights: torch.Tensor,
    steepness: float,
    distribution: str,
    art_lambda: float,
) -> torch.Tensor:
    """``sum_j weights[j] * P[b, n-K+j, labels[b]]`` in a single forward sweep, ``[B]``.

    Row ``y`` of ``P^T w`` equals pushing the one-hot label distribution forward through
    the same soft swaps as the values (the layer matrices act identically on the
    value vector and on the label's wire distribution), so values and label mass are
    carried together as a ``[B, 2, n]`` tensor: O(layers * n), no second pass.
    """
    B, n = x.shape
    q = torch.zeros_like(x).scatter(1, labels.unsqueeze(1), 1.0)
    z = torch.stack([x, q], 1)
    for a, _b, dst, src in network.on(x.device):
        L = a.shape[0]
        g = z.index_select(2, src)
        za, zb = g[..., :L], g[..., L:]
        alpha = swap_probability(zb[:, 0] - za[:, 0], distribution, steepness, art_lambda).unsqueeze(1)
        beta = 1 - alpha  # explicit convex weights: keeps tiny label masses relatively exact
        mn = alpha * za + beta * zb
        mx = beta * za + alpha * zb
        z = z.index_copy(2, dst, torch.cat([mn, mx], 2))
    return z[:, 1, n - weights.shape[0]:] @ weights
