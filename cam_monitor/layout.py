"""How a 4-D layer output is laid out: channels first (B, C, h, w) or channels last (B, h, w, C).

Why a module of its own: PyTorch is channels-first by convention, and a Conv2d, BatchNorm or
pooling output is channels-first by construction (``channels_last`` memory format changes the
strides, never the logical shape). Channels-last outputs exist (Swin's stages: a ``Linear`` or a
``LayerNorm`` over the last axis of a 4-D tensor, a permute), and they must be concluded from
evidence. Two kinds are read here:

- the shape: a reading whose grid cannot come from the image by one stride is excluded;
- the structure: what produced the output, found by walking its autograd graph back through
  layout-keeping operations (activations, additions, residual sums, copies) to the module or
  operation that decides (:class:`LayoutEvidence`).

Only an output that neither settles (no producing module or operation says, and the shape reads
both ways equally, or neither way) is refused with :class:`LayoutError`, naming the fix.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import deque
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from torchvision.ops.misc import Permute

from .errors import LayoutError

#: How a 4-D layer output is laid out: channels first (B, C, h, w), channels last (B, h, w, C), or
#: "auto": told from the evidence (see :func:`resolve_layout`).
LAYOUTS = ("auto", "nchw", "nhwc")

#: Modules whose 4-D output is channels-first by construction (they act on axis 1).
CHANNELS_FIRST_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.ConvTranspose2d, nn.LazyConv2d, nn.LazyConvTranspose2d, nn.BatchNorm2d, nn.LazyBatchNorm2d,
    nn.SyncBatchNorm, nn.InstanceNorm2d, nn.GroupNorm, nn.LocalResponseNorm, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.Dropout2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
    nn.Conv1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
)
#: Autograd operations whose 4-D output is channels-first (functional code: ``F.conv2d``, ``F.max_pool2d``...).
_CHANNELS_FIRST_OPS = re.compile(r"Convolution|BatchNorm|GroupNorm|Pool[123]D|Upsample\w*2D|Pad2D|PixelShuffle|"
                                 r"PixelUnshuffle")
#: Autograd operations that keep their input's layout: element-wise maps, sums (residuals), copies.
_LAYOUT_KEEPING_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Pow", "Exp", "Log", "Sqrt", "Rsqrt", "Erf", "Maximum", "Minimum",
    "Where", "Relu", "Gelu", "Silu", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Hardtanh", "Elu", "Mish",
    "Softplus", "Threshold", "LeakyRelu", "Prelu", "PreluKernel", "Clamp", "ClampMin", "ClampMax", "Clone", "ToCopy",
    "NativeDropout", "Dropout", "Alias", "Cat", "ConstantPadNd",
})
_BACKWARD_SUFFIX = re.compile(r"Backward\d*$")
#: Autograd nodes a walk visits at most (a graph this deep without a deciding node says nothing).
_MAX_WALK = 512


def check_layout(layout: str) -> str:
    """``layout`` itself if it is one of :data:`LAYOUTS`, else a ``ValueError`` naming them."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def module_layout(module: nn.Module, output: object) -> str | None:
    """What ``module``'s type says of the layout of its 3-D or 4-D ``output``, or None when it says nothing.

    Channels-first (``"nchw"``; for 3-D outputs (B, C, L), which are then no token sequence): the
    convolution, normalisation and pooling modules of :data:`CHANNELS_FIRST_MODULES` and modules
    named ``...2d`` / ``...1d`` (timm's ``BatchNormAct2d`` or ``LayerNorm2d``, torchvision's
    ``LayerNorm2d``). Channels-last (``"nhwc"``; for 3-D outputs, tokens (B, N, C)): a ``Linear`` or
    a ``LayerNorm`` over the last axis (Swin's blocks and norms, transformer tokens).
    torchvision's ``Permute`` says what its dims produce.
    """
    if not isinstance(output, torch.Tensor) or output.dim() not in (3, 4):
        return None
    if isinstance(module, CHANNELS_FIRST_MODULES) or type(module).__name__.lower().endswith(("2d", "1d")):
        return "nchw"
    if isinstance(module, Permute):
        return {(0, 2, 3, 1): "nhwc", (0, 3, 1, 2): "nchw"}.get(tuple(module.dims))
    if isinstance(module, nn.Linear) and output.shape[-1] == module.out_features:
        return "nhwc"
    if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (output.shape[-1],):
        return "nhwc"
    return None


class LayoutEvidence:
    """What the modules of one forward say about the layout of the tensors they produce.

    Inside :meth:`recording` every module's 4-D output is noted by its autograd node (the forward
    must record a graph: grad enabled, an input or parameter requiring grad); :meth:`layout_of`
    then walks any tensor's graph back to the nodes that decide.
    """

    def __init__(self) -> None:
        self._by_node: dict[object, str] = {}

    def _note(self, module: nn.Module, _inputs: tuple, output: object) -> None:
        said = module_layout(module, output)
        if said is not None and output.grad_fn is not None:  # type: ignore[union-attr]
            self._by_node[output.grad_fn] = said  # type: ignore[union-attr]

    @contextlib.contextmanager
    def recording(self, model: nn.Module) -> Iterator["LayoutEvidence"]:
        """Note what every module of ``model`` produces while the body runs its forward."""
        handles = [m.register_forward_hook(self._note) for m in model.modules()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def layout_of(self, t: torch.Tensor) -> str | None:
        """``"nchw"`` or ``"nhwc"`` when every deciding node behind ``t`` agrees, else None."""
        found: set[str] = set()
        todo, seen = deque([t.grad_fn]), set()
        while todo and len(seen) < _MAX_WALK:
            node = todo.popleft()
            if node is None or node in seen:
                continue
            seen.add(node)
            said = self._by_node.get(node)
            op = _BACKWARD_SUFFIX.sub("", node.name())
            if said is None and _CHANNELS_FIRST_OPS.search(op):
                said = "nchw"
            if said is not None:
                found.add(said)
            elif op in _LAYOUT_KEEPING_OPS:
                todo.extend(n for n, _ in node.next_functions)
        return found.pop() if len(found) == 1 else None


def probe_layout(model: nn.Module, module: nn.Module, images: torch.Tensor) -> str | None:
    """The structural evidence for ``module``'s output layout: one recorded forward of the first
    image (grad enabled on a copy, so a frozen model records a graph too; nothing is written to
    any ``.grad``). Call it in eval mode (the CAM pass's preserved state)."""
    out: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, o: out.append(o) if isinstance(o, torch.Tensor) else None)
    evidence = LayoutEvidence()
    try:
        with torch.enable_grad(), evidence.recording(model):
            model(images[:1].detach().clone().requires_grad_(True))
    finally:
        handle.remove()
    return evidence.layout_of(out[-1]) if out else None


def _strides(size: int, cells: int) -> tuple[float, float]:
    """The strides a layer could have to turn ``size`` pixels into ``cells`` cells (floor, ceil or
    padding rounding included)."""
    return size / (cells + 1), (size / (cells - 1) if cells > 1 else math.inf)


def fits_image(h: int, w: int, image_size: Sequence[int]) -> bool:
    """Whether an (h, w) grid can come from the image by one stride in both directions."""
    (lo_h, hi_h), (lo_w, hi_w) = _strides(int(image_size[0]), h), _strides(int(image_size[1]), w)
    return h <= image_size[0] and w <= image_size[1] and max(lo_h, lo_w) <= min(hi_h, hi_w)


def _stride_mismatch(h: int, w: int, image_size: Sequence[int]) -> float:
    """|log(H / h) - log(W / w)|: 0 when the grid has the same stride in both directions."""
    return abs(math.log(int(image_size[0]) / h) - math.log(int(image_size[1]) / w))


def fitting_readings(shape: Sequence[int], image_size: Sequence[int]) -> dict[str, float]:
    """The readings of a 4-D ``shape`` whose grid fits the image, with their stride mismatch."""
    _, d1, d2, d3 = (int(v) for v in shape)
    readings = {"nchw": (d2, d3), "nhwc": (d1, d2)}
    return {k: _stride_mismatch(*hw, image_size) for k, hw in readings.items() if fits_image(*hw, image_size)}


def resolve_layout(shape: Sequence[int], image_size: Sequence[int], layout: str, layer_name: str,
                   structure: Callable[[], str | None] | None = None) -> str:
    """``"nchw"`` or ``"nhwc"`` for a 4-D output ``shape`` of a layer fed ``image_size`` images.

    ``"auto"`` decides by evidence, in this order: a shape that only one reading fits (ResNet's
    (B, 512, 7, 7) at 224 px cannot be channels-last; Swin's (B, 7, 7, 768) cannot be channels-first);
    else what produced the output (``structure()``, e.g. :func:`probe_layout`: a Conv2d/BatchNorm/pooling
    output is channels-first, a Linear/LayerNorm over the last axis channels-last), which settles the
    C = h = w outputs of small CNNs; else the reading whose two strides agree more closely. An output
    none of these settles raises :class:`LayoutError` naming ``layout=``.
    """
    if check_layout(layout) != "auto":
        return layout
    fits = fitting_readings(shape, image_size)
    if len(fits) == 1:
        return next(iter(fits))
    said = structure() if structure is not None else None
    if said is not None:
        return said
    if len(fits) == 2 and abs(fits["nchw"] - fits["nhwc"]) > 0.05:
        return min(fits, key=fits.get)
    why = "both readings fit the image equally" if fits else "neither reading fits the image"
    raise LayoutError(
        f"layer {layer_name!r} outputs {tuple(shape)} for {tuple(image_size)} images: {why} (channels-first "
        "(B, C, h, w) or channels-last (B, h, w, C)), and no module or operation that produced it says which; pass "
        "layout='nchw' or layout='nhwc'")
