"""Resolve the target layer of a model and turn its output into a (B, C, h, w) grid.

Why a module of its own: layer lookup (dotted names, typo suggestions, automatic choice) and
token-to-grid reshaping are the two places where user models differ most; the engine should
only ever see a module and a function that maps its output onto a spatial grid.
"""
from __future__ import annotations

import difflib
import math
import weakref
from typing import Callable, Sequence, Union

import torch
from torch import nn

from .errors import HookNotFiredError, LayerNotFoundError, LayerNotSpatialError, LayoutError
from .methods import gradcam

LayerSpec = Union[str, nn.Module, None]
ReshapeSpec = Union[None, Sequence[int], Callable[[torch.Tensor], torch.Tensor]]
#: How a 4-D layer output is laid out: channels first (B, C, h, w), channels last (B, h, w, C), or
#: "auto": told from the output's shape and the input image's size (see :func:`resolve_layout`).
LAYOUTS = ("auto", "nchw", "nhwc")

_COMPILED_PREFIX = "_orig_mod."
_auto_layer_cache: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """Return the eager module behind a ``torch.compile`` wrapper (or ``model`` itself).

    Compiled graphs do not run Python forward hooks placed after compilation, so the CAM pass
    always runs the original module; its parameters are the same objects, so maps are identical.
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def resolve_layer(model: nn.Module, layer: LayerSpec, probe: torch.Tensor | None = None,
                  output_transform: Callable[[object], torch.Tensor] | None = None) -> tuple[str, nn.Module]:
    """Find the target layer and return ``(dotted_name, module)``.

    ``layer`` may be a dotted name from ``model.named_modules()`` (a ``_orig_mod.`` prefix from
    ``torch.compile`` is accepted), a submodule, or ``None`` to pick the last layer whose output
    explains ``probe``'s predicted class (:func:`find_last_spatial_layer`; ``probe`` is needed).
    """
    if layer is None:
        if probe is None:
            raise ValueError("layer=None needs a probe batch to find the last spatial layer")
        return find_last_spatial_layer(model, probe, output_transform)
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise LayerNotFoundError(
            f"the module {type(layer).__name__} passed as layer is not a submodule of "
            f"{type(model).__name__}; pass one of model.named_modules() or its dotted name"
        )
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a dotted module name, an nn.Module or None, got {type(layer).__name__}")
    key = layer[len(_COMPILED_PREFIX):] if layer.startswith(_COMPILED_PREFIX) else layer
    if key:
        try:  # a walk down the dotted path, not over every module: this runs at every CAM pass
            return key, model.get_submodule(key)
        except AttributeError:
            pass
    named = dict(model.named_modules())
    close = difflib.get_close_matches(key, [n for n in named if n], n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(repr(c) for c in close)}?" if close else (
        " List the valid names with [n for n, _ in model.named_modules()].")
    raise LayerNotFoundError(f"model {type(model).__name__} has no layer named {layer!r}.{hint}")


def _grid_of(t: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor | None:
    """A candidate output as (B, C, h, w), or None when it is no spatial grid: 4-D outputs (either
    layout) with more than one cell, and token outputs (B, N, C) whose N is a square (+ 1)."""
    if t.dim() == 4:
        try:
            layout = resolve_layout(t.shape, image_size, "auto", "?")
        except LayoutError:
            layout = "nchw"
        grid = t.permute(0, 3, 1, 2) if layout == "nhwc" else t
        return grid if grid.shape[2] * grid.shape[3] > 1 else None
    if t.dim() == 3:
        try:
            h, w = _token_grid(t.shape[1], None, "?")
        except LayerNotSpatialError:
            return None
        return t[:, t.shape[1] - h * w:, :].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
    return None


def find_last_spatial_layer(model: nn.Module, probe: torch.Tensor,
                            output_transform: Callable[[object], torch.Tensor] | None = None) -> tuple[str, nn.Module]:
    """The last layer whose Grad-CAM explains the predicted class of ``probe``.

    Candidates are the modules with a spatial output: 4-D (channels first or last) or a square
    token grid (ViTs). One forward and one backward on the first probe give the gradient at every
    candidate; the last candidate whose Grad-CAM map is not all zero wins. That skips the layers
    whose patch tokens reach the head only through a class token (a ViT's last block and final
    norm): for torchvision's ViT the pick is the last block's ``ln_1``, the attention's input.
    When no map is non-zero (e.g. a zero-initialised head), or no ``output_transform`` gives the
    logits, the last candidate is returned. The
    pick is cached per model and input shape. Runs in the caller's train/eval state; touches no
    ``.grad`` (``autograd.grad`` only).
    """
    key = tuple(probe.shape[1:])
    cache = _auto_layer_cache.setdefault(model, {})
    if key in cache:
        name = cache[key]
        return name, dict(model.named_modules())[name]
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(_m: nn.Module, _i: tuple, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad and _grid_of(out, probe.shape[-2:]) is not None:
                outputs[name] = out
        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name)))
    with torch.enable_grad():
        try:
            output = model(probe[:1].detach().clone().requires_grad_(True))
        finally:
            for h in handles:
                h.remove()
        if not outputs:
            raise LayerNotSpatialError(
                f"no submodule of {type(model).__name__} produced a spatial output (B, C, h, w), (B, h, w, C) or a "
                "square token grid (B, N, C); pass layer=<dotted name> (and reshape=(h, w) for token layers)")
        names = list(outputs)
        picked = names[-1]
        try:
            logits = output_transform(output) if output_transform is not None else None
        except Exception:  # noqa: BLE001 - a wrong transform is reported by the CAM pass that follows
            logits = None
        if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.requires_grad:
            score = logits[0, logits[0].argmax()]
            grads = torch.autograd.grad(score, [outputs[n] for n in names], allow_unused=True)
            for name, grad in reversed(list(zip(names, grads))):
                if grad is not None and _gradcam_is_nonzero(outputs[name].detach(), grad, probe.shape[-2:]):
                    picked = name
                    break
    cache[key] = picked
    return picked, dict(model.named_modules())[picked]


def _gradcam_is_nonzero(act: torch.Tensor, grad: torch.Tensor, image_size: Sequence[int]) -> bool:
    return bool(gradcam(_grid_of(act, image_size), _grid_of(grad, image_size)[:, None]).amax() > 0)


def _strides(size: int, cells: int) -> tuple[float, float]:
    """The strides a layer could have to turn ``size`` pixels into ``cells`` cells (floor, ceil or
    padding rounding included)."""
    return size / (cells + 1), (size / (cells - 1) if cells > 1 else math.inf)


def _fits_image(h: int, w: int, image_size: Sequence[int]) -> bool:
    """Whether an (h, w) grid can come from the image by one stride in both directions."""
    (lo_h, hi_h), (lo_w, hi_w) = _strides(int(image_size[0]), h), _strides(int(image_size[1]), w)
    return h <= image_size[0] and w <= image_size[1] and max(lo_h, lo_w) <= min(hi_h, hi_w)


def _stride_mismatch(h: int, w: int, image_size: Sequence[int]) -> float:
    """|log(H / h) - log(W / w)|: 0 when the grid has the same stride in both directions."""
    return abs(math.log(int(image_size[0]) / h) - math.log(int(image_size[1]) / w))


def check_layout(layout: str) -> str:
    """``layout`` itself if it is one of :data:`LAYOUTS`, else a ``ValueError`` naming them."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def resolve_layout(shape: Sequence[int], image_size: Sequence[int], layout: str, layer_name: str) -> str:
    """``"nchw"`` or ``"nhwc"`` for a 4-D output ``shape`` of a layer fed ``image_size`` images.

    ``"auto"`` reads the shape both ways and keeps the reading whose grid fits the image with one
    stride in both directions (Swin's ``features`` (B, 7, 7, 768) at 224 px is channels-last;
    ResNet's (B, 512, 7, 7) channels-first). When both fit, the reading whose two strides agree
    more closely wins; when they agree equally well (say C = h = w) or neither fits, it refuses
    and names the fix.
    """
    if check_layout(layout) != "auto":
        return layout
    _, d1, d2, d3 = (int(v) for v in shape)
    readings = {"nchw": (d2, d3), "nhwc": (d1, d2)}
    fits = {k: _stride_mismatch(*hw, image_size) for k, hw in readings.items() if _fits_image(*hw, image_size)}
    if len(fits) == 1:
        return next(iter(fits))
    if len(fits) == 2 and abs(fits["nchw"] - fits["nhwc"]) > 0.05:
        return min(fits, key=fits.get)
    why = "both" if fits else "neither"
    raise LayoutError(
        f"layer {layer_name!r} outputs {tuple(shape)} for {tuple(image_size)} images: {why} of the channels-first "
        f"(B, C, h, w) and channels-last (B, h, w, C) readings fit the image equally; pass layout='nchw' or "
        "layout='nhwc'")


def to_grid(t: torch.Tensor, reshape: ReshapeSpec, layer_name: str, layout: str = "nchw") -> torch.Tensor:
    """Map a layer output (or its gradient) to a (B, C, h, w) grid.

    4-D tensors pass through, channels-last ones (``layout="nhwc"``) permuted to channels-first. Token tensors (B, N, C) are reshaped: ``reshape=(h, w)`` drops the
    ``N - h*w`` leading (class/register) tokens; ``None`` infers a square grid from N or N - 1; a
    callable receives the raw tensor and must return (B, C, h, w).
    """
    if callable(reshape):
        grid = reshape(t)
        if not isinstance(grid, torch.Tensor) or grid.dim() != 4:
            raise LayerNotSpatialError(f"reshape callable for layer {layer_name!r} must return a (B, C, h, w) tensor")
        return grid
    if t.dim() == 4:
        if layout == "nhwc":
            t = t.permute(0, 3, 1, 2)
        if t.shape[2] * t.shape[3] <= 1:
            raise LayerNotSpatialError(
                f"layer {layer_name!r} outputs {tuple(t.shape)}: a 1x1 grid has no spatial extent; "
                "choose an earlier layer (e.g. the last convolutional block before pooling)"
            )
        return t
    if t.dim() == 3:
        n_tokens = t.shape[1]
        h, w = _token_grid(n_tokens, reshape, layer_name)
        spatial = t[:, n_tokens - h * w:, :]
        return spatial.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
    raise LayerNotSpatialError(
        f"layer {layer_name!r} outputs a {t.dim()}-D tensor {tuple(t.shape)}; a CAM needs (B, C, h, w) "
        "or tokens (B, N, C): choose a convolutional or transformer-block layer"
    )


def _token_grid(n_tokens: int, reshape: ReshapeSpec, layer_name: str) -> tuple[int, int]:
    """Return the (h, w) token grid for ``n_tokens`` tokens, explicit or inferred."""
    if reshape is not None:
        h, w = (int(v) for v in reshape)  # type: ignore[union-attr]
        if h * w > n_tokens or h * w <= 1:
            raise LayerNotSpatialError(
                f"reshape=({h}, {w}) does not fit the {n_tokens} tokens of layer {layer_name!r}")
        return h, w
    for prefix in (0, 1):
        side = math.isqrt(n_tokens - prefix)
        if side > 1 and side * side == n_tokens - prefix:
            return side, side
    raise LayerNotSpatialError(
        f"layer {layer_name!r} outputs {n_tokens} tokens, which is not a square grid (with or without "
        "one class token); pass reshape=(h, w) or a callable returning (B, C, h, w)"
    )


def hook_not_fired(model: nn.Module, layer_name: str) -> HookNotFiredError:
    """Build the error for a target layer the forward pass never called."""
    return HookNotFiredError(
        f"layer {layer_name!r} was not called during {type(model).__name__}.forward, so no activation was "
        "captured. Choose a layer on the path from input to logits; for a torch.compile'd model pass the "
        "module itself or model._orig_mod"
    )
