"""The monitor's time series: aggregate rows, per-probe series, the filmstrip ring buffer, the
previous maps and the reference, with a ``state_dict`` of CPU tensors and primitives.

Rows carry the logged metric names (``<prefix>/<metric>``); the per-probe series, the reference
and everything the rules read keep bare metric names. No Lightning, no I/O.
"""
from __future__ import annotations

from typing import Any

import torch

from .evaluation import PER_PROBE, Evaluation, Reference

FILMSTRIP_FRAMES = 8
STATE_VERSION = 2


class History:
    """Everything the monitor remembers between evaluations of one run.

    Args:
        prefix: metric prefix of the rows (``"cam"``, or ``"cam/<name>"`` for a named monitor).
        filmstrip_probes: the first N probes keep their maps of the last ``frames`` evaluations.
    """

    def __init__(self, prefix: str = "cam", filmstrip_probes: int = 4, frames: int = FILMSTRIP_FRAMES) -> None:
        self.prefix, self.filmstrip_probes, self.frames = prefix, filmstrip_probes, frames
        self.rows: list[dict[str, Any]] = []
        self.per_probe: dict[str, torch.Tensor] = {}  # metric -> (evaluations, probes)
        self.filmstrip_maps: torch.Tensor | None = None  # (<= frames, filmstrip probes, h, w)
        self.filmstrip_steps: list[int] = []
        self.previous_maps: torch.Tensor | None = None
        self.reference: Reference | None = None
        self.last: Evaluation | None = None

    def record(self, ev: Evaluation, stage: str, extra: dict[str, float]) -> dict[str, Any]:
        """Append one evaluation (its aggregates plus ``extra`` metrics); return the new row.

        The first evaluation becomes the reference unless one was set before.
        """
        metrics = {**ev.aggregates, **extra}
        row = {"epoch": ev.epoch, "global_step": ev.global_step, "stage": stage,
               **{f"{self.prefix}/{k}": float(v) for k, v in metrics.items()}}
        self.rows.append(row)
        for name in PER_PROBE:
            if name in ev.per_probe:
                new = ev.per_probe[name].float().cpu()[None]
                old = self.per_probe.get(name)
                self.per_probe[name] = new if old is None else torch.cat([old, new])
        if self.filmstrip_probes:
            frame = ev.maps[None, : self.filmstrip_probes]
            old = self.filmstrip_maps
            self.filmstrip_maps = (frame if old is None else torch.cat([old, frame]))[-self.frames:]
            self.filmstrip_steps = (self.filmstrip_steps + [ev.global_step])[-self.frames:]
        self.previous_maps = ev.maps
        if self.reference is None:
            self.reference = ev.as_reference()
        self.last = ev
        return row

    def snapshot(self) -> "History":
        """A copy that later evaluations do not change (tensors are replaced, never written in
        place, so they are shared; the lists are copied): what a background job reads."""
        copy = History(self.prefix, self.filmstrip_probes, self.frames)
        copy.rows, copy.per_probe = list(self.rows), dict(self.per_probe)
        copy.filmstrip_maps, copy.filmstrip_steps = self.filmstrip_maps, list(self.filmstrip_steps)
        copy.previous_maps, copy.reference, copy.last = self.previous_maps, self.reference, self.last
        return copy

    def start_from(self, ev: Evaluation) -> None:
        """Make ``ev`` (an evaluation not recorded as a row, e.g. before training) the reference and
        the previous maps."""
        self.reference = ev.as_reference()
        self.previous_maps = ev.maps

    def pin_reference(self) -> None:
        """Use the latest evaluation as the reference from now on."""
        if self.last is None:
            raise RuntimeError("pin_reference() needs at least one evaluation in this run")
        self.reference = self.last.as_reference()

    @property
    def steps(self) -> list[int]:
        return [int(r["global_step"]) for r in self.rows]

    def last_epoch(self, stage: str) -> int | None:
        """Epoch of the latest row of ``stage`` (None if there is none)."""
        return next((int(r["epoch"]) for r in reversed(self.rows) if r["stage"] == stage), None)

    def latest_metrics(self) -> dict[str, float]:
        """The latest row's metrics (logged names), empty before the first evaluation."""
        return {k: v for k, v in self.rows[-1].items() if k.startswith(self.prefix + "/")} if self.rows else {}

    def state_dict(self) -> dict[str, Any]:
        ref = self.reference
        return {
            "version": STATE_VERSION, "prefix": self.prefix,
            "rows": [dict(r) for r in self.rows],
            "per_probe": dict(self.per_probe),
            "filmstrip_maps": self.filmstrip_maps, "filmstrip_steps": list(self.filmstrip_steps),
            "previous_maps": self.previous_maps,
            "reference": None if ref is None else {"epoch": ref.epoch, "global_step": ref.global_step, "maps": ref.maps,
                                                   "per_probe": dict(ref.per_probe), "aggregates": dict(ref.aggregates)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"CAMMonitor history state version {state.get('version')!r} is not {STATE_VERSION}; "
                             "it was written by another cam_monitor version")
        if state["prefix"] != self.prefix:
            raise ValueError(f"this checkpoint's monitor logged under {state['prefix']!r}, this one under "
                             f"{self.prefix!r}: give the monitor the name it had")
        self.rows = [dict(r) for r in state["rows"]]
        self.per_probe = dict(state["per_probe"])
        self.filmstrip_maps = state["filmstrip_maps"]
        self.filmstrip_steps = [int(s) for s in state["filmstrip_steps"]]
        self.previous_maps = state["previous_maps"]
        r = state["reference"]
        self.reference = None if r is None else Reference(int(r["epoch"]), int(r["global_step"]), r["maps"],
                                                          dict(r["per_probe"]), dict(r["aggregates"]))
        self.last = None
