"""The plain records every layer of the monitor passes upward: what one evaluation measured
(:class:`Evaluation`, and the :class:`Reference` it is compared with), the pictures of one
evaluation (:class:`Panel`), one alert (:class:`Alert`, and :class:`AlertEvent`, an alert that
fired or cleared) and one shortcut region discovery confirmed (:class:`ShortcutRegion`).

Alerts and regions are typed dictionaries: they are written to ``alerts.jsonl`` and handed to a
user's alert action as they are, so they stay plain JSON. No Lightning, no I/O; nothing here
imports the rest of the package at run time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Sequence, TypedDict

import torch

if TYPE_CHECKING:
    from .discovery import Discovery
    from .evidence import EvidenceState

try:
    from typing import NotRequired
except ImportError:  # Python < 3.11
    from typing_extensions import NotRequired


#: One class's confirmed shortcut candidates of one test in one evaluation: the ``test`` that
#: found them (``local``: the paste test's boxes; ``recurring`` or ``marked``: the pixels that test
#: carried, boxed), its flips against their controls' (and the rates), the mean paired ``outcome``
#: its evidence bet on (the flip excess; for the recurring test the graded gain in the class's
#: probability, :func:`~cam_monitor.discovery.settings.graded`; files written before it lack it),
#: the probes tested and each one's box (``[y0, x0, y1, x1]`` image pixels, half-open). Spelled as a
#: call because ``class`` is one of its keys.
ShortcutRegion = TypedDict("ShortcutRegion", {
    "class": int, "test": str, "flips": int, "control_flips": int, "tests": int, "flip_rate": float,
    "control_rate": float, "outcome": NotRequired[float], "probe_ids": list[str], "boxes": list[list[int]],
    "class_name": NotRequired[str]})


class Alert(TypedDict):
    """A fired alert as the monitor keeps it (``monitor.alerts``) and hands it to an alert action:
    the rule, the logged metric (``<prefix>/<metric>``) with its value and threshold, when, and the
    worst probes; for an alert on the discovered shortcut, ``regions`` and ``evidence_by_test``
    (each confirmation arm's own evidence, ``local``, ``global``, ``border``: which kind of cue it is)."""

    epoch: int
    global_step: int
    rule: str
    metric: str
    value: float
    threshold: float
    probe_ids: list[str]
    regions: NotRequired[list[ShortcutRegion]]
    evidence_by_test: NotRequired[dict[str, float]]


class AlertEvent(Alert):
    """An alert that ``fired`` or ``cleared`` at one evaluation: one line of ``alerts.jsonl``, and
    what the sinks draw."""

    event: Literal["fired", "cleared"]


def alert_of(event: AlertEvent) -> Alert:
    """The alert an event carries (the event without its ``event`` key)."""
    return {k: v for k, v in event.items() if k != "event"}  # type: ignore[return-value]


@dataclass
class Reference:
    """The evaluation drift and the reference rules compare with (CPU tensors, bare metric names)."""

    epoch: int
    global_step: int
    maps: torch.Tensor
    per_probe: dict[str, torch.Tensor]
    aggregates: dict[str, float]


@dataclass
class Evaluation:
    """What one evaluation measured. Tensors are on the CPU; ``maps`` are raw (N, h, w) of the
    first method; ``probs`` the softmax probability of each probe's target class; metric names
    in ``per_probe`` and ``aggregates`` are bare (``spurious_energy``)."""

    epoch: int
    global_step: int
    maps: torch.Tensor
    preds: torch.Tensor
    probs: torch.Tensor
    per_probe: dict[str, torch.Tensor]
    aggregates: dict[str, float] = field(default_factory=dict)
    discovery: Discovery | None = None
    evidence: EvidenceState | None = None

    def as_reference(self) -> Reference:
        return Reference(self.epoch, self.global_step, self.maps, dict(self.per_probe), dict(self.aggregates))



@dataclass
class Panel:
    """The pictures of one evaluation: the probe grid, per-probe tiles, the trends figure (None when
    no sink needs it) and the filmstrip (first probes over the last evaluations); ``ids``/``labels``
    of the tiled probes; ``curves``: this evaluation's value of each curve metric per followed probe
    (``{metric: {probe_id: value}}``, NaN left out), the numbers dashboards plot themselves;
    ``overlays``: the tiled probes' heatmap overlays without contours or captions, and ``masks``
    (``spurious``, ``object``, ``inferred``: (N, H, W) bool at the overlays' size), for dashboards
    that draw masks as overlays the user can toggle (W&B)."""

    grid: torch.Tensor
    tiles: torch.Tensor
    trends: torch.Tensor | None
    ids: Sequence[str]
    labels: Sequence[int]
    filmstrip: torch.Tensor | None = None
    curves: dict[str, dict[str, float]] = field(default_factory=dict)
    overlays: torch.Tensor | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def extra_images(self) -> dict[str, torch.Tensor]:
        """The optional pictures that exist for this evaluation, by tag."""
        return {tag: img for tag, img in (("trends", self.trends), ("filmstrip", self.filmstrip)) if img is not None}


