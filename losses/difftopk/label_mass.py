"""The label's top-K mass through a relaxed sorting network, with a hand-written backward.

For the loss only ``m_b = Σ_j w_j P[b, n−K+j, y_b]`` is needed. Column y of P is what the network
does to the one-hot vector e_y (every layer acts on the label's wire distribution exactly as on the
values), so the values x and the label mass q travel through the layers together: O(layers·n) per
sample, no [n, n] (or [K, n]) matrix at all.

Layout: wire-major ``z`` of shape [n, 2, B] (values x and label mass q), so a layer's gathers and
writes move whole rows (contiguous memory). Per comparator (wires a, b; minimum to d_min, maximum to
d_max): ``α = F(x_b − x_a)``, ``min = α·z_a + (1−α)·z_b = z_b + α·(z_a − z_b)``, ``max = z_a − α·(z_a − z_b)``
for both x and q.

Backward (a reverse sweep over the saved α, F'(v) and z_a − z_b of every layer), with G the gradient
w.r.t. the layer's outputs: ``g_a = α·G_min + (1−α)·G_max``, ``g_b = (1−α)·G_min + α·G_max``, and
through α: ``g_α = (z_a − z_b)·(G_min − G_max)`` summed over x and q, ``g_v = g_α·F'(v)``,
``g_{x_b} += g_v``, ``g_{x_a} −= g_v``. Autograd would keep ~15 tensors per layer and gather along
the slow axis; this keeps 3 and runs several times faster on CPU.

On the CPU (float32/float64 scores) the same passes run compiled, one call each way
(``losses.difftopk.network_kernels``); this torch path serves CUDA and other devices.
"""
from __future__ import annotations

import torch

from losses.difftopk.networks import TorchNetwork
from losses.difftopk.relaxations import swap_probability_and_slope


class _NetworkLabelMass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, labels, network: TorchNetwork, weights, steepness: float, distribution: str,
                art_lambda: float):  # type: ignore[override]
        batch, n = x.shape
        z = torch.zeros(n, 2, batch, dtype=x.dtype, device=x.device)  # [wire, (value, label mass), sample]
        z[:, 0] = x.t()
        z[labels, 1, torch.arange(batch, device=x.device)] = 1
        layers = network.on(x.device)
        saved = []
        for a, b, dmin, dmax in layers:
            za, zb = z.index_select(0, a), z.index_select(0, b)
            diff = za - zb  # [L, 2, B]; v = x_b − x_a = −diff[:, 0]
            alpha, slope = swap_probability_and_slope(diff[:, 0].neg(), distribution, steepness, art_lambda)
            shift = alpha.unsqueeze(1) * diff
            z.index_copy_(0, dmin, zb.add_(shift))  # α·z_a + (1−α)·z_b
            z.index_copy_(0, dmax, za.sub_(shift))  # (1−α)·z_a + α·z_b
            saved.append((alpha, slope, diff))
        k = weights.shape[0]
        ctx.layers, ctx.saved, ctx.shape = layers, saved, (batch, n, k)
        ctx.save_for_backward(weights)
        return weights @ z[n - k:, 1]

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (weights,) = ctx.saved_tensors
        batch, n, k = ctx.shape
        g = torch.zeros(n, 2, batch, dtype=grad_out.dtype, device=grad_out.device)
        g[n - k:, 1] = weights[:, None] * grad_out[None, :]
        for (a, b, dmin, dmax), (alpha, slope, diff) in zip(reversed(ctx.layers), reversed(ctx.saved)):
            g_min, g_max = g.index_select(0, dmin), g.index_select(0, dmax)
            g_diff = g_min - g_max
            g_v = (diff * g_diff).sum(1).mul_(slope)  # g_α·F'(v), g_α = (z_a − z_b)·(G_min − G_max)
            shift = alpha.unsqueeze(1) * g_diff
            g_a, g_b = g_max.add_(shift), g_min.sub_(shift)  # α·G_min + (1−α)·G_max and its mirror
            g_a[:, 0] -= g_v
            g_b[:, 0] += g_v
            g.index_copy_(0, a, g_a)
            g.index_copy_(0, b, g_b)
        return g[:, 0].t(), None, None, None, None, None, None


def torch_label_mass(x: torch.Tensor, labels: torch.Tensor, network: TorchNetwork, weights: torch.Tensor,
                     steepness: float, distribution: str, art_lambda: float) -> torch.Tensor:
    """The torch path of `network_label_mass` (any device)."""
    return _NetworkLabelMass.apply(x, labels, network, weights.to(x.dtype), steepness, distribution, art_lambda)


def compiled_label_mass(x: torch.Tensor, labels: torch.Tensor, network: TorchNetwork, weights: torch.Tensor,
                        steepness: float, distribution: str, art_lambda: float) -> torch.Tensor:
    """The compiled path of `network_label_mass` (CPU tensors; float32 is computed in float64)."""
    from losses.difftopk.network_kernels import CompiledLabelMass

    comparators = network.flat(weights.shape[0])
    return CompiledLabelMass.apply(x, labels, comparators, weights, steepness, distribution, art_lambda)


def network_label_mass(x: torch.Tensor, labels: torch.Tensor, network: TorchNetwork, weights: torch.Tensor,
                       steepness: float, distribution: str, art_lambda: float) -> torch.Tensor:
    """``Σ_j weights[j]·P[b, n−K+j, labels[b]]`` for every sample, ``[B]`` (differentiable in x)."""
    compiled = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and len(network) > 0
    path = compiled_label_mass if compiled else torch_label_mass
    return path(x, labels, network, weights, steepness, distribution, art_lambda)
