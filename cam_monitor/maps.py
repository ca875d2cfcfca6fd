"""Small shape utilities shared by metrics and rendering: upsampling and display scaling.

Raw maps stay raw for metrics; :func:`minmax` exists only for display. Upsampling is bilinear
with ``align_corners=False``, as pytorch-grad-cam and torchcam do, so overlays line up with theirs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (..., h, w) maps to (..., H, W) bilinearly; a no-op when already that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps.float()
    lead = maps.shape[:-2]
    flat = maps.float().reshape(-1, 1, *maps.shape[-2:])
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, H, W) or (H, W) masks to ``size`` with nearest (masks stay binary); a no-op at that size."""
    size = (int(size[0]), int(size[1]))
    if tuple(masks.shape[-2:]) == size:
        return masks.bool()
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    return F.interpolate(flat, size=size, mode="nearest").reshape(*lead, *size).bool()


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Scale each (h, w) map to [0, 1] for display; constant maps become all zeros."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(maps))
