"""Alert rules as a table of small rule objects, and their state machine (patience, hysteresis).

A :class:`Rule` watches one metric of an evaluation (a bare name such as ``spurious_enrichment``;
every value a rule reads is a metric the monitor also logs, so an alert line's ``metric`` and
``value`` are exactly what its dashboard shows). On each evaluation a rule says ``fire`` (past
its threshold), ``clear`` (safely back, by the hysteresis margin) or ``hold`` (in between, or the
metric is NaN). :class:`AlertBook` fires a rule after ``patience`` consecutive ``fire`` verdicts and
keeps it active until ``clear``, so a metric hovering at its threshold does not flap.
Pure Python: no Lightning, no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import torch

from .discovery import LOCAL, TEST_NAMES, skilled
from .evidence import ALL
from .imports import import_callable
from .records import Alert, AlertEvent, ShortcutRegion

FIRE, CLEAR, HOLD = "fire", "clear", "hold"
ACTIONS = ("log", "warn", "stop", "raise")
Direction = Literal["above", "below"]
#: ``guard(aggregates, reference_aggregates)``: an extra condition a rule needs to fire.
Guard = Callable[[dict[str, float], dict[str, float]], bool]


@dataclass(frozen=True)
class Rule:
    """One alert rule: ``metric`` compared with ``threshold`` in ``direction``.

    ``needs_reference`` rules are skipped until a reference evaluation exists; ``guard`` (given
    this evaluation's and the reference's aggregates) must also hold for the rule to fire.
    A built-in rule also carries the setting that sets its threshold (``setting``, a field of
    its settings ``group``, :class:`~cam_monitor.settings.AlertSettings` for all but one), its valid
    range (``valid`` in words, ``accepts`` as a check) and, where an alert names its probes by
    another per-probe series than its metric, that series and the level they must pass
    (``offenders_from``).
    """

    name: str
    metric: str
    direction: Direction
    threshold: float
    needs_reference: bool = False
    guard: Guard | None = None
    clear_at: float | None = None
    setting: str | None = None
    group: str | None = None
    valid: str | None = None
    accepts: Callable[[float], bool] | None = None
    offenders_from: tuple[str, float] | None = None

    def check(self, value: Any) -> None:
        """Refuse ``value`` for the setting behind this rule when it is outside the valid range
        (``None`` is accepted: an opt-in rule left off)."""
        if value is None or self.accepts is None:
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not self.accepts(value):
            raise ValueError(f"{self.group}: {self.setting}={value!r} (threshold of alert rule {self.name}) must be "
                             f"{self.valid}")

    def level(self, value: float, hysteresis: float) -> str:
        """``fire``, ``clear`` or ``hold`` for ``value`` (NaN holds). The clear level is
        ``clear_at`` where the rule has one, else the threshold less the hysteresis margin."""
        if math.isnan(value):
            return HOLD
        if self.clear_at is not None:
            above = self.direction == "above"
            margin = (self.threshold - self.clear_at) if above else (self.clear_at - self.threshold)
            return self.level_with_margin(value, margin)
        return self.level_with_margin(value, hysteresis * abs(self.threshold))

    def level_with_margin(self, value: float, margin: float) -> str:
        """``fire`` past the threshold, ``clear`` back by ``margin`` or more, ``hold`` between."""
        if self.direction == "above":
            return FIRE if value > self.threshold else CLEAR if value <= self.threshold - margin else HOLD
        return FIRE if value < self.threshold else CLEAR if value >= self.threshold + margin else HOLD

    def offenders(self, values: torch.Tensor | None, ids: list[str], limit: int = 10,
                  threshold: float | None = None) -> list[str]:
        """Ids of the probes whose own value is past ``threshold`` (default: the rule's), worst
        first (at most ``limit``)."""
        if values is None:
            return []
        threshold = self.threshold if threshold is None else threshold
        past = values > threshold if self.direction == "above" else values < threshold
        bad = (past & ~torch.isnan(values)).nonzero()[:, 0]
        order = values[bad].argsort(descending=self.direction == "above", stable=True)
        return [ids[i] for i in bad[order].tolist()][:limit]


#: How unlikely, by chance, the energy on the user's spurious masks must have risen on as many of the
#: probes as it did (``spurious_rise_p``) for drift without object masks to count as moving onto them.
MOVED_ONTO_MARKS_LEVEL = 1e-3
#: The share of the maps' energy that counts as a move since the reference: ``spurious_energy_rise``'s
#: default rise onto spurious regions.
MOVED_SHARE = 0.15
#: How much of the maps' energy must have left the user's object masks since the reference
#: (``object_energy``) for drift to count as moving off the object: the same share as a rise.
MOVED_OFF_OBJECT_FALL = MOVED_SHARE


def _moved_off_object(agg: dict[str, float], ref: dict[str, float]) -> bool:
    """Drift counts only when the maps moved away from the object, or, without object masks, onto
    the spurious regions the user outlined: a model learning to look *at* the object drifts too,
    and that is good. Off the object means the object energy fell by :data:`MOVED_OFF_OBJECT_FALL`
    or more: any fall fired on 4 of 175 zoo control runs given the object masks, whose maps
    sharpened as they learned (the energy on the object fell 0.0001 to 0.044; the reference,
    "Alerts"). Onto the marks means on most probes, by a sign test at
    :data:`MOVED_ONTO_MARKS_LEVEL` (``spurious_rise_p``): a mean rise above 0 fired on zoo control
    runs given the true cue masks where the energy had risen on 33 probes of 64 and fallen on 31
    (the reference, "Alerts"). With no mask at all nothing says where the object is, so the rule
    holds (the border-band stand-in rose on 8 of 518 control runs whose maps drifted while they
    learned the digits: a rate nothing states; ``shortcut_confirmed`` judges mask-free runs)."""
    if "object_energy" in agg and "object_energy" in ref:
        return agg["object_energy"] <= ref["object_energy"] - MOVED_OFF_OBJECT_FALL
    return agg.get("spurious_rise_p", 1.0) <= MOVED_ONTO_MARKS_LEVEL  # logged only where the user gave masks


def _user_masks(agg: dict[str, float], ref: dict[str, float]) -> bool:
    """The enrichment rule judges regions the user outlined: the border band stand-in cannot reach
    its threshold (its enrichment ceiling is 1 / band area, 2.8 for the default band); mask-free,
    the ``shortcut_confirmed`` rule finds the region instead."""
    return agg.get("spurious_masked", 0.0) > 0


#: The built-in rules (docs/reference.md, "Alerts"), each defined once here, at its default threshold.
RULES: tuple[Rule, ...] = (
    Rule("spurious_enrichment", "spurious_enrichment", "above", 4.0, guard=_user_masks,
         setting="spurious_enrichment", group="AlertSettings", valid="> 0",
         accepts=lambda v: v > 0),
    Rule("spurious_energy_rise", "spurious_energy_rise", "above", MOVED_SHARE, needs_reference=True,
         setting="spurious_energy_rise", group="AlertSettings", valid="in (0, 1]",
         accepts=lambda v: 0 < v <= 1),
    Rule("object_enrichment_floor", "object_enrichment", "below", 0.5,
         setting="object_enrichment_floor", group="AlertSettings",
         valid="in [0, 1] (1.0 = chance)", accepts=lambda v: 0 <= v <= 1),
    Rule("drift_off_object", "drift_ref", "above", 0.5, needs_reference=True, guard=_moved_off_object,
         setting="drift_threshold", group="AlertSettings",
         valid="in (0, 2] (drift is 1 - Spearman rho)", accepts=lambda v: 0 < v <= 2),
    Rule("shortcut_confirmed", "shortcut_evidence", "above", 1e3, clear_at=1.0,
         setting="alpha", group="DiscoverySettings", valid="in (0, 1)", accepts=lambda v: 0 < v < 1,
         offenders_from=("shortcut_flip", 0.0)),
    Rule("object_energy_floor", "object_energy", "below", math.nan,
         setting="object_energy_floor", group="AlertSettings", valid="in [0, 1]",
         accepts=lambda v: 0 <= v <= 1),
)
#: The rule whose threshold is ``1 / alpha`` of discovery's false-alarm rate (DiscoverySettings' ``alpha``).
SHORTCUT_RULE = "shortcut_confirmed"


def default_rules(spurious_enrichment: float = 4.0, spurious_energy_rise: float = 0.15,
                  object_enrichment_floor: float = 0.5, drift_threshold: float = 0.5,
                  shortcut_alpha: float = 1e-3, object_energy_floor: float | None = None) -> tuple[Rule, ...]:
    """The built-in :data:`RULES` at these thresholds, each checked against its valid range.

    ``shortcut_confirmed`` fires when the accumulated shortcut evidence (an e-detector,
    :mod:`evidence`) reaches ``1 / shortcut_alpha`` and clears when it is back at 1 (no net
    evidence left). Object evidence is judged relative to chance (``object_enrichment``: energy
    share / area share), so a small object and a large one are judged alike and diffuse maps
    (enrichment near 1) never fire; the absolute ``object_energy_floor`` is opt-in (None: off).
    """
    given = {"spurious_enrichment": spurious_enrichment, "spurious_energy_rise": spurious_energy_rise,
             "object_enrichment_floor": object_enrichment_floor, "drift_threshold": drift_threshold,
             "object_energy_floor": object_energy_floor}
    rules = []
    for rule in RULES:
        value = shortcut_alpha if rule.group == "DiscoverySettings" else given[rule.setting]
        rule.check(value)
        if value is not None:
            rules.append(replace(rule, threshold=1 / value if rule.name == SHORTCUT_RULE else float(value)))
    return tuple(rules)


def rule_threshold(rules: tuple[Rule, ...], name: str) -> float:
    """The threshold of the rule called ``name``."""
    return next(r.threshold for r in rules if r.name == name)


@dataclass
class Check:
    """One rule's verdict on one evaluation."""

    rule: str
    metric: str
    value: float
    threshold: float
    level: str
    probe_ids: list[str]
    regions: list[ShortcutRegion] | None = None
    evidence_by_test: dict[str, float] | None = None


def at_chance(agg: dict[str, float], skill_level: float) -> bool:
    """Whether this evaluation's model does not beat chance on the probes: its ``skill_p``
    (:func:`~cam_monitor.discovery.skill_p`) fails :func:`~cam_monitor.discovery.skilled` at
    ``skill_level`` (1.0: never at chance). An evaluation without a ``skill_p`` counts as skilled."""
    return not skilled(agg.get("skill_p", 0.0), skill_level)


def check_rules(rules: tuple[Rule, ...], agg: dict[str, float], per_probe: dict[str, torch.Tensor], ids: list[str],
                reference: dict[str, float] | None, hysteresis: float = 0.1,
                regions: dict[str, list[ShortcutRegion]] | None = None,
                evidence_by_test: dict[str, dict[str, float]] | None = None,
                skill_level: float = 1.0) -> list[Check]:
    """Every rule whose metric this evaluation has (and whose reference exists), judged.

    ``agg`` and ``per_probe`` are keyed by bare metric names; ``reference`` is the reference
    evaluation's aggregates, or None before there is one; ``regions`` maps a metric to the regions
    an alert on it describes (the discovered shortcut regions), ``evidence_by_test`` to the evidence
    of each test behind it (the discovery arms'). Every rule holds (neither fires nor clears) while
    the model is :func:`at_chance` at ``skill_level``: its maps explain no decision yet (a freshly
    initialised model's maps put 7.1 times a control's corner stamp's area share on it), so they are no evidence
    of what it uses, nor that it stopped.
    """
    if not 0 <= hysteresis < 1:
        raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis!r}")
    if not 0 < skill_level <= 1:
        raise ValueError(f"skill_level must be in (0, 1], got {skill_level!r}")
    unskilled = at_chance(agg, skill_level)
    checks = []
    for rule in rules:
        if rule.metric not in agg or (rule.needs_reference and reference is None):
            continue
        value = agg[rule.metric]
        level = HOLD if unskilled else rule.level(value, hysteresis)
        if level == FIRE and rule.guard is not None and not rule.guard(agg, reference or {}):
            level = HOLD
        series, past = rule.offenders_from or (rule.metric, None)
        offenders = rule.offenders(per_probe.get(series), ids, threshold=past)
        checks.append(Check(rule.name, rule.metric, value, rule.threshold, level, offenders,
                            (regions or {}).get(rule.metric), (evidence_by_test or {}).get(rule.metric)))
    return checks


class AlertBook:
    """Patience/hysteresis state per rule; turns :class:`Check` verdicts into fired/cleared events."""

    def __init__(self, patience: int = 1) -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        self.patience = patience
        self.count: dict[str, int] = {}
        self.active: dict[str, bool] = {}

    def update(self, checks: list[Check], epoch: int, global_step: int, prefix: str = "cam") -> list[AlertEvent]:
        """Advance the state with one evaluation; return the events (``event`` = fired/cleared).

        An event's ``metric`` is the logged name, ``<prefix>/<metric>``.
        """
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
                               "metric": f"{prefix}/{c.metric}", "value": float(c.value),
                               "threshold": float(c.threshold), "probe_ids": list(c.probe_ids)})
                if c.regions is not None and event == "fired":
                    events[-1]["regions"] = [dict(r) for r in c.regions]
                if c.evidence_by_test is not None and event == "fired":
                    events[-1]["evidence_by_test"] = dict(c.evidence_by_test)
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


def describe_alert(alert: Alert) -> str:
    """The one-line sentence for an alert, as warnings, logs and W&B alerts show it."""
    probes = ", ".join(alert["probe_ids"][:5]) or "-"
    text = (f"{alert['rule']} ({alert['metric']} = {alert['value']:.4g}, threshold {alert['threshold']:.4g}) "
            f"at epoch {alert['epoch']}, step {alert['global_step']}; probes: {probes}")
    strongest = strongest_test(alert)
    if strongest:
        text += f"; strongest test: {strongest}"
    regions = [r for r in alert.get("regions", []) if _for_cue(r)][:3]
    if regions:
        text += "; regions: " + "; ".join(
            f"class {r.get('class_name', r['class'])}{_found_by(r)} at box (y0, x0, y1, x1) {tuple(r['boxes'][0])} "
            f"flips {r['flips']}/{r['tests']} vs control {r['control_flips']}/{r['tests']}, "
            f"mean outcome {_outcome(r):+.2f}" for r in regions)
    return text


def _outcome(region: ShortcutRegion) -> float:
    """The region's mean paired outcome; its flip excess in files written before regions kept it."""
    return region.get("outcome", region["flip_rate"] - region["control_rate"])


def _for_cue(region: ShortcutRegion) -> bool:
    """Whether a region's pairs were, on balance, for a cue (its mean paired outcome above 0): a
    recurring test's graded pairs can be without a single flip more than their controls."""
    return _outcome(region) > 0


def _found_by(region: ShortcutRegion) -> str:
    """`` (recurring test)`` for a region a mark test found; nothing for the local test's boxes,
    which every region was before the mark tests had regions (and files written then lack the key)."""
    test = region.get("test", LOCAL)
    return "" if test == LOCAL else f" ({test} test)"


def strongest_test(alert: Alert) -> str | None:
    """The confirmation test with the most evidence behind a shortcut alert, in words with its
    evidence (``the border band (band swap), evidence 4.5e+04``), and every test's pairs together
    where the alert has them (a cue several tests see a little can cross on those alone); None for
    other alerts."""
    tests = alert.get("evidence_by_test")
    arms = [a for a in tests or {} if a != ALL]
    if not arms:
        return None
    arm = max(arms, key=lambda a: tests[a])
    text = f"{TEST_NAMES.get(arm, arm)}, evidence {tests[arm]:.3g}"
    return text if ALL not in tests else text + f" (every test together {tests[ALL]:.3g})"


def describe_alert_markdown(event: AlertEvent) -> str:
    """An alert event (fired or cleared) as Markdown for a dashboard's text panel: what happened in a
    sentence, then the regions (class, box, flips against the control, mean paired outcome) and the probes."""
    what = "cleared" if event.get("event") == "cleared" else "fired"
    lines = [f"**{event['rule']} {what}** at epoch {event['epoch']}, step {event['global_step']}: "
             f"`{event['metric']}` = {event['value']:.4g} (threshold {event['threshold']:.4g})"]
    strongest = strongest_test(event)
    if strongest:
        lines += ["", f"Strongest test: {strongest}; each test: "
                  + ", ".join(f"{arm} {e:.3g}" for arm, e in event["evidence_by_test"].items() if arm != ALL)]
    regions = [r for r in event.get("regions", []) if _for_cue(r)][:5]
    if regions:
        lines += ["", "| class | test | box (y0, x0, y1, x1) | flips | control flips | tests | mean outcome |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.get('class_name', r['class'])} | {r.get('test', LOCAL)} | {tuple(r['boxes'][0])} "
                  f"| {r['flips']} | {r['control_flips']} | {r['tests']} | {_outcome(r):+.2f} |" for r in regions]
    probes = event.get("probe_ids", [])
    if probes:
        lines += ["", "Probes: " + ", ".join(f"`{p}`" for p in probes[:10]) + (" ..." if len(probes) > 10 else "")]
    return "\n".join(lines)


def resolve_action(action: str) -> str | Callable[[Alert], Any]:
    """Validate an alert action: one of :data:`ACTIONS` or an import path ``pkg.module:function``."""
    if action in ACTIONS:
        return action
    if isinstance(action, str) and action.strip() and ":" not in action and "." not in action:
        raise ValueError(f"alert action {action!r} is neither one of {ACTIONS} nor an import path 'package.module:function'")
    return import_callable(action, "alert action")
