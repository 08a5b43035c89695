"""Seeded, batched augmentation of rendered glyphs (torch, CPU): affine jitter, blur, pixel noise.

Input: clean coverage images [G, 2S, 2S] (uint8, rendered at twice the target size). Each sample
gets a random affine map (rotation ±8°·a, scale ×exp(±0.08·a), shear ±0.12·a, shift ±5 %·a of the
side; bilinear, zero fill) at 2S, is averaged down to S, blurred by a Gaussian with σ ~ U(0, 0.8·a)
pixels and gets N(0, (0.05·a)²) noise, with a the strength; then it is clipped and rounded back to
uint8. Strength 0 gives the clean image n times. Every random number comes from `generator`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK = 4096
ROTATION_DEG, LOG_SCALE, SHEAR, SHIFT, BLUR_SIGMA, NOISE = 8.0, 0.08, 0.12, 0.1, 0.8, 0.05


def downsample(hi: torch.Tensor) -> torch.Tensor:
    """[N, 2S, 2S] float in [0, 1] -> [N, S, S] by 2×2 averaging."""
    return F.avg_pool2d(hi.unsqueeze(1), 2).squeeze(1)


def _affine(n: int, a: float, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, 5, generator=g, dtype=torch.float64) * 2 - 1
    angle, scale = u[:, 0] * math.radians(ROTATION_DEG) * a, torch.exp(u[:, 1] * LOG_SCALE * a)
    shear, shift = u[:, 2] * SHEAR * a, u[:, 3:5] * SHIFT * a
    cos, sin = torch.cos(angle), torch.sin(angle)
    # inverse map (output -> input coordinates) of rotation · shear · scale, as affine_grid expects
    m = torch.stack([torch.stack([cos, -sin + cos * shear], 1), torch.stack([sin, cos + sin * shear], 1)], 1)
    m = m / scale.view(n, 1, 1)
    return torch.cat([m, shift.unsqueeze(2)], 2).float()


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (radius 2) of [N, S, S] with per-image σ [N]."""
    n = x.shape[0]
    taps = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-taps.view(1, 5) ** 2 / (2 * sigma.clamp_min(1e-3).view(n, 1) ** 2))
    k = k / k.sum(1, keepdim=True)
    y = F.conv2d(F.pad(x.unsqueeze(0), (2, 2, 0, 0), mode="replicate"), k.view(n, 1, 1, 5), groups=n)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), k.view(n, 1, 5, 1), groups=n)
    return y.squeeze(0)


def augment_glyphs(hi: torch.Tensor, n: int, strength: float, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples [G·n, S, S] uint8, glyph-major; clean [G, S, S] uint8) from clean renderings [G, 2S, 2S]."""
    src = hi.float() / 255.0
    clean = downsample(src)
    to_u8 = lambda t: (t.clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731
    if strength == 0:
        return to_u8(clean).repeat_interleave(n, 0), to_u8(clean)
    index = torch.arange(len(src)).repeat_interleave(n)
    out = []
    for start in range(0, len(index), CHUNK):
        idx = index[start : start + CHUNK]
        m = len(idx)
        theta = _affine(m, strength, generator)
        grid = F.affine_grid(theta, [m, 1, *src.shape[1:]], align_corners=False)
        x = F.grid_sample(src[idx].unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = downsample(x.squeeze(1))
        x = _blur(x, torch.rand(m, generator=generator) * BLUR_SIGMA * strength)
        x = x + torch.randn(x.shape, generator=generator) * NOISE * strength
        out.append(to_u8(x))
    return torch.cat(out), to_u8(clean)
