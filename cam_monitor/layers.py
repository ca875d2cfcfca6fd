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
from .layout import LayoutEvidence, fitting_readings, resolve_layout
from .methods import gradcam

LayerSpec = Union[str, nn.Module, None]
ReshapeSpec = Union[None, Sequence[int], Callable[[torch.Tensor], torch.Tensor]]

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


def _reading(t: torch.Tensor, image_size: Sequence[int], evidence: LayoutEvidence) -> str | None:
    """How a candidate output is a spatial grid of the image (``"nchw"``, ``"nhwc"`` or ``"tokens"``),
    or None when it is none: 4-D outputs whose layout the evidence settles to a grid that fits the
    image (an attention's (B, heads, N, d) fits neither reading), token outputs (B, N, C) whose N is
    a square (+ 1) and that no module or operation shows to be channels-first (B, C, L) (a 1-D pooling
    over tokens); a grid of one cell is none."""
    if t.dim() == 4:
        if not fitting_readings(t.shape, image_size):
            return None
        try:
            layout = resolve_layout(t.shape, image_size, "auto", "?", lambda: evidence.layout_of(t))
        except LayoutError:
            return None
        h, w = (t.shape[1], t.shape[2]) if layout == "nhwc" else (t.shape[2], t.shape[3])
        return layout if h * w > 1 else None
    if t.dim() == 3:
        try:
            _token_grid(t.shape[1], None, "?")
        except LayerNotSpatialError:
            return None
        return None if t.shape[2] < 2 or evidence.layout_of(t) == "nchw" else "tokens"
    return None


def _as_grid(t: torch.Tensor, reading: str) -> torch.Tensor:
    """``t`` (an output or its gradient) as (B, C, h, w), read as :func:`_reading` said."""
    if reading == "tokens":
        h, w = _token_grid(t.shape[1], None, "?")
        return t[:, t.shape[1] - h * w:, :].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
    return t.permute(0, 3, 1, 2) if reading == "nhwc" else t


def find_last_spatial_layer(model: nn.Module, probe: torch.Tensor,
                            output_transform: Callable[[object], torch.Tensor] | None = None) -> tuple[str, nn.Module]:
    """The last layer whose Grad-CAM explains the predicted class of ``probe``.

    Candidates are the modules with a spatial output: 4-D (channels first or last, as the evidence
    of :mod:`cam_monitor.layout` says) or a square token grid (ViTs). One forward and one backward on
    the first probe give the gradient at every candidate; the last candidate whose Grad-CAM map is
    not all zero wins. That skips the layers whose patch tokens reach the head only through a class
    token (a ViT's last block and final norm): for torchvision's ViT the pick is the last block's
    ``ln_1``, the attention's input.

    A model whose class scores have no gradient yet (torchvision zero-initialises ViT heads; an
    untrained head can be dead) cannot be judged by them: the pick is then made by structure, with
    a fixed direction in the head's input (the features the classifier reads) as the score, so it
    is the layer the first real gradient will reach. Only a pick settled by a non-zero map is
    cached (per model and input shape); otherwise the last candidate is returned and the next call
    looks again. Runs in the caller's train/eval state; touches no ``.grad`` (``autograd.grad`` only).
    """
    return pick_layer(model, probe, output_transform)[:2]


def pick_layer(model: nn.Module, probe: torch.Tensor, output_transform: Callable[[object], torch.Tensor] | None = None
               ) -> tuple[str, nn.Module, bool]:
    """:func:`find_last_spatial_layer` with a third value: whether a non-zero map settled the pick."""
    key = tuple(probe.shape[1:])
    cache = _auto_layer_cache.setdefault(model, {})
    if key in cache:
        name = cache[key]
        return name, model.get_submodule(name), True
    image_size = probe.shape[-2:]
    outputs: dict[str, torch.Tensor] = {}
    calls: list[tuple[torch.Tensor, object]] = []

    def make_hook(name: str) -> Callable:
        def hook(_m: nn.Module, inputs: tuple, out: object) -> None:
            if isinstance(out, torch.Tensor):
                calls.append((out, inputs[0] if inputs else None))
                if out.requires_grad and out.dim() in (3, 4):
                    outputs[name] = out
        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in model.named_modules() if name]
    evidence = LayoutEvidence()
    with torch.enable_grad():
        try:
            with evidence.recording(model):
                output = model(probe[:1].detach().clone().requires_grad_(True))
        finally:
            for h in handles:
                h.remove()
        readings = {n: r for n, out in outputs.items() if (r := _reading(out, image_size, evidence)) is not None}
        if not readings:
            raise LayerNotSpatialError(
                f"no submodule of {type(model).__name__} produced a spatial output (B, C, h, w), (B, h, w, C) or a "
                "square token grid (B, N, C); pass layer=<dotted name> (and reshape=(h, w) for token layers)")
        names = list(readings)
        picked = _last_explaining(names, readings, [outputs[n] for n in names], _scores(output, output_transform, calls))
    if picked is not None:
        cache[key] = picked
        return picked, model.get_submodule(picked), True
    return names[-1], model.get_submodule(names[-1]), False


def _scores(output: object, output_transform: Callable[[object], torch.Tensor] | None,
            calls: list[tuple[torch.Tensor, object]]) -> list[torch.Tensor]:
    """The scores a pick can be judged by, best first: the predicted class's logit, then (for a
    head with no gradient yet) a fixed direction in the input of the module that produced the
    logits. Empty when no ``output_transform`` gives (B, classes) logits with a graph."""
    try:
        logits = output_transform(output) if output_transform is not None else None
    except Exception:  # noqa: BLE001 - a wrong transform is reported by the CAM pass that follows
        logits = None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.requires_grad:
        return []
    scores = [logits[0, logits[0].argmax()]]
    head_input = next((inp for out, inp in calls if out is logits), None)  # hooks fire innermost first
    if isinstance(head_input, torch.Tensor) and head_input.requires_grad:
        features = head_input[0].flatten()
        signs = torch.randint(0, 2, features.shape, generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
        scores.append((features * signs.to(features.device, features.dtype)).sum())
    return scores


def _last_explaining(names: list[str], readings: dict[str, str], outputs: list[torch.Tensor],
                     scores: list[torch.Tensor]) -> str | None:
    """The last of ``names`` whose Grad-CAM map is not all zero, for the first of ``scores`` that
    gives any such map (None when none does)."""
    for score in scores:
        grads = torch.autograd.grad(score, outputs, allow_unused=True, retain_graph=True)
        for name, out, grad in reversed(list(zip(names, outputs, grads))):
            if grad is not None and bool(gradcam(_as_grid(out.detach(), readings[name]),
                                                 _as_grid(grad, readings[name])[:, None]).amax() > 0):
                return name
    return None


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
