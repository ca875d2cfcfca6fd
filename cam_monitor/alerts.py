"""Alert rules and their small state machine (patience and hysteresis), saved in checkpoints.

A rule looks at one evaluation's aggregates (and the reference evaluation's) and says one of
three things: ``fire`` (the condition holds), ``clear`` (safely past the threshold, by the
hysteresis margin) or ``hold`` (in between, or undefined because the metric is NaN). A rule
fires after ``patience`` consecutive ``fire`` evaluations and stays active until ``clear``, so a
metric hovering at its threshold does not flap. Pure Python: no Lightning, no I/O.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

FIRE, CLEAR, HOLD = "fire", "clear", "hold"
ACTIONS = ("log", "warn", "stop", "raise")


@dataclass(frozen=True)
class AlertThresholds:
    """Thresholds of the built-in rules (defaults documented in the README's alert table)."""

    spurious_enrichment: float = 4.0
    spurious_energy_rise: float = 0.15
    object_energy_floor: float = 0.3
    drift_ref: float = 0.5
    patience: int = 1
    hysteresis: float = 0.1

    def __post_init__(self) -> None:
        checks = {
            "spurious_enrichment": self.spurious_enrichment > 0,
            "spurious_energy_rise": 0 < self.spurious_energy_rise <= 1,
            "object_energy_floor": 0 <= self.object_energy_floor <= 1,
            "drift_ref": 0 < self.drift_ref <= 2,
            "patience": isinstance(self.patience, int) and self.patience >= 1,
            "hysteresis": 0 <= self.hysteresis < 1,
        }
        ranges = {"spurious_enrichment": "> 0", "spurious_energy_rise": "in (0, 1]", "object_energy_floor": "in [0, 1]",
                  "drift_ref": "in (0, 2] (drift is 1 - Spearman rho)", "patience": "an int >= 1", "hysteresis": "in [0, 1)"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"alert threshold {name}={getattr(self, name)!r} must be {ranges[name]}")


def _above(value: float, threshold: float, hysteresis: float) -> str:
    if math.isnan(value):
        return HOLD
    if value > threshold:
        return FIRE
    return CLEAR if value <= threshold - hysteresis * abs(threshold) else HOLD


def _below(value: float, threshold: float, hysteresis: float) -> str:
    if math.isnan(value):
        return HOLD
    if value < threshold:
        return FIRE
    return CLEAR if value >= threshold + hysteresis * abs(threshold) else HOLD


def _offenders(ids: list[str], values: torch.Tensor | None, test: Callable[[torch.Tensor], torch.Tensor],
               descending: bool = True, limit: int = 10) -> list[str]:
    """Ids of the probes whose own value breaks the rule, worst first (at most ``limit``)."""
    if values is None:
        return []
    bad = (test(values) & ~torch.isnan(values)).nonzero()[:, 0]
    order = values[bad].argsort(descending=descending, stable=True)
    return [ids[i] for i in bad[order].tolist()][:limit]


@dataclass
class Check:
    """One rule's verdict on one evaluation."""

    rule: str
    metric: str
    value: float
    threshold: float
    level: str
    probe_ids: list[str]


def check_rules(agg: dict[str, float], ref: dict[str, float] | None, per_probe: dict[str, torch.Tensor],
                ref_per_probe: dict[str, torch.Tensor] | None, ids: list[str], t: AlertThresholds) -> list[Check]:
    """Evaluate every built-in rule that applies to these metrics.

    ``ref`` / ``ref_per_probe`` are the reference evaluation's aggregates and per-probe values
    (None before there is one); rules that compare with the reference are skipped until then.
    """
    h = t.hysteresis
    checks = []
    enr = agg["cam/spurious_enrichment"]
    checks.append(Check("spurious_enrichment", "cam/spurious_enrichment", enr, t.spurious_enrichment,
                        _above(enr, t.spurious_enrichment, h),
                        _offenders(ids, per_probe.get("spurious_enrichment"), lambda v: v > t.spurious_enrichment)))
    if ref is not None:
        rise = agg["cam/spurious_energy"] - ref["cam/spurious_energy"]
        probe_rise = None
        if ref_per_probe is not None and "spurious_energy" in ref_per_probe:
            probe_rise = per_probe["spurious_energy"] - ref_per_probe["spurious_energy"]
        checks.append(Check("spurious_energy_rise", "cam/spurious_energy", rise, t.spurious_energy_rise,
                            _above(rise, t.spurious_energy_rise, h),
                            _offenders(ids, probe_rise, lambda v: v > t.spurious_energy_rise)))
    if "cam/object_energy" in agg:
        obj = agg["cam/object_energy"]
        checks.append(Check("object_energy_floor", "cam/object_energy", obj, t.object_energy_floor,
                            _below(obj, t.object_energy_floor, h),
                            _offenders(ids, per_probe.get("object_energy"), lambda v: v < t.object_energy_floor,
                                       descending=False)))
    if ref is not None:
        drift = agg["cam/drift_ref"]
        level = _above(drift, t.drift_ref, h)
        if "cam/object_energy" in agg:
            moved_out = agg["cam/object_energy"] < ref["cam/object_energy"]
        else:
            moved_out = agg["cam/spurious_energy"] > ref["cam/spurious_energy"]
        if level == FIRE and not moved_out:
            level = HOLD
        checks.append(Check("drift_off_object", "cam/drift_ref", drift, t.drift_ref, level,
                            _offenders(ids, per_probe.get("drift_ref"), lambda v: v > t.drift_ref)))
    return checks


class AlertBook:
    """Patience/hysteresis state per rule; turns :class:`Check` verdicts into fire/clear events."""

    def __init__(self, patience: int = 1) -> None:
        self.patience = patience
        self.count: dict[str, int] = {}
        self.active: dict[str, bool] = {}

    def update(self, checks: list[Check], epoch: int, global_step: int) -> list[dict[str, Any]]:
        """Advance the state with one evaluation; return the events (``event`` = fired/cleared)."""
        events = []
        for c in checks:
            active = self.active.get(c.rule, False)
            count = self.count.get(c.rule, 0) + 1 if c.level == FIRE else 0
            self.count[c.rule] = count
            event = None
            if not active and count >= self.patience:
                self.active[c.rule], event = True, "fired"
            elif active and c.level == CLEAR:
                self.active[c.rule], event = False, "cleared"
            if event:
                events.append({"event": event, "epoch": epoch, "global_step": global_step, "rule": c.rule,
                               "metric": c.metric, "value": float(c.value), "threshold": float(c.threshold),
                               "probe_ids": list(c.probe_ids)})
        return events

    @property
    def n_active(self) -> int:
        return sum(self.active.values())

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "count": dict(self.count), "active": dict(self.active)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.patience = int(state["patience"])
        self.count = {str(k): int(v) for k, v in state["count"].items()}
        self.active = {str(k): bool(v) for k, v in state["active"].items()}


def resolve_action(action: str) -> str | Callable[[dict[str, Any]], Any]:
    """Validate an alert action: one of :data:`ACTIONS` or an import path ``pkg.module:function``.

    Import paths are resolved with importlib (never ``eval``); the target must be callable.
    """
    if action in ACTIONS:
        return action
    if not isinstance(action, str) or not action.strip():
        raise ValueError(f"alert action must be one of {ACTIONS} or 'package.module:function', got {action!r}")
    module_name, sep, attr = action.partition(":")
    if not sep:
        module_name, _, attr = action.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"alert action {action!r} is neither one of {ACTIONS} nor an import path 'package.module:function'")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"alert action {action!r}: cannot import it ({err})") from err
    if not callable(target):
        raise ValueError(f"alert action {action!r} is not callable")
    return target
