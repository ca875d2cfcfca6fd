"""The images the confirmation tests classify: probes edited so that one thing of a source probe
(a region, its colour statistics, its background's spectrum, its border band, the arrangement of
its cells, its background's fine detail, the region a user marked) is given to, or taken from, an image.

Pure tensor functions on CPU images (B, C, H, W) indexed by probe: no model, no maps' meaning,
no Lightning. :mod:`discovery` decides which probes and regions each test uses and why each
control is the right one; this module only builds the pictures, each test's images first and
its controls after, so that one forward pass classifies them all.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import torch

from .maps import upsample
from .metrics import border_mask

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 in image pixels, half-open
#: The share of a source's pixels taken as its object by :func:`object_regions`: the most-credited by its map.
OBJECT_SHARE = 0.25
#: The widest border band whose band leaves an inner band as large inside a square image:
#: (1 - 2f)^2 >= 1/2.
MAX_BORDER_BAND = (1 - 0.5 ** 0.5) / 2
#: The tails :func:`colour_statistics` leaves out of a colour's spread: its 1st to 99th percentile.
COLOUR_TAIL = 0.01
#: Pixels :func:`colour_statistics` hands :func:`torch.quantile` at once: it refuses inputs of
#: 2**24 elements or more, and this bounds the memory of its sort.
COLOUR_CHUNK_ELEMENTS = 2 ** 22
#: The blur of :func:`blurred_cells`: a Gaussian of this many cells' standard deviation (half a
#: cell: a grating finer than a cell is gone, a shape of several cells stays).
BLUR_CELLS = 0.5


class Paste(NamedTuple):
    """Source probe ``source``'s pixels inside ``box`` pasted into probe ``recipient`` at ``place``
    (a box of the same size)."""

    source: int
    box: Box
    recipient: int
    place: Box


def pasted_images(images: torch.Tensor, pastes: Sequence[Paste]) -> torch.Tensor:
    """(P, C, H, W): each paste's recipient with its source's box copied to its place; the probes
    themselves are untouched."""
    out = []
    for source, (y0, x0, y1, x1), recipient, (p0, q0, p1, q1) in pastes:
        img = images[recipient].clone()
        img[:, p0:p1, q0:q1] = images[source][:, y0:y1, x0:x1]
        out.append(img)
    return torch.stack(out) if out else images[:0]


def object_regions(maps: torch.Tensor, image_size: tuple[int, int], share: float = OBJECT_SHARE) -> torch.Tensor:
    """(N, H, W) bool: each map's most-credited ``share`` of the image's pixels, exactly that many
    (the map upsampled bilinearly to the image; ties go to the first pixels in raster order)."""
    up = upsample(maps, image_size)
    flat = up.flatten(1)
    top = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :max(1, int(share * flat.shape[1]))]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True).reshape(up.shape)


def filled(images: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``images`` (B, C, H, W) with ``region`` (B, H, W) set to the per-channel mean of the rest."""
    keep = (~region)[:, None].to(images.dtype)
    mean = (images * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp(min=1)
    return torch.where(region[:, None], mean, images)


def spectrum_images(images: torch.Tensor, objects: torch.Tensor, sources: list[int],
                    recipients: list[int]) -> torch.Tensor:
    """(2P, C, H, W): each recipient's phase with the amplitude of its source's background (the
    source's ``objects`` region filled, :func:`filled`), then each control (the amplitude of the
    source's object: everything else filled); per channel, in the images' own units."""
    if not sources:
        return images[:0]
    src, region = images[sources].double(), objects[sources]
    phase = torch.fft.fft2(images[recipients].double()).angle()
    out = [torch.fft.ifft2(torch.polar(torch.fft.fft2(filled(src, part)).abs(), phase)).real
           for part in (region, ~region)]
    return torch.cat(out).to(images.dtype)


def matched_statistics(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``images`` (B, C, H, W) shifted and scaled per channel to the mean and standard deviation of
    ``targets`` (same shape; :func:`matched_levels`); a flat channel is only shifted."""
    def mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean((2, 3), keepdim=True), x.std((2, 3), keepdim=True)
    return matched_levels(images, mean_std(images), mean_std(targets))


def colour_statistics(images: torch.Tensor, tail: float = COLOUR_TAIL) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel (B, C, 1, 1 each), the median and the spread between the ``tail`` and
    ``1 - tail`` quantiles (:func:`torch.quantile`, linear interpolation): the statistics of most of
    the pixels. An object on less than half of the image leaves the median where its background
    puts it and changes the spread only by its extremes, not by its size, so they carry a cast but
    not how much of the image the object fills (the mean and the standard deviation carry both)."""
    levels = torch.tensor([0.5, tail, 1 - tail], device=images.device)
    per_chunk = max(1, COLOUR_CHUNK_ELEMENTS // max(1, images[:1].numel()))
    picked = torch.cat([torch.quantile(chunk.flatten(2).float(), levels, dim=-1)  # it takes float32 and float64 only
                        for chunk in images.split(per_chunk)], 1).to(images.dtype)
    return picked[0][..., None, None], (picked[2] - picked[1])[..., None, None]


def matched_levels(images: torch.Tensor, own: tuple[torch.Tensor, torch.Tensor],
                   target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``images`` shifted per channel from their ``own`` level to the ``target``'s and scaled from
    their spread to its (each a (B, C, 1, 1) pair: the median and percentile spread of
    :func:`colour_statistics`, or a mean and a standard deviation); a channel where either spread is
    zero is only shifted."""
    (m, s), (mt, st) = own, target
    scale = torch.where((s > 0) & (st > 0), st / s.clamp(min=1e-12), torch.ones_like(s))
    return (images - m) * scale + mt


def colour_images(images: torch.Tensor, sources: list[int], recipients: list[int]) -> torch.Tensor:
    """(2P, C, H, W): each recipient shifted and scaled per channel to its source's colour
    statistics (:func:`colour_statistics`: median and 1st-99th percentile spread), then each
    control (the source given the recipient's)."""
    if not sources:
        return images[:0]
    used, at = torch.tensor(sources + recipients).unique(return_inverse=True)  # each probe's statistics once
    median, spread = colour_statistics(images[used])
    n = len(sources)
    of_sources, of_recipients = (median[at[:n]], spread[at[:n]]), (median[at[n:]], spread[at[n:]])
    return torch.cat([matched_levels(images[recipients], of_recipients, of_sources),
                      matched_levels(images[sources], of_sources, of_recipients)])


@functools.lru_cache(maxsize=16)
def border_bands(image_size: tuple[int, int], fraction: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(outer, inner) (H, W) bool masks: the border band of ``fraction`` of each side (the metrics'
    :func:`~cam_monitor.metrics.border_mask`) and the next band inward with at least as many pixels
    (whole rings, by depth relative to the band's width on each axis); None when the image has no
    such inner band (an image of a few pixels). Cached per size and fraction (the fit-start check
    and every evaluation ask for the same bands): the masks are shared, read them only."""
    h, w = image_size
    outer = border_mask(h, w, fraction)
    by, bx = max(1, round(fraction * h)), max(1, round(fraction * w))
    ys, xs = torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64)
    depth = torch.minimum(torch.minimum(ys, h - 1 - ys)[:, None] / by, torch.minimum(xs, w - 1 - xs)[None, :] / bx)
    inside = depth[~outer].sort().values
    area = int(outer.sum())
    if len(inside) < area:
        return None
    return outer, ~outer & (depth <= inside[area - 1])


def banded_images(images: torch.Tensor, sources: list[int], recipients: list[int],
                  bands: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(2P, C, H, W): each recipient with its source's outer band, then each control (the
    recipient with the source's inner band); ``bands`` from :func:`border_bands`."""
    if not sources:
        return images[:0]
    src, dst = images[sources], images[recipients]
    return torch.cat([torch.where(band, src, dst) for band in bands])


def cell_size(image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """The pixels of one grid cell (the layer's stride), at least one."""
    return max(1, image_size[0] // grid[0]), max(1, image_size[1] // grid[1])


def shuffled_cells(images: torch.Tensor, grid: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """``images`` (B, C, H, W) with their grid cells in a random order each (seeded by ``gen``): what
    lies inside a cell is kept, where it sits is not. Pixels past the last whole cell stay."""
    b, c, h, w = images.shape
    ch, cw = cell_size((h, w), grid)
    gy, gx = h // ch, w // cw
    out = images.clone()
    tiles = images[:, :, :gy * ch, :gx * cw].reshape(b, c, gy, ch, gx, cw).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(b, gy * gx, c, ch, cw)
    order = torch.rand(b, gy * gx, generator=gen).argsort(1)
    tiles = tiles[torch.arange(b)[:, None], order]
    out[:, :, :gy * ch, :gx * cw] = tiles.reshape(b, gy, gx, c, ch, cw).permute(0, 3, 1, 4, 2, 5).reshape(
        b, c, gy * ch, gx * cw)
    return out


def gaussian_kernel(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """(size,) a sampled Gaussian of standard deviation ``sigma`` pixels, centred, summing to one
    (torchvision's ``gaussian_blur`` samples the same points)."""
    x = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(dtype)


def reflected_blur_matrix(n: int, size: int, sigma: float, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
    """(n, n) the 1-D blur of :func:`gaussian_kernel` (``size`` taps, centred) along an axis of ``n``
    pixels as a matrix: row ``i`` holds the weight of every input pixel in output pixel ``i``, the
    taps past an edge folded back onto the pixels they reflect (``torch.nn.functional.pad``'s
    ``"reflect"``, which needs ``size // 2 < n``)."""
    half = size // 2
    taps = torch.arange(n)[:, None] + torch.arange(size)[None, :] - half
    taps = torch.where(taps < 0, -taps, taps)
    taps = torch.where(taps >= n, 2 * (n - 1) - taps, taps)
    weights = gaussian_kernel(size, sigma, torch.float64).expand(n, size)
    matrix = torch.zeros(n, n, dtype=torch.float64).index_put_(
        (torch.arange(n)[:, None].expand(n, size), taps), weights, accumulate=True)
    return matrix.to(dtype=dtype, device=device)


def blurred_cells(images: torch.Tensor, grid: tuple[int, int], cells: float = BLUR_CELLS) -> torch.Tensor:
    """``images`` blurred by a Gaussian of ``cells`` cells' standard deviation per axis (reflected at
    the edges): detail finer than that is gone, the arrangement of cells stays.

    The same image as torchvision's ``gaussian_blur`` with that kernel, computed as one matrix
    product per axis (:func:`reflected_blur_matrix`): its 2-D kernel costs k^2 per pixel, and at
    224 px on a 7 x 7 grid k is 97 (1.8 s for 16 images on 2 CPU cores); two 1-D convolutions of
    97 taps took 0.13 s, the two products 0.008 s."""
    _, _, h, w = images.shape
    sy, sx = (cells * size for size in cell_size((h, w), grid))
    ky, kx = (min(2 * math.ceil(3 * s) + 1, 2 * n - 1) for s, n in ((sy, h), (sx, w)))
    down = reflected_blur_matrix(h, ky, sy, images.dtype, images.device)
    across = reflected_blur_matrix(w, kx, sx, images.dtype, images.device)
    return down @ images @ across.T


def detail_images(images: torch.Tensor, sources: list[int], grid: tuple[int, int],
                  gen: torch.Generator) -> torch.Tensor:
    """(2P, C, H, W): each source with its cells shuffled, then each control (the source blurred)."""
    if not sources:
        return images[:0]
    src = images[sources]
    return torch.cat([shuffled_cells(src, grid, gen), blurred_cells(src, grid)])


def background_detail_images(images: torch.Tensor, objects: torch.Tensor, grid: tuple[int, int],
                             sources: list[int], recipients: list[int]) -> torch.Tensor:
    """(2P, C, H, W): each recipient blurred at half a cell (:func:`blurred_cells`: its own fine
    detail gone, its shapes kept) plus its source's fine detail (the source minus its own blur)
    from outside the source's ``objects`` region, then each control (the same blurred recipient
    plus the fine detail from inside that region)."""
    if not sources:
        return images[:0]
    src = images[sources]
    fine = src - blurred_cells(src, grid)
    inside = objects[sources][:, None].to(images.dtype)
    base = blurred_cells(images[recipients], grid)
    return torch.cat([base + fine * (1 - inside), base + fine * inside])


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, 4) long: each (H, W) mask's bounding box (y0, x0, y1, x1), half-open; all zero for an
    empty mask."""
    def span(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(hit.shape[1])
        first = torch.where(hit, index, hit.shape[1]).min(1).values
        return first, torch.where(hit, index, -1).max(1).values + 1

    rows = masks.any(2)
    (y0, y1), (x0, x1) = span(rows), span(masks.any(1))
    boxes = torch.stack([y0, x0, y1, x1], 1)
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))


def clear_places(box: Box, image_size: tuple[int, int]) -> torch.Tensor:
    """(h', w') bool over top-left corners: where a box of ``box``'s size fits in the image without
    overlapping ``box``."""
    (y0, x0, y1, x1), (height, width) = box, image_size
    ys = torch.arange(max(0, height - (y1 - y0) + 1))[:, None]
    xs = torch.arange(max(0, width - (x1 - x0) + 1))[None]
    return (ys >= y1) | (ys + (y1 - y0) <= y0) | (xs >= x1) | (xs + (x1 - x0) <= x0)


def markable(masks: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the probes whose (H, W) mask marks something and whose box can be moved clear of
    itself inside the image (some :func:`clear_places`), so that :func:`marked_images` has a
    control: the box's height fits above or below it, or its width beside it."""
    height, width = masks.shape[-2:]
    y0, x0, y1, x1 = mask_boxes(masks).unbind(1)
    h, w = y1 - y0, x1 - x0
    return (h > 0) & ((y0 >= h) | (height - y1 >= h) | (x0 >= w) | (width - x1 >= w))


def marked_images(images: torch.Tensor, masks: torch.Tensor, sources: list[int], recipients: list[int],
                  gen: torch.Generator) -> torch.Tensor:
    """(2P, C, H, W): each recipient with its own marked region taken away (:func:`filled`) and its
    source's marked pixels put in at the same place, then each control (the same recipient with,
    on those pixels, the source's pixels from a box of the mark's size elsewhere in the source,
    clear of the mark, drawn with ``gen``). Both cover the same pixels of the same recipient and
    take the same from it; they differ only in whether what they bring is the marked content.
    Every source must be :func:`markable`."""
    if not sources:
        return images[:0]
    base = filled(images[recipients], masks[recipients])
    marks = masks[sources]
    tests = torch.where(marks[:, None], images[sources], base)
    controls = base.clone()
    size = tuple(images.shape[-2:])
    for i, (source, box) in enumerate(zip(sources, mask_boxes(marks).tolist())):
        y0, x0, y1, x1 = box
        places = clear_places((y0, x0, y1, x1), size).nonzero()  # type: ignore[arg-type]
        p0, q0 = places[int(torch.randint(len(places), (1,), generator=gen))].tolist()
        region = marks[i, y0:y1, x0:x1]
        moved = images[source][:, p0:p0 + y1 - y0, q0:q0 + x1 - x0]
        controls[i][:, y0:y1, x0:x1] = torch.where(region, moved, controls[i][:, y0:y1, x0:x1])
    return torch.cat([tests, controls])
