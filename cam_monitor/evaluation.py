"""One monitor evaluation: CAMs of the probe set in chunks, per-probe metrics and aggregates.

Lightning-free: the callback passes the model, the probes and (under DDP) a shard and a gather
function. Every rank computes its shard of maps, the shards are gathered, and every rank then
computes identical metrics from the full set, so decisions taken on them agree across ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from . import metrics as M
from .engine import OutputTransform, cam_pass, masked_scores
from .errors import NonFiniteOutputError
from .layers import LayerSpec, ReshapeSpec
from .maps import upsample
from .probes import ProbeSet

Gather = Callable[[torch.Tensor], torch.Tensor]

#: Per-probe metrics the monitor computes (keys of :attr:`Evaluation.per_probe`).
PER_PROBE = ("spurious_energy", "spurious_enrichment", "pointing_spurious", "object_energy",
             "drift_prev", "drift_ref", "average_drop")


@dataclass
class Evaluation:
    """What one evaluation measured. Tensors are on the CPU; ``maps`` are raw (N, h, w)."""

    epoch: int
    global_step: int
    maps: torch.Tensor
    preds: torch.Tensor
    probs: torch.Tensor
    targets: torch.Tensor
    per_probe: dict[str, torch.Tensor]
    aggregates: dict[str, float]
    degenerate: int
    extra_maps: dict[str, torch.Tensor] = field(default_factory=dict)


def shard_indices(n: int, rank: int, world: int) -> torch.Tensor:
    """Probe indices rank ``rank`` of ``world`` computes: rank, rank + world, ... (any n)."""
    return torch.arange(rank, n, world)


def unshard(gathered: torch.Tensor, n: int) -> torch.Tensor:
    """Undo :func:`shard_indices`: (world, per_rank, ...) gathered rows -> (n, ...) in probe order."""
    world, per_rank = gathered.shape[:2]
    return gathered.transpose(0, 1).reshape(world * per_rank, *gathered.shape[2:])[:n]


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = torch.zeros(rows - t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
    return torch.cat([t, pad])


def compute_shard(model: nn.Module, probes: ProbeSet, index: torch.Tensor, layer: LayerSpec, methods: Sequence[str],
                  targets_mode: str, batch_size: int, device: torch.device, faithfulness: bool,
                  output_transform: OutputTransform | None, reshape: ReshapeSpec) -> dict[str, torch.Tensor]:
    """CAM pass over ``probes[index]`` in chunks of ``batch_size`` on ``device``.

    Returns CPU tensors: ``maps`` (n, M, h, w) for the M methods, ``logits`` (n, classes),
    ``targets`` (n,), and when ``faithfulness``: ``y`` and ``o`` (n,) class probabilities on the
    image and on image x map.
    """
    parts: dict[str, list[torch.Tensor]] = {"maps": [], "logits": [], "targets": [], "y": [], "o": []}
    for start in range(0, len(index), batch_size):
        idx = index[start:start + batch_size]
        images = probes.images[idx].to(device, non_blocking=True)
        targets = probes.labels[idx].to(device) if targets_mode == "label" else None
        res = cam_pass(model, images, layer, targets, tuple(methods), output_transform=output_transform, reshape=reshape)
        maps = torch.stack([res.maps[m][:, 0] for m in methods], dim=1)
        parts["maps"].append(maps.cpu())
        parts["logits"].append(res.logits.cpu())
        parts["targets"].append(res.targets[:, 0].cpu())
        if faithfulness:
            y, o = masked_scores(model, images, maps[:, 0], res.targets[:, 0], output_transform=output_transform,
                                 logits=res.logits)
            parts["y"].append(y.cpu())
            parts["o"].append(o.cpu())
    return {k: torch.cat(v) for k, v in parts.items() if v}


def gather_shards(local: dict[str, torch.Tensor], n: int, world: int, gather: Gather | None) -> dict[str, torch.Tensor]:
    """Pad each rank's rows to the same count, all-gather, and restore probe order."""
    if world == 1 or gather is None:
        return local
    per_rank = math.ceil(n / world)
    return {k: unshard(gather(_pad_rows(v, per_rank)), n) for k, v in local.items()}


def probe_metrics(maps: torch.Tensor, probes: ProbeSet, prev: torch.Tensor | None, ref: torch.Tensor | None,
                  y: torch.Tensor | None, o: torch.Tensor | None, border_fraction: float) -> dict[str, torch.Tensor]:
    """Per-probe metric table (N,) for each name in :data:`PER_PROBE` that applies."""
    h, w = probes.image_size
    spur = probes.spurious_masks
    if spur is None:
        spur = M.border_mask(h, w, border_fraction).expand(len(probes), -1, -1)
    # Upsample once for every mask metric; the pointing tolerance still comes from the layer grid.
    up = upsample(maps, (h, w))
    tolerance = M.default_tolerance(tuple(maps.shape[-2:]), (h, w))
    out = {
        "spurious_energy": M.energy_fraction(up, spur),
        "spurious_enrichment": M.enrichment(up, spur),
        "pointing_spurious": M.pointing_game(up, spur, tolerance),
    }
    if probes.object_masks is not None:
        out["object_energy"] = M.energy_fraction(up, probes.object_masks)
    zeros = torch.zeros(len(probes))
    out["drift_prev"] = zeros.clone() if prev is None else 1.0 - M.spearman(maps, prev)
    out["drift_ref"] = zeros.clone() if ref is None else 1.0 - M.spearman(maps, ref)
    if y is not None and o is not None:
        out["average_drop"] = M.average_drop(y, o)
    return out


def quality_score(aggregates: dict[str, float]) -> float:
    """``cam/quality`` in [0, 1], higher is better: the mean of the available components
    ``1 - spurious_energy``, ``object_energy`` (with object masks) and ``1 - average_drop``."""
    parts = [1.0 - aggregates["cam/spurious_energy"]]
    if "cam/object_energy" in aggregates:
        parts.append(aggregates["cam/object_energy"])
    if "cam/average_drop" in aggregates:
        parts.append(1.0 - aggregates["cam/average_drop"])
    parts = [p for p in parts if not math.isnan(p)]
    return float(sum(parts) / len(parts)) if parts else float("nan")


def aggregate(per_probe: dict[str, torch.Tensor]) -> tuple[dict[str, float], int]:
    """NaN-aware means as ``cam/<name>`` and the number of degenerate probes (NaN spurious energy)."""
    agg = {f"cam/{k}": M.nanmean(v)[0] for k, v in per_probe.items()}
    degenerate = int(torch.isnan(per_probe["spurious_energy"]).sum())
    agg["cam/quality"] = quality_score(agg)
    agg["cam/degenerate"] = float(degenerate)
    return agg, degenerate


def evaluate(model: nn.Module, probes: ProbeSet, layer: LayerSpec, *, epoch: int, global_step: int,
             methods: Sequence[str] = ("gradcam",), targets_mode: str = "label", batch_size: int = 64,
             device: torch.device | None = None, previous: torch.Tensor | None = None,
             reference: torch.Tensor | None = None, faithfulness: bool = True, border_fraction: float = 0.1,
             output_transform: OutputTransform | None = None, reshape: ReshapeSpec = None,
             rank: int = 0, world: int = 1, gather: Gather | None = None) -> Evaluation:
    """Run one evaluation of ``model`` on ``probes``; metrics use the first of ``methods``."""
    device = device or next(model.parameters()).device
    index = shard_indices(len(probes), rank, world)
    local = compute_shard(model, probes, index, layer, methods, targets_mode, batch_size, device, faithfulness,
                          output_transform, reshape)
    full = gather_shards(local, len(probes), world, gather)
    bad = ~torch.isfinite(full["logits"]).all(1)
    if bad.any():
        raise NonFiniteOutputError(
            f"the model's logits are NaN or inf for probes {[probes.ids[i] for i in bad.nonzero()[:, 0].tolist()][:10]}; "
            "no maps were recorded for this evaluation")
    maps = full["maps"][:, 0].float()
    per_probe = probe_metrics(maps, probes, previous, reference, full.get("y"), full.get("o"), border_fraction)
    aggregates, degenerate = aggregate(per_probe)
    probs = full["logits"].float().softmax(1)
    return Evaluation(
        epoch=epoch, global_step=global_step, maps=maps, preds=probs.argmax(1),
        probs=probs.gather(1, full["targets"].long()[:, None])[:, 0], targets=full["targets"].long(),
        per_probe=per_probe, aggregates=aggregates, degenerate=degenerate,
        extra_maps={m: full["maps"][:, i].float() for i, m in enumerate(methods) if i > 0},
    )
