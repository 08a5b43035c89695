"""Noised (stochastically smoothed) top-k calibrated hinge of Garcin et al. (2022), pytopk's law, own sampler.

C. Garcin, M. Servajean, A. Joly, J. Salmon. "Stochastic smoothing of the top-K calibrated hinge
loss for deep imbalanced classification", ICML 2022. With Z ~ N(0, I) (n_sample draws per
sample) the (k+1)-th largest score is smoothed as φ(s) = E_Z[(s + εZ)_[k+1]] (Monte-Carlo mean;
its gradient is the mean one-hot indicator of the (k+1)-th noised entry), and

* balanced:   ℓ = (1 + φ(s) − s_y)_+                      (as pytopk.BalNoisedTopK),
* imbalanced: ℓ = scale·(m_y + φ(s) − s_y)_+              (as pytopk.ImbalNoisedTopK),

with per-class margins m_c ∝ n_c^{−1/4} rescaled so that the largest is max_m (LDAM-style);
n_c are the class counts (uniform when not given, i.e. m_c = max_m). The package's own default
scale=50 assumes normalised features and weights; here scale defaults to 1.

Implementation: the reference package `pytopk` draws all B·n·n_sample normals and takes a k-th value
(~60× `F.cross_entropy` at n = 1000 on a CPU). On the CPU this module samples the same law with
`losses.noised_sampler` (numba), which draws only the normals that can reach the top k+1 and is exact
in distribution (its docstring gives the argument); other devices (CUDA) use the dense computation,
which is pytopk's own (same `torch.randn` layout, so the same sample under the same seed). Both feed
an autograd Function whose backward is a scatter of the draw counts (and −1 at the label) into one
[B, n] gradient, as pytopk's. On the CPU the whole forward (the draws and the hinge) and the backward are
one compiled call each (`_NoisedHingeCPU`), seeded by one in-place draw from torch's generator: in a
training step of a ~1 ms loss every extra torch op on a cold cache costs tens of microseconds.
The loss value and gradient therefore match pytopk in distribution
(tested against it: tests/unit/test_noised.py), not draw for draw on the CPU. The loss draws fresh
noise at every call from torch's generator (seed torch for reproducibility).
"""
from __future__ import annotations

import importlib.util
import logging
import threading
from typing import Any

import numpy as np
import torch
from torch import nn

from harness.registry import Log, Param, ReferenceImpl, register_loss
from losses.common import check_k, working_precision

log = logging.getLogger(__name__)


def pytopk_reference(loss: Any, num_classes: int, options: dict[str, Any]) -> list[ReferenceImpl]:
    """bench-loss row for the `pytopk` package itself (the same loss, drawing every normal)."""
    missing = None if importlib.util.find_spec("pytopk") is not None else "pytopk is not installed"

    def build(device: torch.device) -> Any:
        import pytopk

        if loss.imbalanced:
            counts = loss.class_counts if loss.class_counts is not None else [1] * num_classes
            return pytopk.ImbalNoisedTopK(k=loss.k, epsilon=loss.epsilon, max_m=loss.max_m, cls_num_list=counts,
                                          scale=loss.scale, n_sample=loss.n_sample).to(device)
        return pytopk.BalNoisedTopK(k=loss.k, epsilon=loss.epsilon, n_sample=loss.n_sample)

    return [ReferenceImpl("ref:pytopk", build, missing)]


@register_loss(
    "noised_topk",
    family="noised",
    paper="Garcin, Servajean, Joly, Salmon. Stochastic smoothing of the top-K calibrated hinge "
    "loss for deep imbalanced classification. ICML 2022",
    version=1,  # the law is version 1's; since the faster sampler a seed gives other draws (see README)
    contract={"gradcheck": False},  # Monte-Carlo smoothing: its gradient is tested in tests/unit/test_noised.py
    reference=pytopk_reference,
    params={
        "k": Param(int, 5, ge=1, doc="k of top-k (k < num_classes)"),
        "epsilon": Param(float, 1.0, gt=0.0, doc="noise scale ε of the smoothed top-k",
                         search=Log(1e-2, 10.0)),
        "n_sample": Param(int, 5, ge=1, doc="Gaussian draws per sample and evaluation"),
        "imbalanced": Param(bool, False, doc="use the class-dependent margins (ImbalNoisedTopK)"),
        "max_m": Param(float, 0.2, gt=0.0, doc="'imbalanced': largest class margin",
                       search=Log(0.05, 1.0, when={"imbalanced": True})),
        "scale": Param(float, 1.0, gt=0.0, doc="'imbalanced': scale of the hinge",
                       search=Log(0.1, 10.0, when={"imbalanced": True})),
        "class_counts": Param(
            (list, tuple), None, optional=True, doc="'imbalanced': training examples per class"
        ),
    },
)
class NoisedTopK(nn.Module):
    """Garcin et al. noised top-k hinge (1 + E[(s+εZ)_[k+1]] − s_y)_+ (or its imbalanced form)."""

    def __init__(
        self,
        num_classes: int,
        k: int = 5,
        epsilon: float = 1.0,
        n_sample: int = 5,
        imbalanced: bool = False,
        max_m: float = 0.2,
        scale: float = 1.0,
        class_counts: list[int] | tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        check_k(k, num_classes)
        if not epsilon > 0:
            raise ValueError(f"epsilon={epsilon} must be > 0")
        if n_sample < 1:
            raise ValueError(f"n_sample={n_sample} must be >= 1")
        if class_counts is not None:
            if len(class_counts) != num_classes or any(c <= 0 for c in class_counts):
                raise ValueError(f"class_counts must hold {num_classes} positive counts")
        self.num_classes, self.k, self.imbalanced = num_classes, k, imbalanced
        self.epsilon, self.n_sample = float(epsilon), int(n_sample)
        self.scale = float(scale) if imbalanced else 1.0
        self.max_m, self.class_counts = float(max_m), (list(class_counts) if class_counts is not None else None)
        self.dense: bool | None = None  # None: lazy sampler on the CPU, dense elsewhere (see noised_kth)
        from losses.noised_sampler import warm_up

        warm_up()  # load (or compile) the CPU kernels now, not inside the first training step
        if imbalanced:  # pytopk's margins, float32 as there
            counts = np.asarray(list(class_counts) if class_counts is not None else [1] * num_classes, float)
            m_list = 1.0 / np.power(counts, 0.25)
            m_list = (m_list * (max_m / np.max(m_list))).astype(np.float32)
            self.register_buffer("m_list", torch.from_numpy(m_list), persistent=False)
            self._cpu_margins = m_list.astype(np.float64)  # per class (exact: float32 values)
        else:
            self.m_list = None
            self._cpu_margins = np.ones(1)

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s = working_precision(scores)
        if s.device.type == "cpu" and not self.dense:  # the lazy sampler and the hinge in one compiled call
            return _NoisedHingeCPU.apply(s, labels, self._cpu_margins, self.scale, self.k + 1, self.epsilon,
                                         self.n_sample, draw_seed())
        margin = 1.0 if self.m_list is None else self.m_list.to(s.device)[labels].to(s.dtype)
        return _NoisedHinge.apply(s, labels, margin, self.scale, self.k + 1, self.epsilon, self.n_sample,
                                  self.dense)


_SEED = threading.local()  # per thread, the int64 scalar that draw_seed draws into


def draw_seed() -> int:
    """A 63-bit seed for the CPU sampler from torch's generator, so that torch.manual_seed makes the loss
    reproducible; drawn in place into a kept scalar (one op, not a new tensor per call)."""
    buf = getattr(_SEED, "buf", None)
    if buf is None:
        buf = _SEED.buf = torch.empty((), dtype=torch.int64)
    return int(buf.random_())


def noised_kth(s: torch.Tensor, k1: int, epsilon: float, n_sample: int,
               dense: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Values [B, n_sample] (float64) and positions [B, n_sample] of the k1-th largest of s + εZ per draw.

    dense=None: the lazy exact sampler on the CPU, the dense pytopk computation elsewhere; True/False force."""
    s = s.detach()
    if dense is None:
        dense = s.device.type != "cpu"
    if dense:  # pytopk's computation: Z [B, n, n_sample], k-th value over the classes
        z = torch.randn(s.shape[0], s.shape[1], n_sample, device=s.device)
        neg, pos = torch.kthvalue(-(s.unsqueeze(-1) + epsilon * z), k1, dim=1)
        return (-neg).double(), pos
    from losses.noised_sampler import sample_kth

    vals, pos = sample_kth(np.ascontiguousarray(s.numpy()), k1, epsilon, n_sample, draw_seed())
    return torch.from_numpy(vals), torch.from_numpy(pos)


class _NoisedHingeCPU(torch.autograd.Function):
    """The noised hinge on the CPU: forward and backward are one compiled call each (losses.noised_sampler)."""

    @staticmethod
    def forward(ctx, s, labels, margins, scale, k1, epsilon, n_sample, seed):  # type: ignore[no-untyped-def, override]
        from losses import noised_sampler

        s_np, labels_np = np.ascontiguousarray(s.detach().numpy()), labels.numpy()
        value, pos, active = noised_sampler.hinge_loss(s_np, labels_np, margins, scale, k1, epsilon, n_sample, seed)
        ctx.arrays, ctx.scale = (s_np, pos, labels_np, active), scale  # s_np: only the gradient's shape and dtype
        return torch.from_numpy(value.reshape(()))

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def, override]
        from losses import noised_sampler

        s_np, pos, labels_np, active = ctx.arrays
        grad = noised_sampler.hinge_grad(s_np, pos, labels_np, active, float(grad_out) * ctx.scale / len(s_np))
        return torch.from_numpy(grad), None, None, None, None, None, None, None


class _NoisedHinge(torch.autograd.Function):
    """mean_b relu(scale·(margin_b + φ_b(s) − s_{b,y_b})) with φ_b the Monte-Carlo smoothed (k+1)-th largest."""

    @staticmethod
    def forward(ctx, s, labels, margin, scale, k1, epsilon, n_sample, dense):  # type: ignore[no-untyped-def, override]
        vals, pos = noised_kth(s, k1, epsilon, n_sample, dense)
        ctx.scale, ctx.shape = scale, s.shape
        phi = vals.to(s.device).mean(dim=1).to(s.dtype)
        s_y = s.detach().gather(1, labels[:, None]).squeeze(1)
        z = scale * (margin + phi - s_y)
        ctx.save_for_backward(pos.to(s.device), labels, z > 0)
        return torch.relu(z).mean()

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[no-untyped-def, override]
        pos, labels, active = ctx.saved_tensors
        b, _ = ctx.shape
        w = (grad_out * ctx.scale / b) * active.to(grad_out.dtype)
        grad = torch.zeros(ctx.shape, dtype=grad_out.dtype, device=grad_out.device)
        grad.scatter_add_(1, pos, (w / pos.shape[1])[:, None].expand(-1, pos.shape[1]).contiguous())
        grad.scatter_add_(1, labels[:, None], -w[:, None])
        return grad, None, None, None, None, None, None, None
