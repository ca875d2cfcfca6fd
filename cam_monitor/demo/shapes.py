"""Drawn Shapes: the zoo's second base task, procedurally drawn objects on varied backgrounds.

Ten classes of filled or hollow shapes (disc, ring, square, hollow square, diamond, triangle,
plus, cross, horizontal bar, vertical bar), each drawn at a random size, place and bright colour
over a dark background that varies from image to image (a random base colour, a gradient in a
random direction and smooth blotches), on a 64 x 64 RGB canvas. Objects may come within two
pixels of the border, so a test that treats the border as background is tested on objects that
reach it. Built in memory from a private generator (the global RNG is never touched), in well
under a second; no download.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

SIZE = 64
SHAPES = ("disc", "ring", "square", "hollow_square", "diamond", "triangle", "plus", "cross", "horizontal_bar",
          "vertical_bar")


def shape_mask(kind: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Where shape ``kind`` lies, given each pixel's offset from its centre in units of its radius."""
    u, v = torch.broadcast_tensors(u, v)
    r, box, diag = (u ** 2 + v ** 2).sqrt(), torch.maximum(u.abs(), v.abs()), u.abs() + v.abs()
    return [
        r <= 1.0,
        (r >= 0.55) & (r <= 1.0),
        box <= 0.8,
        (box >= 0.5) & (box <= 0.85),
        diag <= 1.0,
        (v <= 0.8) & (u.abs() <= (v + 0.9) * 0.55),
        ((u.abs() <= 0.25) & (v.abs() <= 0.95)) | ((v.abs() <= 0.25) & (u.abs() <= 0.95)),
        (((u - v).abs() <= 0.35) | ((u + v).abs() <= 0.35)) & (box <= 0.85),
        (u.abs() <= 1.0) & (v.abs() <= 0.3),
        (v.abs() <= 1.0) & (u.abs() <= 0.3),
    ][kind]


def backgrounds(n: int, gen: torch.Generator, size: int = SIZE) -> torch.Tensor:
    """(n, 3, size, size) dark, varied backgrounds in [0, 0.45]: a base colour, a linear gradient
    and blotches (upsampled 4 x 4 noise)."""
    base = 0.05 + 0.2 * torch.rand(n, 3, 1, 1, generator=gen)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    angle = 2 * torch.pi * torch.rand(n, 1, 1, 1, generator=gen)
    gradient = 0.08 * (torch.cos(angle) * xs + torch.sin(angle) * ys)
    blotches = F.interpolate(torch.rand(n, 3, 4, 4, generator=gen), size=(size, size), mode="bicubic",
                             align_corners=False)
    return (base + gradient + 0.12 * blotches).clamp(0, 0.45)


def draw_shapes(labels: torch.Tensor, gen: torch.Generator, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, size, size) images of shape ``labels[i]`` on a varied background, and their (N, size,
    size) object masks. Radius 10-16 px at 64 px (scaled with ``size``), centre anywhere that keeps
    the shape at least 2 px off the border, a bright random colour (every channel in [0.55, 1])."""
    n = len(labels)
    images = backgrounds(n, gen, size)
    scale = size / SIZE
    radius = scale * (10 + 6 * torch.rand(n, generator=gen))
    low, high = radius + 2 * scale, size - 1 - radius - 2 * scale
    cy = low + (high - low) * torch.rand(n, generator=gen)
    cx = low + (high - low) * torch.rand(n, generator=gen)
    colour = 0.55 + 0.45 * torch.rand(n, 3, generator=gen)
    grid = torch.arange(size, dtype=torch.float32)
    u = (grid[None, None, :] - cx[:, None, None]) / radius[:, None, None]
    v = (grid[None, :, None] - cy[:, None, None]) / radius[:, None, None]
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for kind in labels.unique().tolist():
        mine = labels == kind
        masks[mine] = shape_mask(kind, u[mine], v[mine])
    images = torch.where(masks[:, None], colour[:, :, None, None], images)
    return images, masks


@lru_cache(maxsize=1)
def shapes_dataset(n: int = 1800, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` Drawn Shapes, classes balanced and shuffled: images (n, 3, 64, 64), labels, object masks.
    Cached (every zoo task over the shapes shares one build); treat the tensors as read-only."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(SHAPES)
    labels = labels[torch.randperm(n, generator=gen)]
    images, masks = draw_shapes(labels, gen)
    return images, labels, masks
