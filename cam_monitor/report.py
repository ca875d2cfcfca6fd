"""The pictures of one evaluation, built from the probes, the evaluation and the history.

One :class:`Panel` per evaluation is rendered once and handed to every sink. This module is the
only one that knows both the probe set's fields and rendering's arguments. No Lightning, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch

from .records import Evaluation, Panel
from .history import History
from .probes import ProbeSet
from .maps import resize_masks
from .render import (figure_to_tensor, filmstrip, metric_curves, overlay, probe_tiles, resize_images, tile_grid,
                     with_legend)

#: Per-probe series drawn in the trends figure.
TREND_METRICS = ("spurious_energy", "spurious_enrichment", "object_energy", "drift_ref")
#: Per-probe curves sent to dashboards that plot them (per probe, enrichment is energy over a fixed
#: area share: the same curve as the energy, so it is left out).
CURVE_METRICS = ("spurious_energy", "object_energy", "drift_ref")


@dataclass(frozen=True)
class ReportSettings:
    """How the pictures look: at most ``max_grid_probes`` tiles, ``tile_size`` px on the longer
    side (None keeps the probe size), ``nrow`` tiles a grid row; ``curve_probes``: how many of the
    first probes get per-probe curves on the dashboards (None: every tiled probe)."""

    max_grid_probes: int = 32
    tile_size: int | None = 128
    nrow: int = 8
    curve_probes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_grid_probes, int) or self.max_grid_probes < 1:
            raise ValueError(f"max_grid_probes must be an int >= 1, got {self.max_grid_probes!r}")
        if self.tile_size is not None and (not isinstance(self.tile_size, int) or self.tile_size < 8):
            raise ValueError(f"tile_size must be an int >= 8 or None, got {self.tile_size!r}")
        if self.curve_probes is not None and (not isinstance(self.curve_probes, int) or self.curve_probes < 0):
            raise ValueError(f"curve_probes must be an int >= 0 or None, got {self.curve_probes!r}")


def build_panel(probes: ProbeSet, ev: Evaluation, history: History, settings: ReportSettings,
                trends: bool = True, inferred_masks: torch.Tensor | None = None) -> Panel:
    """Render the grid of the first ``max_grid_probes`` probes (with the colour legend), the
    filmstrip and, with ``trends``, the trends figure (a dashboard that plots :attr:`Panel.curves`
    itself does not need it). ``inferred_masks`` (N, H, W): the shortcut regions to outline (the
    monitor's, :meth:`~cam_monitor.monitor.Monitor.inferred_probes`' rule); none by default."""
    n = min(len(probes), settings.max_grid_probes)
    display = probes.display_images()
    tiles = probe_tiles(display[:n], ev.maps[:n], ids=probes.ids[:n], labels=probes.labels[:n].tolist(),
                        preds=ev.preds[:n].tolist(), scores=ev.probs[:n].tolist(),
                        spurious_energy=ev.per_probe["spurious_energy"][:n].tolist(),
                        spurious_masks=_rows(probes.spurious_masks, slice(0, n)),
                        object_masks=_rows(probes.object_masks, slice(0, n)),
                        inferred_masks=None if inferred_masks is None else inferred_masks[:n],
                        class_names=probes.class_names, tile_size=settings.tile_size)
    series = {f"{history.prefix}/{k}": v[:, :n] for k, v in history.per_probe.items() if k in TREND_METRICS}
    figure = figure_to_tensor(metric_curves(history.steps, series)) if series and trends else None
    k = n if settings.curve_probes is None else min(n, settings.curve_probes)
    curves = {m: {pid: float(x) for pid, x in zip(probes.ids[:k], ev.per_probe[m][:k].tolist()) if not math.isnan(x)}
              for m in CURVE_METRICS if m in ev.per_probe} if k else {}
    overlays = overlay(resize_images(display[:n], settings.tile_size), ev.maps[:n])
    size = tuple(overlays.shape[-2:])
    masks = {kind: resize_masks(m[:n], size) for kind, m in (("spurious", probes.spurious_masks),
                                                             ("object", probes.object_masks),
                                                             ("inferred", inferred_masks)) if m is not None}
    return Panel(grid=with_legend(tile_grid(tiles, nrow=settings.nrow)), tiles=tiles, overlays=overlays, masks=masks, trends=figure, ids=probes.ids[:n],
                 labels=probes.labels[:n].tolist(), filmstrip=build_filmstrip(probes, display, history, settings),
                 curves=curves)


def build_filmstrip(probes: ProbeSet, display: torch.Tensor, history: History,
                    settings: ReportSettings) -> torch.Tensor | None:
    """One row per filmstrip probe: its overlay at each of the remembered evaluations."""
    maps_over_time = history.filmstrip_maps
    if maps_over_time is None:
        return None
    frames_n = maps_over_time.shape[0]
    rows = []
    for j in range(maps_over_time.shape[1]):
        same = slice(j, j + 1)
        frames = probe_tiles(display[same].expand(frames_n, -1, -1, -1), maps_over_time[:, j],
                             ids=[probes.ids[j]] * frames_n, labels=[int(probes.labels[j])] * frames_n,
                             spurious_masks=_rows(probes.spurious_masks, same, frames_n),
                             object_masks=_rows(probes.object_masks, same, frames_n),
                             class_names=probes.class_names, tile_size=settings.tile_size)
        rows.append(filmstrip(list(frames), [f"step {s}" for s in history.filmstrip_steps]))
    return torch.cat(rows, dim=1)


def _rows(masks: torch.Tensor | None, index: slice, repeat: int | None = None) -> torch.Tensor | None:
    """``masks[index]`` (repeated ``repeat`` times along the batch), or None without masks."""
    if masks is None:
        return None
    picked = masks[index]
    return picked.expand(repeat, -1, -1) if repeat is not None else picked
