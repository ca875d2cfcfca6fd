"""The CAM engine: one forward and one backward through the layers after the target layer.

How it stays cheap and side-effect free:
- the forward runs under ``no_grad`` up to the target layer; a forward hook makes the layer's
  output a fresh leaf, hands the model a copy and switches grad mode on, so autograd records only
  the tail of the network (target layer -> logits);
- gradients come from ``torch.autograd.grad`` w.r.t. that leaf, never ``.backward()``, so no
  parameter ``.grad`` is touched; K targets per image share the one recorded graph, in batched
  (vmapped) backwards sized so their memory stays near that of the K gradients (:class:`TailMemory`);
- no host-device synchronisation inside the pass (targets are checked on the CPU, or read once
  after the backward is queued; flags stay device tensors);
- the pass runs in eval mode inside ``inference_mode(False)``; every submodule's own ``training``
  flag, the global RNG state and the global grad mode are restored afterwards, also on error.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from torch import nn

from .errors import InputError, LayerNotSpatialError, OutputError, TargetError
from .layers import LayerSpec, ReshapeSpec, hook_not_fired, pick_layer, resolve_layer, to_grid, unwrap_compiled
from .layout import check_layout, probe_layout, resolve_layout
from .methods import METHODS, check_methods

TargetSpec = Union[None, int, Sequence[int], torch.Tensor]
OutputTransform = Callable[[Any], torch.Tensor]


@dataclass
class CAMResult:
    """Everything one CAM pass produced.

    ``maps[method]`` is (B, K, h, w) float32, ReLU'd and not normalised; ``logits`` (B, classes)
    float32 and ``targets`` (B, K) long are detached; ``squeeze_targets`` records whether the
    caller asked for one target per image (so :func:`compute_cams` drops the K axis);
    ``layer_calls`` is how often the layer ran in the forward (the maps are of its last call);
    ``layout`` how a 4-D output was read (``"nchw"`` or ``"nhwc"``); ``zero_gradient`` whether the
    target scores' gradient on the layer's grid (class tokens excluded) was zero for every image,
    which makes every map zero (a 0-dim bool tensor on the pass's device, so the pass itself never
    waits for the device: ``bool()`` reads it when asked); ``layer_settled`` False when ``layer=None``
    found no layer whose map is non-zero yet, so the layer is a provisional last candidate.
    """

    maps: dict[str, torch.Tensor]
    logits: torch.Tensor
    targets: torch.Tensor
    layer_name: str
    squeeze_targets: bool
    layer_calls: int = 1
    layout: str = "nchw"
    zero_gradient: bool | torch.Tensor = False
    layer_settled: bool = True

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the maps: the target layer's spatial resolution."""
        first = next(iter(self.maps.values()))
        return int(first.shape[-2]), int(first.shape[-1])

    @property
    def scores(self) -> torch.Tensor:
        """(B, K) logits of the target classes."""
        return self.logits.gather(1, self.targets)


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the body in eval mode, then give every submodule exactly its ``training`` flag back and
    restore the RNG. A model already in eval mode (as Lightning leaves it during validation) is not
    switched at all: ``model.eval()`` walks every module through Python, about 0.5 ms a call on ResNet-50."""
    flags = [(m, m.training) for m in model.modules()]
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            if any(flag for _, flag in flags):
                model.eval()
            yield
    finally:
        for module, flag in flags:
            if module.training != flag:
                module.training = flag


def default_output_transform(output: Any) -> torch.Tensor:
    """Pick the logits from a model output: a tensor, ``output["logits"]``, ``output.logits`` or
    ``output[0]`` of a tuple or list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise OutputError(
        f"cannot find logits in a model output of type {type(output).__name__}; "
        "pass output_transform=lambda out: <the (B, num_classes) logits>"
    )


def check_images(images: torch.Tensor, what: str = "images") -> None:
    """Raise :class:`InputError` unless ``images`` is a floating (B, C, H, W) tensor with B > 0."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        hint = " (add a batch axis with images.unsqueeze(0))" if images.dim() == 3 else ""
        raise InputError(f"{what} must be 4-D (B, C, H, W), got shape {tuple(images.shape)}{hint}")
    if images.shape[0] == 0:
        raise InputError(f"{what} is an empty batch (B = 0): give at least one image")
    if not images.is_floating_point():
        raise InputError(f"{what} must be a floating tensor (normalised as the model expects), got {images.dtype}")


def resolve_targets(targets: TargetSpec, logits: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """Return ``(targets (B, K) long on the logits' device, squeeze, pending)`` checked against the
    logits' batch and classes, without a host-device synchronisation.

    Targets given on the CPU (a list, an int, the monitor's labels) are range-checked there, then
    moved without blocking. Targets already on another device cannot be read without stalling its
    queue: out-of-range entries are clamped so the backward can be queued, and ``pending`` is a
    device flag for :func:`raise_if_out_of_range` to read once the work is queued.
    """
    batch, num_classes = logits.shape
    if targets is None:
        return logits.argmax(dim=1, keepdim=True), True, None
    if isinstance(targets, int):
        t = torch.full((batch,), targets, dtype=torch.long)
    else:
        t = torch.as_tensor(targets)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TargetError(f"targets must hold integer class indices, got dtype {t.dtype}")
    if t.dim() not in (1, 2) or t.shape[0] != batch:
        raise TargetError(
            f"targets must have shape ({batch},) or ({batch}, K) to match the {batch} images, got {tuple(t.shape)}")
    pending = None
    if t.device.type == "cpu":
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise _out_of_range(t, num_classes)
    else:
        pending = ((t < 0) | (t >= num_classes)).any()
        t = t.clamp(0, num_classes - 1)
    squeeze = t.dim() == 1
    t = (t.unsqueeze(1) if squeeze else t).long().to(logits.device, non_blocking=True)
    return t, squeeze, pending


def _out_of_range(targets: torch.Tensor, num_classes: int) -> TargetError:
    bad = targets[(targets < 0) | (targets >= num_classes)].unique().tolist()
    return TargetError(f"target classes {bad} are out of range for a model with {num_classes} classes "
                       f"(0..{num_classes - 1})")


def raise_if_out_of_range(pending: torch.Tensor | None, targets: TargetSpec, num_classes: int) -> None:
    """The one host read of a device target check, after the pass's work is queued."""
    if pending is not None and bool(pending):
        raise _out_of_range(torch.as_tensor(targets).cpu(), num_classes)


def _capture_hook(store: dict[str, Any], layer_name: str) -> Callable:
    """Forward hook: keep the layer's output as a leaf and record autograd from here on.

    A module that runs several times in one forward (a shared block) keeps its last call's
    output, as captum does; ``store["calls"]`` counts the calls so callers can say so. The model
    goes on with a copy of the leaf, so in-place ops after the layer cannot reach it; the leaf itself
    is a copy only when the output shares memory with the layer's input (an in-place or view
    module), which the model may still change.
    """
    def hook(_module: nn.Module, _inputs: tuple, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise LayerNotSpatialError(
                f"layer {layer_name!r} returns a {type(output).__name__}, not a tensor; target a submodule "
                "that returns the feature tensor")
        aliased = any(isinstance(i, torch.Tensor) and _same_storage(i, output) for i in _inputs)
        leaf = (output.detach().clone() if aliased else output.detach()).requires_grad_(True)
        store["act"] = leaf
        store["calls"] = store.get("calls", 0) + 1
        torch.set_grad_enabled(True)
        return leaf.clone()
    return hook


_structural_layouts: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def structural_layout(model: nn.Module, layer_name: str, images: torch.Tensor) -> str | None:
    """What produced ``layer_name``'s output says of its layout (:func:`cam_monitor.layout.probe_layout`),
    asked only for a shape that does not settle it (C = h = w): one recorded forward of one image,
    cached per model, layer and input shape, since it depends on the structure alone."""
    cache = _structural_layouts.setdefault(model, {})
    key = (layer_name, tuple(images.shape[1:]))
    if key not in cache:
        cache[key] = probe_layout(model, model.get_submodule(layer_name), images)
    return cache[key]


def _storage_ptr(t: torch.Tensor) -> int | None:
    """Address of ``t``'s memory, or None where it has none to read (a sharded FSDP parameter
    between forwards, a DTensor)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory (True when that cannot be read: then copy)."""
    pa, pb = _storage_ptr(a), _storage_ptr(b)
    return pa is None or pb is None or (a.device == b.device and pa == pb)


class TailMemory:
    """Bytes of the activations autograd saves for the tail's backward (parameters and buffers
    excluded, each storage counted once), collected by :func:`torch.autograd.graph.saved_tensors_hooks`
    while the forward runs. A backward batched over c targets needs about c times this in transient
    memory."""

    def __init__(self, model: nn.Module) -> None:
        self.nbytes = 0
        self._seen = {_storage_ptr(t) for t in itertools.chain(model.parameters(), model.buffers())}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = _storage_ptr(t)
        if ptr is None or ptr not in self._seen:
            self._seen.add(ptr)
            self.nbytes += t.untyped_storage().nbytes() if ptr is not None else t.numel() * t.element_size()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def hooks(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _several_targets(targets: TargetSpec) -> bool:
    """Whether ``targets`` asks for more than one class per image: only then is the tail's memory
    counted (one target is one plain backward). Unreadable targets say no here and get their
    error from :func:`resolve_targets`."""
    if targets is None or isinstance(targets, int):
        return False
    try:
        shape = targets.shape if hasattr(targets, "shape") else torch.as_tensor(targets).shape
    except (TypeError, ValueError, RuntimeError):
        return False
    return len(shape) == 2 and shape[1] > 1


def targets_per_backward(k: int, act_bytes: int, tail_bytes: int) -> int:
    """How many of ``k`` targets one batched backward takes: as many as keep its transient memory
    (about ``tail_bytes`` per target) within twice the ``k`` gradients it returns. A CNN's tail after
    its last block (pooling, a linear head) saves about one activation and takes all ``k`` at once;
    a transformer block's saves tens of them (attention, MLP) and takes them one at a time, so K
    targets cost K backwards of the tail instead of K times its memory."""
    if tail_bytes <= 0:
        return k
    return max(1, min(k, (2 * k * act_bytes) // tail_bytes))


def _target_gradients(logits: torch.Tensor, act: torch.Tensor, targets: torch.Tensor, sign: float,
                      chunk: int) -> torch.Tensor:
    """d(logit[b, targets[b, k]])/d(act) for every k, as (B, K, *act.shape[1:]); ``chunk`` targets a
    backward (a batched one when more than one)."""
    k = targets.shape[1]
    onehot = torch.zeros((k, *logits.shape), dtype=logits.dtype, device=logits.device)
    onehot.scatter_(2, targets.t().unsqueeze(2), sign)
    if k == 1:
        (grad,) = torch.autograd.grad(logits, act, grad_outputs=onehot[0])
        return grad.unsqueeze(1)
    if chunk >= k:
        return _batched_grad(logits, act, onehot).transpose(0, 1)
    out = torch.empty((k, *act.shape), dtype=act.dtype, device=act.device)
    for start in range(0, k, chunk):
        part = onehot[start:start + chunk]
        last = start + chunk >= k
        out[start:start + chunk] = _batched_grad(logits, act, part) if len(part) > 1 else torch.autograd.grad(
            logits, act, grad_outputs=part[0], retain_graph=not last)[0]
    return out.transpose(0, 1)


def _batched_grad(logits: torch.Tensor, act: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """One backward vmapped over the first axis of ``onehot`` (the graph is kept: for later chunks,
    and for the fallback should the vmapped backward fail)."""
    try:
        return torch.autograd.grad(logits, act, grad_outputs=onehot, is_grads_batched=True, retain_graph=True)[0]
    except RuntimeError:
        # Some ops have no batching rule for their backward; fall back to one backward per target.
        return torch.stack([torch.autograd.grad(logits, act, grad_outputs=o, retain_graph=True)[0] for o in onehot])


def cam_pass(
    model: nn.Module,
    images: torch.Tensor,
    layer: LayerSpec = None,
    targets: TargetSpec = None,
    method: str | Sequence[str] = "gradcam",
    *,
    output_transform: OutputTransform | None = None,
    reshape: ReshapeSpec = None,
    counterfactual: bool = False,
    layout: str = "auto",
) -> CAMResult:
    """Run one CAM pass and return maps, logits and targets (see :func:`compute_cams`)."""
    check_images(images)
    methods = check_methods(method)
    check_layout(layout)
    transform = output_transform or default_output_transform
    inner = unwrap_compiled(model)
    with preserved_model_state(inner, images.device), torch.inference_mode(False), torch.no_grad():
        x = images.clone()
        name, module, settled = (pick_layer(inner, x, transform) if layer is None
                                 else (*resolve_layer(inner, layer, x, transform), True))
        store: dict[str, Any] = {}
        handle = module.register_forward_hook(_capture_hook(store, name))
        tail = TailMemory(inner) if _several_targets(targets) else None
        try:
            with tail.hooks() if tail is not None else contextlib.nullcontext():
                output = inner(x)
        finally:
            handle.remove()
        if "act" not in store:
            raise hook_not_fired(model, name)
        logits = transform(output)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise InputError(f"the model's logits must be (B, num_classes), got {shape}; pass output_transform=")
        if not logits.requires_grad:
            raise LayerNotSpatialError(f"the logits do not depend on layer {name!r} (is its output detached?)")
        tgt, squeeze, pending = resolve_targets(targets, logits.detach())
        act_bytes = store["act"].numel() * store["act"].element_size()
        grads = _target_gradients(logits, store["act"], tgt, -1.0 if counterfactual else 1.0,
                                  targets_per_backward(tgt.shape[1], act_bytes, tail.nbytes if tail else 0))
        raise_if_out_of_range(pending, targets, logits.shape[1])
        torch.set_grad_enabled(False)
        raw = store["act"].detach()
        layout = (resolve_layout(raw.shape, images.shape[-2:], layout, name, lambda: structural_layout(inner, name, x))
                  if raw.dim() == 4 and not callable(reshape) else "nchw")
        act = to_grid(raw, reshape, name, layout).float()
        b, k = grads.shape[:2]
        grads_grid = to_grid(grads.reshape(b * k, *grads.shape[2:]), reshape, name, layout).float()
        grads_grid = grads_grid.reshape(b, k, *grads_grid.shape[1:])
        with torch.autocast(device_type=act.device.type, enabled=False):
            maps = {m: METHODS[m](act, grads_grid) for m in methods}
        return CAMResult(maps=maps, logits=logits.detach().float(), targets=tgt, layer_name=name, squeeze_targets=squeeze,
                         layer_calls=store["calls"], layout=layout, zero_gradient=grads_grid.eq(0).all(),
                         layer_settled=settled)


def compute_cams(
    model: nn.Module,
    images: torch.Tensor,
    layer: LayerSpec = None,
    targets: TargetSpec = None,
    method: str | Sequence[str] = "gradcam",
    *,
    output_transform: OutputTransform | None = None,
    reshape: ReshapeSpec = None,
    counterfactual: bool = False,
    layout: str = "auto",
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Class activation maps of ``model`` for ``images`` at ``layer``.

    Args:
        model: any ``nn.Module`` returning logits (or see ``output_transform``); a
            ``torch.compile`` wrapper is unwrapped to its eager module for the pass.
        images: (B, C, H, W) floating tensor, preprocessed as the model expects.
        layer: dotted name from ``model.named_modules()``, a submodule, or ``None`` for the last
            layer with a spatial 4-D output.
        targets: ``None`` = predicted class; an int, (B,) or (B, K) class indices. K targets are
            computed from the one forward with a batched backward.
        method: one of ``gradcam``, ``gradcam++``, ``xgradcam``, ``hirescam``, ``layercam``, or a
            tuple of them (a dict ``{method: maps}`` is returned, all from the same pass).
        output_transform: picks the (B, classes) pre-softmax logits from the model's output.
        reshape: for token layers (B, N, C): ``(h, w)``, a callable, or None to infer a square grid.
        counterfactual: use negated gradients (regions that argue against the class).
        layout: of a 4-D layer output: ``"nchw"``, ``"nhwc"`` (channels-last, e.g. Swin's stages)
            or ``"auto"`` (told from the output's shape and the image size; ambiguous shapes raise
            :class:`LayoutError` naming this argument).

    Returns:
        float32 maps at the layer's resolution, ReLU'd, not normalised: (B, h, w) for one target
        per image, (B, K, h, w) for (B, K) targets; a dict of those for a tuple of methods.
    """
    result = cam_pass(model, images, layer, targets, method, output_transform=output_transform,
                      reshape=reshape, counterfactual=counterfactual, layout=layout)
    maps = {m: (v[:, 0] if result.squeeze_targets else v) for m, v in result.maps.items()}
    return maps[method] if isinstance(method, str) else maps


def class_scores(model: nn.Module, images: torch.Tensor, output_transform: OutputTransform | None = None) -> torch.Tensor:
    """(B, K) float32 class scores (logits) of ``images``: one inference forward, same state
    guarantees as :func:`cam_pass`."""
    check_images(images)
    inner = unwrap_compiled(model)
    with preserved_model_state(inner, images.device), torch.no_grad():
        return (output_transform or default_output_transform)(inner(images)).float()


def predict_classes(model: nn.Module, images: torch.Tensor, output_transform: OutputTransform | None = None) -> torch.Tensor:
    """(B,) predicted classes of ``images`` (:func:`class_scores`' largest)."""
    return class_scores(model, images, output_transform).argmax(dim=1)


def masked_scores(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    *,
    output_transform: OutputTransform | None = None,
    logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities on the images and on ``images * map`` (one extra forward, no grad).

    ``maps`` (B, h, w) are min-max scaled and upsampled to the images, as the Grad-CAM++ paper's
    "explanation map"; ``targets`` (B,) are the classes whose softmax probability is returned.
    Pass the CAM pass's ``logits`` to skip re-running the model on the unmasked images.
    Returns ``(y, o)``, inputs of :func:`cam_monitor.metrics.average_drop` and
    :func:`cam_monitor.metrics.increase_in_confidence`. Same state guarantees as :func:`cam_pass`.
    """
    from .maps import minmax, upsample

    check_images(images)
    transform = output_transform or default_output_transform
    inner = unwrap_compiled(model)
    weights = upsample(minmax(maps.float()), images.shape[-2:]).to(images.device, images.dtype)[:, None]
    with preserved_model_state(inner, images.device), torch.no_grad():
        batch = images * weights if logits is not None else torch.cat([images, images * weights])
        probs = transform(inner(batch)).float().softmax(dim=1)
    if logits is not None:
        probs = torch.cat([logits.float().to(probs.device).softmax(dim=1), probs])
    idx = targets.long().view(-1, 1).to(probs.device)
    b = images.shape[0]
    return probs[:b].gather(1, idx)[:, 0], probs[b:].gather(1, idx)[:, 0]
