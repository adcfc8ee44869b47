"""Synthetic test videos whose motion is known exactly."""
import math

import torch


def texture(x: torch.Tensor, y: torch.Tensor, seed: int = 0, waves: int = 24) -> torch.Tensor:
    """A smooth random texture defined everywhere in the plane (a sum of plane waves of random direction,
    frequency 0.02-0.22 cycles/px and phase), so a moved copy is rendered exactly, with no interpolation.
    Returns (1, 3, H, W) in [-1, 1] (three tints of the same pattern)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(waves, 3, generator=g, dtype=torch.float64)
    freq, angle, phase = 0.02 + 0.2 * p[:, 0], 2 * math.pi * p[:, 1], 2 * math.pi * p[:, 2]
    t = sum(torch.cos(2 * math.pi * f * (x * torch.cos(a) + y * torch.sin(a)) + ph)
            for f, a, ph in zip(freq, angle, phase)) / math.sqrt(2 * waves)
    return torch.stack([t, 0.8 * t, 0.6 * t]).clamp(-1, 1)[None]


def grid(size: int):
    return torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")


def moving_texture(frames: int = 8, size: int = 64, step=(1.0, 0.5), seed: int = 0) -> torch.Tensor:
    """A textured clip panning by `step` (dx, dy) pixels per frame: (F, 3, size, size) float32 in [-1, 1]."""
    ys, xs = grid(size)
    return torch.cat([texture(xs - k * step[0], ys - k * step[1], seed) for k in range(frames)]).float()
