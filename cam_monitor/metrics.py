"""Explanation metrics: pure, batched tensor functions on the maps' device.

Conventions: ``maps`` are raw ReLU'd CAMs (B, h, w) at the layer's resolution or already
upsampled (B, H, W); masks are bool (B, H, W). When a map and its mask differ in size the map is
upsampled bilinearly to the mask. Every function returns one float per probe (B,), with NaN where
the metric is undefined for that probe (an all-zero map, an empty mask, or, for metrics that
depend on the ordering of pixels, a constant map) - never a silent 0. :func:`nanmean` aggregates
and reports how many probes were skipped.

Sources: energy fraction / enrichment follow the energy-based pointing game of Score-CAM (Wang et
al., CVPRW 2020); pointing game: Zhang et al., ECCV 2016; relevance rank accuracy: Arras et al.,
"CLEVR-XAI", Information Fusion 2022; average drop / increase in confidence: Chattopadhay et al.,
"Grad-CAM++", WACV 2018; Spearman-rank and top-k similarity of maps across models: Adebayo et
al., "Sanity Checks for Saliency Maps", NeurIPS 2018.
"""
from __future__ import annotations

import math

import torch

from .errors import InputError
from .maps import upsample

_NAN = float("nan")


def _check_pair(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate (B, h, w) maps against (B, H, W) masks; return float maps at mask size, bool masks."""
    if maps.dim() != 3 or masks.dim() != 3 or maps.shape[0] != masks.shape[0]:
        raise InputError(f"maps (B, h, w) and masks (B, H, W) must share B; got {tuple(maps.shape)} and {tuple(masks.shape)}")
    return upsample(maps, masks.shape[-2:]), masks.bool().to(maps.device)


def _constant(maps: torch.Tensor) -> torch.Tensor:
    """(B,) True where a map has a single value (its argmax/top-k/ranks carry no information)."""
    flat = maps.flatten(1)
    return flat.amax(1) == flat.amin(1)


def energy_fraction(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the map's energy inside the mask: sum(A * M) / sum(A), in [0, 1].

    NaN for an all-zero map or an empty mask.
    """
    a, m = _check_pair(maps, masks)
    total = a.flatten(1).sum(1)
    inside = (a * m).flatten(1).sum(1)
    bad = (total <= 0) | (m.flatten(1).sum(1) == 0)
    return torch.where(bad, torch.full_like(total, _NAN), inside / torch.where(bad, torch.ones_like(total), total))


def enrichment(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Energy fraction divided by the mask's area fraction |M| / N; 1.0 = chance, > 1 = concentrated.

    Invariant to scaling the map; NaN for an all-zero map or an empty mask.
    """
    frac = energy_fraction(maps, masks)
    area = masks.bool().flatten(1).float().mean(1).to(frac.device)
    return frac / area.clamp_min(1e-12)


def _single_cell_maps(grid: tuple[int, int], size: tuple[int, int], start: int, stop: int,
                      device: torch.device) -> torch.Tensor:
    """Maps with one non-zero cell (cells ``start:stop`` of the grid, row-major), upsampled to ``size``."""
    h, w = grid
    cells = torch.arange(start, min(stop, h * w), device=device)
    onehot = torch.zeros(len(cells), h * w, device=device)
    onehot[torch.arange(len(cells), device=device), cells] = 1.0
    return upsample(onehot.reshape(-1, h, w), size)


def energy_fraction_bounds(grid: tuple[int, int], masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) the smallest and the largest energy fraction any non-negative map on a ``grid`` (h, w)
    can put on each mask.

    After bilinear upsampling a map's energy fraction inside a mask is a ratio of two linear forms
    in its cells, so its extremes are reached by maps with a single non-zero cell. Where the two
    bounds are equal, every map scores the same on that mask (the border band on a 2x2 grid): a
    metric of it cannot move whatever the model does. NaN for an empty mask.
    """
    h, w = int(grid[0]), int(grid[1])
    flat_masks = masks.bool().flatten(1).float()
    low = torch.full((masks.shape[0],), math.inf, device=masks.device)
    high = torch.zeros(masks.shape[0], device=masks.device)
    for start in range(0, h * w, 64):  # a chunk of cells at a time: bounded memory on fine grids
        basis = _single_cell_maps((h, w), masks.shape[-2:], start, start + 64, masks.device).flatten(1)
        fraction = (flat_masks @ basis.t()) / basis.sum(1)[None]
        low, high = torch.minimum(low, fraction.amin(1)), torch.maximum(high, fraction.amax(1))
    empty = flat_masks.sum(1) == 0
    return low.masked_fill(empty, _NAN), high.masked_fill(empty, _NAN)


def enrichment_ceiling(grid: tuple[int, int], masks: torch.Tensor) -> torch.Tensor:
    """(N,) the largest enrichment any non-negative map on an ``grid`` (h, w) can reach on each mask:
    the largest energy fraction (:func:`energy_fraction_bounds`) divided by the mask's area share.
    On a 2x2 grid the border band's ceiling is exactly 1.0 (chance): no map can ever be enriched
    there. NaN for an empty mask.
    """
    area = masks.bool().flatten(1).float().mean(1)
    return energy_fraction_bounds(grid, masks)[1] / area.clamp_min(1e-12)


def default_tolerance(map_size: tuple[int, int], image_size: tuple[int, int]) -> float:
    """Half the layer's stride in image pixels: the pointing game's default tolerance."""
    return 0.5 * max(image_size[0] / map_size[0], image_size[1] / map_size[1])


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: float | None = None) -> torch.Tensor:
    """1.0 if the map's maximum lies within ``tolerance`` pixels of the mask, else 0.0.

    The maximum is taken on the map upsampled to the mask (first one on ties). ``tolerance``
    defaults to half the layer stride (:func:`default_tolerance`). NaN for a constant (including
    all-zero) map or an empty mask.
    """
    if tolerance is None:
        tolerance = default_tolerance(tuple(maps.shape[-2:]), tuple(masks.shape[-2:]))
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0 pixels, got {tolerance}")
    a, m = _check_pair(maps, masks)
    w = a.shape[-1]
    idx = a.flatten(1).argmax(1)
    py, px = (idx // w).float(), (idx % w).float()
    ys = torch.arange(a.shape[-2], device=a.device, dtype=torch.float32)
    xs = torch.arange(w, device=a.device, dtype=torch.float32)
    dist2 = (ys[None, :, None] - py[:, None, None]) ** 2 + (xs[None, None, :] - px[:, None, None]) ** 2
    nearest = torch.where(m, dist2, torch.full_like(dist2, float("inf"))).flatten(1).amin(1)
    hit = (nearest <= tolerance**2).float()
    bad = _constant(a) | (m.flatten(1).sum(1) == 0)
    return torch.where(bad, torch.full_like(hit, _NAN), hit)


def pointing_always_hits(grid: tuple[int, int], masks: torch.Tensor, tolerance: float | None = None) -> torch.Tensor:
    """(N,) whether the pointing game on each mask is a hit for *every* map on an ``grid`` (h, w).

    An upsampled map peaks at one of its cells, so it suffices to point with each single-cell map;
    when all of them hit, the metric is 1.0 whatever the model does (a 2x2 grid against the
    border band, where half a stride reaches the band from anywhere). False for an empty mask.
    """
    h, w = int(grid[0]), int(grid[1])
    masks = masks.bool()
    basis = _single_cell_maps((h, w), masks.shape[-2:], 0, h * w, masks.device)
    if tolerance is None:
        tolerance = default_tolerance((h, w), tuple(masks.shape[-2:]))
    return torch.stack([(pointing_game(basis, m.expand(h * w, -1, -1), tolerance) == 1).all() for m in masks])


def rank_accuracy(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Relevance rank accuracy: |top_K(A) ∩ M| / |M| with K = |M|, in [0, 1].

    NaN for a constant (including all-zero) map or an empty mask.
    """
    a, m = _check_pair(maps, masks)
    flat, mflat = a.flatten(1), m.flatten(1)
    k = mflat.sum(1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    hits = ((ranks < k[:, None]) & mflat).sum(1).float()
    bad = _constant(a) | (k == 0)
    return torch.where(bad, torch.full_like(hits, _NAN), hits / k.clamp_min(1).float())


def border_mask(height: int, width: int, fraction: float = 0.1, device: torch.device | str | None = None) -> torch.Tensor:
    """(H, W) bool band covering ``fraction`` of each side: the default spurious region.

    Each band is ``max(1, round(fraction * side))`` pixels wide.
    """
    if not 0 < fraction < 0.5:
        raise InputError(f"border fraction must be in (0, 0.5), got {fraction}")
    by, bx = max(1, round(fraction * height)), max(1, round(fraction * width))
    m = torch.ones(height, width, dtype=torch.bool, device=device)
    m[by:height - by, bx:width - bx] = False
    return m


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based) along dim 1 with ties given the mean of their positions, batched."""
    b, n = x.shape
    vals, order = x.sort(dim=1, stable=True)
    new_group = torch.ones_like(vals, dtype=torch.long)
    new_group[:, 1:] = (vals[:, 1:] != vals[:, :-1]).long()
    group = new_group.cumsum(1) - 1 + torch.arange(b, device=x.device)[:, None] * n
    pos = torch.arange(n, device=x.device, dtype=x.dtype).expand(b, n)
    sums = torch.zeros(b * n, device=x.device, dtype=x.dtype).scatter_add_(0, group.flatten(), pos.flatten())
    counts = torch.zeros(b * n, device=x.device, dtype=x.dtype).scatter_add_(0, group.flatten(), torch.ones_like(pos).flatten())
    avg_sorted = (sums / counts.clamp_min(1))[group]
    ranks = torch.empty_like(avg_sorted)
    ranks.scatter_(1, order, avg_sorted)
    return ranks


def _check_same(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 3:
        raise InputError(f"the two sets of maps must both be (B, h, w) of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")


def spearman(maps_a: torch.Tensor, maps_b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of two maps of each probe, over the grid (ties averaged), in [-1, 1].

    Drift is ``1 - spearman``. NaN where either map is constant.
    """
    _check_same(maps_a, maps_b)
    ra = _average_ranks(maps_a.flatten(1).double())
    rb = _average_ranks(maps_b.flatten(1).double().to(maps_a.device))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    rho = (ra * rb).sum(1) / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, rho, torch.full_like(rho, _NAN)).float()


def _top_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    idx = flat.argsort(dim=1, descending=True, stable=True)[:, :k]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)


def topk_iou(maps_a: torch.Tensor, maps_b: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """IoU of the top ``fraction`` of grid cells (at least one) of two maps, in [0, 1].

    NaN where either map is constant (its top cells are arbitrary).
    """
    _check_same(maps_a, maps_b)
    if not 0 < fraction <= 1:
        raise InputError(f"top-k fraction must be in (0, 1], got {fraction}")
    fa, fb = maps_a.flatten(1), maps_b.flatten(1).to(maps_a.device)
    k = max(1, math.ceil(fraction * fa.shape[1]))
    ta, tb = _top_mask(fa, k), _top_mask(fb, k)
    iou = (ta & tb).sum(1).float() / (ta | tb).sum(1).float()
    bad = _constant(maps_a) | _constant(maps_b.to(maps_a.device))
    return torch.where(bad, torch.full_like(iou, _NAN), iou)


def center_of_mass(maps: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, 2) (y, x) centre of mass of each map, in image pixels when ``image_size`` is given.

    Cell (i, j) sits at its centre ((i + 0.5) * H / h, (j + 0.5) * W / w). NaN for all-zero maps.
    """
    h, w = maps.shape[-2:]
    sy, sx = (1.0, 1.0) if image_size is None else (image_size[0] / h, image_size[1] / w)
    ys = (torch.arange(h, device=maps.device, dtype=torch.float32) + 0.5) * sy
    xs = (torch.arange(w, device=maps.device, dtype=torch.float32) + 0.5) * sx
    a = maps.float()
    total = a.flatten(1).sum(1)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    cy = (a.sum(2) * ys).sum(1) / safe
    cx = (a.sum(1) * xs).sum(1) / safe
    com = torch.stack([cy, cx], dim=1)
    return torch.where((total > 0)[:, None], com, torch.full_like(com, _NAN))


def center_of_mass_shift(maps_a: torch.Tensor, maps_b: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Euclidean distance between the two maps' centres of mass (pixels); NaN if either is all zero."""
    _check_same(maps_a, maps_b)
    d = center_of_mass(maps_a, image_size) - center_of_mass(maps_b.to(maps_a.device), image_size)
    return d.square().sum(1).sqrt()


def average_drop(scores: torch.Tensor, masked_scores: torch.Tensor) -> torch.Tensor:
    """Per-probe drop max(0, y - o) / y, in [0, 1] for probabilities (mean over probes = Average Drop).

    ``scores`` y: the class probability on the image; ``masked_scores`` o: on image x map.
    NaN where y <= 0.
    """
    y, o = scores.float(), masked_scores.float().to(scores.device)
    drop = (y - o).clamp_min(0) / torch.where(y > 0, y, torch.ones_like(y))
    return torch.where(y > 0, drop, torch.full_like(y, _NAN))


def increase_in_confidence(scores: torch.Tensor, masked_scores: torch.Tensor) -> torch.Tensor:
    """Per-probe indicator o > y (mean over probes = Increase in Confidence), 0.0 or 1.0."""
    return (masked_scores.float().to(scores.device) > scores.float()).float()


def nanmean(values: torch.Tensor) -> tuple[float, int]:
    """(mean over the non-NaN entries, number of NaN entries skipped); mean is NaN if all are NaN."""
    v = values.float().flatten()
    ok = ~torch.isnan(v)
    skipped = int((~ok).sum())
    return (float(v[ok].mean()) if ok.any() else _NAN), skipped
