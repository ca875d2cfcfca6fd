"""CAM weighting rules: pure functions of activations and gradients.

All rules take activations ``A`` of shape (B, C, h, w) and gradients of the target scores with
respect to them ``G`` of shape (B, K, C, h, w) (K targets per image), both float32, and return
ReLU'd, un-normalised maps of shape (B, K, h, w). Because they only read ``A`` and ``G``, every
method comes out of the same single forward/backward pass.
"""
from __future__ import annotations

from typing import Callable

import torch

MethodFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _weighted_sum(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_c w[b, k, c] * A[b, c]) for channel weights (B, K, C)."""
    return torch.einsum("bkc,bchw->bkhw", weights, acts).clamp_min_(0)


def gradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., ICCV 2017): weights are the spatial mean of dY/dA."""
    return _weighted_sum(grads.mean(dim=(3, 4)), acts)


def gradcam_plus_plus(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al., WACV 2018), eq. 19 closed form (exponential score).

    alpha_ij = g^2 / (2 g^2 + (sum_ab A_ab) g^3), set to 0 where the denominator is 0 (which
    covers g = 0); weights = sum_ij alpha_ij ReLU(g_ij). No epsilon is added: with the tiny
    gradients of an untrained network an epsilon would dominate the denominator.
    """
    g2 = grads * grads
    denom = 2.0 * g2 + acts.sum(dim=(2, 3))[:, None, :, None, None] * g2 * grads
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    weights = (alpha * grads.clamp_min(0)).sum(dim=(3, 4))
    return _weighted_sum(weights, acts)


#: Added to each channel's activation sum in XGrad-CAM, as pytorch-grad-cam does (torchcam: 1e-8).
XGRADCAM_EPS = 1e-7


def xgradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al., BMVC 2020): weights = sum_ij(g A) / (sum_ij A + 1e-7).

    The paper assumes non-negative activations; after Hardswish, GELU or before a final norm the
    per-channel sum can cancel to about 0 and an exact division would let one channel's weight
    explode. The epsilon is pytorch-grad-cam's, so the maps are the same as that peer's; a
    denominator of exactly 0 gives weight 0.
    """
    num = torch.einsum("bkchw,bchw->bkc", grads, acts)
    den = acts.sum(dim=(2, 3))[:, None, :] + XGRADCAM_EPS
    weights = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(num))
    return _weighted_sum(weights, acts)


def hirescam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """HiResCAM (Draelos & Carin, 2020): ReLU(sum_c g_c * A_c), element-wise, no averaging."""
    return torch.einsum("bkchw,bchw->bkhw", grads, acts).clamp_min_(0)


def layercam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al., TIP 2021): ReLU(sum_c ReLU(g_c) * A_c)."""
    return torch.einsum("bkchw,bchw->bkhw", grads.clamp_min(0), acts).clamp_min_(0)


METHODS: dict[str, MethodFn] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_plus_plus,
    "xgradcam": xgradcam,
    "hirescam": hirescam,
    "layercam": layercam,
}


def check_methods(method: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a method name or tuple of names and return them as a tuple."""
    names = (method,) if isinstance(method, str) else tuple(method)
    if not names:
        raise ValueError(f"method must name at least one of {sorted(METHODS)}")
    for name in names:
        if name not in METHODS:
            raise ValueError(f"unknown CAM method {name!r}; choose from {sorted(METHODS)}")
    return names
