"""Differentiable top-K sorters that only ever build the top-K rows of the relaxed permutation.

Every function returns ``P`` of shape ``[B, K, n]`` (or ``[B, c, n]`` for a custom
read-out): ``P[b, j, i]`` is the probability that class ``i`` lands on rank
``n-K+j`` of the *ascending* order, so ``j = K-1`` is the top-1 rank.  This is the
transpose of ``difftopk``'s ``P_topk[:, :, -K:]`` (``[B, n, K]``).
"""
from __future__ import annotations


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
    layers = [(a, b, torch.cat([dmin, dmax]), torch.cat([a, b])) for a, b, dmin, dmax in network.on(x.device)]
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
    for (a, _b, dst, src), alpha in zip(reversed(layers), reversed(alphas)):
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
