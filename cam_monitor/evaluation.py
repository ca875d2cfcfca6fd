"""One monitor evaluation: CAMs of the probe set in chunks, per-probe metrics and aggregates.

Lightning-free. What to compute is one :class:`EvalSettings`; where and how the model runs (its
device, the input conversion, the forward context, the process group) is one :class:`Placement`.
Under several processes every rank computes an equal-length shard of the probes, so every rank
runs the same number of forwards (the collectives of a sharded model such as FSDP pair up); the
shards are gathered and every rank computes identical metrics from the full set, so decisions
taken on them agree across ranks.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from torch import nn

from . import metrics as M
from .discovery import DiscoverySettings, discover, skill_p
from .evidence import EvidenceState, sign_test_p
from .engine import CAMResult, OutputTransform, cam_pass, class_scores, masked_scores
from .errors import NonFiniteOutputError
from .layers import LayerSpec, ReshapeSpec
from .layout import check_layout
from .maps import upsample
from .methods import check_methods
from .probes import ProbeSet
from .records import Evaluation, Reference

Gather = Callable[[torch.Tensor], torch.Tensor]

#: Per-probe metrics the monitor computes (keys of :attr:`Evaluation.per_probe`).
PER_PROBE = ("spurious_energy", "spurious_enrichment", "pointing_spurious", "object_energy", "object_enrichment",
             "drift_prev", "drift_ref", "spurious_energy_rise", "average_drop", "shortcut_flip")
TARGET_MODES = ("label", "pred")


@dataclass(frozen=True)
class EvalSettings:
    """What an evaluation computes; checked once, here.

    Args:
        layer: target layer (dotted name, module, or None for the last spatial layer).
        methods: CAM methods from the one pass; metrics use the first.
        targets: ``"label"`` explains the probe's class, ``"pred"`` the predicted class.
        batch_size: probes per CAM chunk (bounds device memory).
        faithfulness: also compute ``average_drop`` (one extra forward on image x map).
        border_fraction: width of the default spurious region for probes without spurious masks.
        output_transform: picks the logits from the model's output.
        reshape: ``(h, w)`` of a token layer whose grid is not square.
        layout: of a 4-D layer output, ``"auto"``, ``"nchw"`` or ``"nhwc"`` (channels-last).
        discovery: mask-free shortcut discovery and its paste confirmation (:mod:`discovery`).
    """

    layer: LayerSpec = None
    methods: tuple[str, ...] = ("gradcam",)
    targets: str = "label"
    batch_size: int = 64
    faithfulness: bool = True
    border_fraction: float = 0.1
    output_transform: OutputTransform | None = None
    reshape: ReshapeSpec = None
    layout: str = "auto"
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)

    def __post_init__(self) -> None:
        methods = (self.methods,) if isinstance(self.methods, str) else tuple(self.methods)
        object.__setattr__(self, "methods", check_methods(methods))
        if self.targets not in TARGET_MODES:
            raise ValueError(f"targets must be 'label' or 'pred', got {self.targets!r}")
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        check_layout(self.layout)
        if not 0 < self.border_fraction < 0.5:
            raise ValueError(f"border_fraction must be in (0, 0.5), got {self.border_fraction}")
        if self.reshape is not None and not callable(self.reshape):
            object.__setattr__(self, "reshape", tuple(self.reshape))

    def cam_pass(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None) -> CAMResult:
        """One CAM pass of ``images`` as these settings say (layer, methods, transform, reshape, layout)."""
        return cam_pass(model, images, self.layer, targets, self.methods, output_transform=self.output_transform,
                        reshape=self.reshape, layout=self.layout)


@dataclass(frozen=True)
class Placement:
    """Where and how the model runs: device, input conversion, forward context, process group.

    ``prepare`` maps a CPU probe batch to the model's input (device and dtype; default: move to
    ``device``). ``forward_context`` wraps every model call (e.g. the trainer's autocast), and
    nothing else: metrics are computed in float32 outside it. ``gather`` all-gathers a tensor
    across the ``world`` ranks (``(world, *shape)``).
    """

    device: torch.device | str = "cpu"
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None
    forward_context: Callable[[], ContextManager] = contextlib.nullcontext
    rank: int = 0
    world: int = 1
    gather: Gather | None = None

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        return self.prepare(images) if self.prepare is not None else images.to(self.device, non_blocking=True)


def shard_indices(n: int, rank: int, world: int) -> torch.Tensor:
    """Probe indices rank ``rank`` of ``world`` computes: rank, rank + world, ...

    Every rank gets ``ceil(n / world)`` indices (the tail wraps around to repeat probes), so every
    rank runs the same number of chunks; :func:`unshard` drops the repeats.
    """
    per_rank = math.ceil(n / world)
    return torch.arange(rank, per_rank * world, world).remainder(n)


def unshard(gathered: torch.Tensor, n: int) -> torch.Tensor:
    """Undo :func:`shard_indices`: (world, per_rank, ...) gathered rows -> (n, ...) in probe order."""
    world, per_rank = gathered.shape[:2]
    return gathered.transpose(0, 1).reshape(world * per_rank, *gathered.shape[2:])[:n]


def compute_shard(model: nn.Module, probes: ProbeSet, index: torch.Tensor, settings: EvalSettings,
                  placement: Placement) -> dict[str, torch.Tensor]:
    """CAM pass over ``probes[index]`` in chunks of ``settings.batch_size``.

    Returns CPU tensors: ``maps`` (n, M, h, w) for the M methods, ``logits`` (n, classes),
    ``targets`` (n,), and with ``faithfulness``: ``y`` and ``o`` (n,), class probabilities on the
    image and on image x map.
    """
    parts: dict[str, list[torch.Tensor]] = {"maps": [], "logits": [], "targets": [], "y": [], "o": []}
    methods = settings.methods
    for start in range(0, len(index), settings.batch_size):
        idx = index[start:start + settings.batch_size]
        images = placement.to_model(probes.images[idx])
        targets = probes.labels[idx] if settings.targets == "label" else None  # CPU: checked without a device sync
        with placement.forward_context():
            res = settings.cam_pass(model, images, targets)
            maps = torch.stack([res.maps[m][:, 0] for m in methods], dim=1)
            if settings.faithfulness:
                y, o = masked_scores(model, images, maps[:, 0], res.targets[:, 0],
                                     output_transform=settings.output_transform, logits=res.logits)
                parts["y"].append(y.float().cpu())
                parts["o"].append(o.float().cpu())
        parts["maps"].append(maps.float().cpu())
        parts["logits"].append(res.logits.float().cpu())
        parts["targets"].append(res.targets[:, 0].cpu())
    return {k: torch.cat(v) for k, v in parts.items() if v}


def gather_shards(local: dict[str, torch.Tensor], n: int, placement: Placement) -> dict[str, torch.Tensor]:
    """All-gather every rank's equal-length shard and restore probe order."""
    if placement.world == 1:
        return {k: v[:n] for k, v in local.items()}
    if placement.gather is None:
        raise ValueError(f"evaluating on {placement.world} ranks needs a gather function")
    return {k: unshard(placement.gather(v), n) for k, v in local.items()}


def probe_metrics(maps: torch.Tensor, probes: ProbeSet, previous: torch.Tensor | None, reference: Reference | None,
                  y: torch.Tensor | None, o: torch.Tensor | None, border_fraction: float) -> dict[str, torch.Tensor]:
    """Per-probe metric table (N,) for each name in :data:`PER_PROBE` that applies.

    Without a reference (this evaluation becomes it) drift and rise against it are 0. A probe
    without a spurious mask (none given, or an empty one) is measured against the default region,
    the border band; a probe with an empty object mask has no object energy (NaN).
    """
    spur = spurious_regions(probes, border_fraction)
    h, w = probes.image_size
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
        out["object_enrichment"] = M.enrichment(up, probes.object_masks)
    zeros = torch.zeros(len(probes))
    out["drift_prev"] = zeros.clone() if previous is None else 1.0 - M.spearman(maps, previous)
    out["drift_ref"] = zeros.clone() if reference is None else 1.0 - M.spearman(maps, reference.maps)
    out["spurious_energy_rise"] = (zeros.clone() if reference is None
                                   else out["spurious_energy"] - reference.per_probe["spurious_energy"])
    if y is not None and o is not None:  # an all-zero map explains nothing: image x map measures no explanation
        out["average_drop"] = M.average_drop(y, o).masked_fill(maps.flatten(1).amax(1) <= 0, float("nan"))
    return out


def spurious_regions(probes: ProbeSet, border_fraction: float) -> torch.Tensor:
    """(N, H, W) spurious region per probe: its mask, or the border band where it has none (or an empty one)."""
    h, w = probes.image_size
    border = M.border_mask(h, w, border_fraction)
    masks = probes.spurious_masks
    if masks is None:
        return border.expand(len(probes), -1, -1)
    empty = ~probes.marked
    return torch.where(empty[:, None, None], border, masks) if empty.any() else masks


def quality_score(aggregates: dict[str, float]) -> float:
    """``quality`` in [0, 1], higher is better: the mean of the available components
    ``1 - spurious_energy``, ``object_energy`` (with object masks) and ``1 - average_drop``. Every
    component rests on the maps and is NaN for a probe whose map is all zero, so ``quality`` is NaN
    (and a gate on it fails) when every map is degenerate, never a score of nothing."""
    parts = [1.0 - aggregates["spurious_energy"]]
    if "object_energy" in aggregates:
        parts.append(aggregates["object_energy"])
    if "average_drop" in aggregates:
        parts.append(1.0 - aggregates["average_drop"])
    parts = [p for p in parts if not math.isnan(p)]
    return float(sum(parts) / len(parts)) if parts else float("nan")


def aggregate(per_probe: dict[str, torch.Tensor], maps: torch.Tensor, probes: ProbeSet) -> dict[str, float]:
    """NaN-aware means by metric name, ``quality``, ``degenerate``: the probes whose map is all zero
    (no evidence anywhere; their ratio metrics are NaN and left out of the means),
    ``spurious_masked``: the probes measured against a spurious mask of their own (not the border
    band), and where there are any, ``spurious_rise_p`` (:func:`rise_sign_p`)."""
    agg = {k: M.nanmean(v)[0] for k, v in per_probe.items() if k != "shortcut_flip"}
    agg["quality"] = quality_score(agg)
    agg["degenerate"] = float((maps.flatten(1).amax(1) <= 0).sum())
    own = probes.marked
    agg["spurious_masked"] = 0.0 if own is None else float(own.sum())
    if own is not None and own.any():
        agg["spurious_rise_p"] = rise_sign_p(per_probe["spurious_energy_rise"][own])
    return agg


def rise_sign_p(rise: torch.Tensor) -> float:
    """The exact one-sided sign test that the energy on the probes' own spurious masks rose since
    the reference on more probes than it fell (``rise``: per probe; no change and NaN do not
    count): small where the maps moved onto the marked regions across the probe set, not where a
    few probes' maps did while the rest moved off, as a mean rise cannot tell. 1.0 before there is
    a reference (no probe changed)."""
    return sign_test_p(int((rise > 0).sum()), int((rise < 0).sum()))


def probe_classes(probes: ProbeSet) -> tuple[int, ...]:
    """The classes of the probe set: fixed for a run, so the evidence's mixture over per-class streams is too."""
    return tuple(sorted(set(probes.labels.tolist())))


def sharded_scores(model: nn.Module, settings: EvalSettings, placement: Placement) -> Callable[[torch.Tensor], torch.Tensor]:
    """Score a CPU batch with ``model`` in chunks, each rank an equal-length shard (every rank
    runs the same forwards, so a sharded model's collectives pair up); returns (B, K) CPU class
    scores (:func:`~cam_monitor.engine.class_scores`)."""
    def scores(images: torch.Tensor) -> torch.Tensor:
        index = shard_indices(len(images), placement.rank, placement.world)
        parts = []
        for start in range(0, len(index), settings.batch_size):
            batch = placement.to_model(images[index[start:start + settings.batch_size]])
            with placement.forward_context():
                parts.append(class_scores(model, batch, settings.output_transform).cpu())
        return gather_shards({"scores": torch.cat(parts)}, len(images), placement)["scores"]

    return scores


def evaluate(model: nn.Module, probes: ProbeSet, settings: EvalSettings, placement: Placement | None = None, *,
             epoch: int = 0, global_step: int = 0, previous: torch.Tensor | None = None,
             reference: Reference | None = None, evidence: EvidenceState | None = None) -> Evaluation:
    """Run one evaluation of ``model`` on ``probes``; metrics use the first of ``settings.methods``.

    ``previous`` are the last evaluation's maps (for ``drift_prev``), ``reference`` the evaluation
    drift and rise are measured against, ``evidence`` the shortcut evidence accumulated so far
    (the result carries it updated, and its value as ``shortcut_evidence``). ``skill_p`` says how
    likely a model at chance scores the probes as well (:func:`~cam_monitor.discovery.skill_p`):
    the rules judge no maps until it is small.
    """
    placement = placement or Placement(device=next(model.parameters()).device)
    index = shard_indices(len(probes), placement.rank, placement.world)
    local = compute_shard(model, probes, index, settings, placement)
    full = gather_shards(local, len(probes), placement)
    bad = ~torch.isfinite(full["logits"]).all(1)
    if bad.any():
        raise NonFiniteOutputError(
            f"the model's logits are NaN or inf for probes {[probes.ids[i] for i in bad.nonzero()[:, 0].tolist()][:10]}; "
            "no maps were recorded for this evaluation")
    maps = full["maps"][:, 0]
    per_probe = probe_metrics(maps, probes, previous, reference, full.get("y"), full.get("o"), settings.border_fraction)
    probs = full["logits"].softmax(1)
    preds, targets = probs.argmax(1), full["targets"].long()
    found, accumulated = None, None
    found_settings = settings.discovery
    if found_settings.enabled:
        prior = evidence or EvidenceState.capped(found_settings.alpha)
        per_class = found_settings.per_class
        found = discover(maps, probes, targets, preds, sharded_scores(model, settings, placement), found_settings,
                         step=global_step, evidence=prior)
        per_probe.update(found.per_probe(len(probes)))
        accumulated = prior.update(found.diffs(by_class=per_class), found_settings.bets, found_settings.margins,
                                   pool=found.arms)
    aggregates = aggregate(per_probe, maps, probes)
    aggregates["skill_p"] = skill_p(targets, preds)
    if found is not None and accumulated is not None:
        aggregates.update(found.aggregates())
        classes = probe_classes(probes) if found_settings.per_class else ()
        aggregates["shortcut_evidence"] = accumulated.value(found.arms, classes)
    return Evaluation(epoch=epoch, global_step=global_step, maps=maps, preds=preds,
                      probs=probs.gather(1, targets[:, None])[:, 0], per_probe=per_probe,
                      aggregates=aggregates, discovery=found, evidence=accumulated)
