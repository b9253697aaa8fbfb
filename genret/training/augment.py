"""Image augmentation on pixel tensors, seeded by step so that a resumed run draws the same (no torchvision)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rotate(pixels: torch.Tensor, degrees: float, seed: int, step: int) -> torch.Tensor:
    """``pixels`` (n, c, h, w), each image rotated about its centre by its own angle drawn uniformly in ±``degrees``
    (seeded by ``seed`` and ``step``: a resumed run draws the same), edge pixels replicated into the corners."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return rotate_by(pixels, (torch.rand(len(pixels), generator=generator) * 2 - 1) * math.radians(degrees))


def rotate_by(pixels: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """``pixels`` (n, c, h, w) rotated about their centres by ``angle`` (n,) radians, edge pixels replicated."""
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(len(pixels))
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(pixels.dtype), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)
