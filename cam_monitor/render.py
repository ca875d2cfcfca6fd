"""Overlays, probe grids, filmstrips and metric-curve figures, as tensors and PNG files.

Everything is a small function on tensors (in the spirit of ``torchvision.utils``): maps are
upsampled bilinearly and min-max scaled *for display only*, coloured through a lookup table
built from matplotlib's colormap registry, and alpha-blended over the un-normalised image. Text
captions use Pillow (already a torchvision dependency); there is no OpenCV dependency.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from torchvision.io import encode_png  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from .atomic import atomic_path  # noqa: E402
from .errors import InputError  # noqa: E402
from .maps import minmax, resize_masks, upsample  # noqa: E402

RED = (1.0, 0.1, 0.1)
GREEN = (0.1, 0.9, 0.2)
MAGENTA = (1.0, 0.2, 1.0)
CAPTION_LINE_PX = 12


@lru_cache(maxsize=16)
def _lut(cmap: str) -> torch.Tensor:
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise InputError(f"unknown colormap {cmap!r}; use a name from matplotlib.colormaps, e.g. 'jet' or 'viridis'") from None
    return torch.from_numpy(colormap(np.linspace(0.0, 1.0, 256))[:, :3]).float()


def colormap_lut(cmap: str = "jet") -> torch.Tensor:
    """(256, 3) RGB lookup table in [0, 1] from matplotlib's colormap registry."""
    return _lut(cmap).clone()


def apply_colormap(values: torch.Tensor, cmap: str = "jet") -> torch.Tensor:
    """Colour (B, H, W) values in [0, 1] into (B, 3, H, W) RGB."""
    lut = _lut(cmap).to(values.device)
    idx = (values.clamp(0, 1) * 255).round().long()
    return lut[idx].permute(0, 3, 1, 2)


def _as_rgb(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise InputError(f"display images must be (B, 1 or 3, H, W) in [0, 1], got {tuple(images.shape)}")
    images = images.float().clamp(0, 1)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.4, cmap: str = "jet") -> torch.Tensor:
    """Blend coloured maps over display images: (1 - alpha) * image + alpha * colour(minmax(map)).

    ``images`` (B, C, H, W) in [0, 1] (un-normalised); ``maps`` (B, h, w) raw, upsampled to (H, W).
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _as_rgb(images)
    if maps.dim() != 3 or maps.shape[0] != rgb.shape[0]:
        raise InputError(f"maps must be (B, h, w) with B = {rgb.shape[0]}, got {tuple(maps.shape)}")
    heat = apply_colormap(minmax(upsample(maps.to(rgb.device), rgb.shape[-2:])), cmap)
    return (1.0 - alpha) * rgb + alpha * heat


def mask_boundary(masks: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: mask pixels with an 8-neighbour outside the mask (a 1-px contour; the image's
    edge is not a boundary). Boolean slices, not a pooling over floats: 10x cheaper."""
    m = masks.bool()
    h, w = m.shape[-2:]
    padded = F.pad(m[:, None].to(torch.uint8), (1, 1, 1, 1), value=1)[:, 0].bool()
    inner = m.clone()
    for dy in range(3):
        for dx in range(3):
            inner &= padded[:, dy:dy + h, dx:dx + w]
    return m & ~inner


def draw_contours(images: torch.Tensor, masks: torch.Tensor, color: Sequence[float], width: int = 1) -> torch.Tensor:
    """Paint the contour of each (B, H, W) mask onto (B, 3, H, W) images in ``color``, ``width`` px
    thick (grown inwards, so the line stays inside the region it outlines)."""
    m = masks.to(images.device).bool()
    edge = mask_boundary(m)
    for _ in range(width - 1):
        edge = (F.max_pool2d(edge[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0) & m
    edge = edge[:, None]
    c = torch.tensor(color, dtype=images.dtype, device=images.device)[None, :, None, None]
    return torch.where(edge, c, images)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    """Pillow's built-in bitmap font: 7x faster to draw than its FreeType default (0.06 vs 0.4 ms a
    caption), which matters on the worker thread that shares the GIL with training."""
    return getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def text_width(text: str) -> float:
    """Width in pixels of ``text`` in the caption font."""
    return _font().getlength(_latin1(text))


def text_strip(width: int, lines: Sequence[str | Sequence[tuple[str, Sequence[float]]]]) -> torch.Tensor:
    """A white (3, h, width) strip of text lines; a line is a string (black) or a sequence of
    ``(text, rgb colour)`` runs drawn left to right. Characters outside Latin-1, which the bitmap
    font lacks, are drawn as ``?``."""
    strip = Image.new("RGB", (width, CAPTION_LINE_PX * len(lines) + 2), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        x = 2.0
        for run, color in ([(line, (0.0, 0.0, 0.0))] if isinstance(line, str) else line):
            text = _latin1(run)
            draw.text((x, 1 + i * CAPTION_LINE_PX), text, fill=tuple(int(255 * c) for c in color), font=_font())
            x += text_width(text)
    return torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def caption(tile: torch.Tensor, lines: Sequence[str | Sequence[tuple[str, Sequence[float]]]]) -> torch.Tensor:
    """Append a white strip with ``lines`` of text (see :func:`text_strip`) under a (3, H, W) tile."""
    return torch.cat([tile, text_strip(tile.shape[-1], lines).to(tile.device, tile.dtype)], dim=1)


def fit_text(parts: Sequence[str], keep: str, width: float) -> list[str]:
    """Shorten the longest of ``parts`` with ``..`` until ``"".join(parts) + keep`` fits ``width``
    pixels: class names give way, never ``keep`` (the probability)."""
    parts = list(parts)
    while text_width("".join(parts) + keep) > width:
        longest = max(range(len(parts)), key=lambda j: len(parts[j]))
        if len(parts[longest]) <= 4:
            break
        parts[longest] = parts[longest][:-3] + ".."
    return parts


#: The colour legend drawn under every probe grid.
LEGEND = (("contours: ", (0.0, 0.0, 0.0)), ("red", RED), (" spurious mask  ", (0.0, 0.0, 0.0)), ("green", GREEN),
          (" object mask  ", (0.0, 0.0, 0.0)), ("magenta", MAGENTA), (" inferred shortcut  ", (0.0, 0.0, 0.0)),
          ("red caption", (0.85, 0.0, 0.0)), (" = misprediction", (0.0, 0.0, 0.0)))


def with_legend(grid: torch.Tensor) -> torch.Tensor:
    """The grid with the colour legend underneath (wrapped onto as many lines as its width needs)."""
    lines: list[list[tuple[str, Sequence[float]]]] = [[]]
    for run in LEGEND:
        if lines[-1] and text_width("".join(t for t, _ in lines[-1]) + run[0]) > grid.shape[-1] - 4:
            lines.append([])
        lines[-1].append(run)
    return torch.cat([grid, text_strip(grid.shape[-1], lines).to(grid.device, grid.dtype)], dim=1)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def resize_images(images: torch.Tensor, tile_size: int | None) -> torch.Tensor:
    """(N, C, H, W) images with the longer side ``tile_size`` px (antialiased bilinear); as they are
    for None or that size already."""
    if tile_size is None or max(images.shape[-2:]) == tile_size:
        return images
    scale = tile_size / max(images.shape[-2:])
    size = (max(1, round(images.shape[-2] * scale)), max(1, round(images.shape[-1] * scale)))
    return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)


def probe_tiles(
    images: torch.Tensor,
    maps: torch.Tensor,
    *,
    ids: Sequence[str],
    labels: Sequence[int],
    preds: Sequence[int] | None = None,
    scores: Sequence[float] | None = None,
    spurious_energy: Sequence[float] | None = None,
    spurious_masks: torch.Tensor | None = None,
    object_masks: torch.Tensor | None = None,
    inferred_masks: torch.Tensor | None = None,
    alpha: float = 0.4,
    cmap: str = "jet",
    class_names: Sequence[str] | None = None,
    tile_size: int | None = None,
) -> torch.Tensor:
    """One captioned overlay tile per probe: (N, 3, H + caption, W) float in [0, 1].

    Caption: id; label and prediction (score), in red for a misprediction, class names shortened
    with ``..`` where the tile is too narrow (never the score); spurious energy. Spurious mask contours are red,
    object contours green, regions the mask-free discovery inferred magenta. ``tile_size`` resizes each tile's longer side (useful for small images
    whose captions would not fit); masks are resized with nearest, maps bilinearly from the grid.
    """
    images = resize_images(images, tile_size)
    size = tuple(images.shape[-2:])
    spurious_masks, object_masks, inferred_masks = (None if m is None else resize_masks(m, size)
                                                    for m in (spurious_masks, object_masks, inferred_masks))
    tiles = overlay(images, maps, alpha, cmap)
    thick = max(1, round(max(tiles.shape[-2:]) / 64))  # inferred regions stay visible at dashboard size
    for masks, color, width in ((spurious_masks, RED, 1), (object_masks, GREEN, 1), (inferred_masks, MAGENTA, thick)):
        if masks is not None:
            tiles = draw_contours(tiles, masks, color, width)
    def name(c: int) -> str:
        """A class's display name; its index when ``class_names`` does not cover it (a prediction
        of a class the probe folder has no sub-folder for)."""
        return class_names[c] if class_names and 0 <= c < len(class_names) else str(c)

    out = []
    width = tiles.shape[-1] - 4
    for i in range(tiles.shape[0]):
        parts = [f"y={name(int(labels[i]))}"] + ([f" p={name(int(preds[i]))}"] if preds is not None else [])
        keep = f" ({_fmt(float(scores[i]))})" if scores is not None else ""
        wrong = preds is not None and int(preds[i]) != int(labels[i])
        line2 = [("".join(fit_text(parts, keep, width)) + keep, (0.85, 0.0, 0.0) if wrong else (0.0, 0.0, 0.0))]
        lines: list = [fit_text([str(ids[i])], "", width)[0], line2]
        if spurious_energy is not None:
            lines.append(f"spur {_fmt(float(spurious_energy[i]))}")
        out.append(caption(tiles[i], lines))
    return torch.stack(out)


def tile_grid(tiles: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Arrange (N, 3, H, W) tiles in a grid with white 2-px gutters."""
    return make_grid(tiles, nrow=max(1, min(nrow, tiles.shape[0])), padding=2, pad_value=1.0)


def probe_grid(images: torch.Tensor, maps: torch.Tensor, *, nrow: int = 8, **tile_kwargs) -> torch.Tensor:
    """:func:`probe_tiles` arranged by :func:`tile_grid`: (3, GH, GW) float in [0, 1]."""
    return tile_grid(probe_tiles(images, maps, **tile_kwargs), nrow)


def filmstrip(frames: Sequence[torch.Tensor], titles: Sequence[str]) -> torch.Tensor:
    """One probe's overlays across evaluations, left to right, each captioned: (3, H', W')."""
    if not frames or len(frames) != len(titles):
        raise InputError(f"filmstrip needs one title per frame, got {len(frames)} frames and {len(titles)} titles")
    tiles = [caption(f, [t]) for f, t in zip(frames, titles)]
    return tile_grid(torch.stack(tiles), nrow=len(tiles))


def metric_curves(steps: Sequence[int], per_probe: Mapping[str, torch.Tensor], max_probe_lines: int = 16) -> Figure:
    """Figure with one panel per metric: thin lines per probe, a thick line for the NaN-aware mean.

    ``per_probe[name]`` is (E, N): E evaluations (at ``steps``) by N probes. The figure is built
    with the object-oriented API (no pyplot state) and a fixed layout, so it is cheap to redraw
    at every evaluation.
    """
    names = list(per_probe)
    fig = Figure(figsize=(4 * max(1, len(names)), 3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(names)), squeeze=False)[0]
    for ax, name in zip(axes, names):
        values = per_probe[name].float().cpu().numpy()
        lines = values[:, : min(values.shape[1], max_probe_lines)]
        ax.plot(steps, lines, lw=0.7, alpha=0.4)
        with np.errstate(all="ignore"):
            mean = np.nanmean(np.where(np.isnan(values).all(axis=1, keepdims=True), 0.0, values), axis=1)
        ax.plot(steps, mean, lw=2.5, color="black", label="mean")
        ax.set_title(name)
        ax.set_xlabel("global step")
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.17, top=0.88, wspace=0.25)
    return fig


def figure_to_tensor(fig: Figure, dpi: int = 100) -> torch.Tensor:
    """Rasterise a matplotlib figure to a (3, H, W) float tensor (Agg canvas, no PNG round trip)."""
    fig.set_dpi(dpi)
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    image = torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0
    plt.close(fig)  # releases pyplot-managed figures; a no-op for others
    return image


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A float [0, 1] image as uint8 on the CPU (clamped, rounded): what encoders and dashboards take."""
    return (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write a (3, H, W) float [0, 1] image as PNG atomically (temporary file, then rename)."""
    data = encode_png(to_uint8(image))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.numpy().tobytes())
    return Path(path)
