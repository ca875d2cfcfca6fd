"""``Monitor``: the whole monitor without Lightning. It owns the probes, the evaluation settings,
the history, the alert policy and the outputs, and runs one evaluation when asked.

Data flows one way: probes -> :mod:`engine` (via :mod:`evaluation`) -> metrics -> :mod:`alerts`
rules -> :mod:`report` pictures -> :mod:`outputs` (sinks, alert log). Any training loop drives it:
``prepare`` once before training, ``evaluate`` whenever the loop wants an evaluation, ``close`` at
the end; :class:`~cam_monitor.callback.CAMMonitor` is Lightning's adapter of it. A run's state
(history, alerts, evidence, the probes) is ``state_dict()``, versioned and loadable with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .alerts import AlertBook, at_chance, check_rules, default_rules, describe_alert, resolve_action, rule_threshold
from .checks import dry_run, dry_run_findings, first_pass, inert_setting_findings
from .console import Voice
from .discovery import DiscoverySettings
from .engine import CAMResult
from .errors import CAMAlertError, CAMError
from .evaluation import EvalSettings, Placement, evaluate
from .evidence import ALL, EvidenceState
from .faults import FaultGuard, OnError
from .history import History
from .imports import as_callable
from .layers import resolve_layer, unwrap_compiled
from .outputs import Outputs
from .probes import ProbeArg, ProbeSet, ProbeSource
from .records import Alert, AlertEvent, Evaluation, Reference, alert_of
from .report import ReportSettings, build_panel
from .settings import AlertSettings, CAMSettings, PictureSettings, ProbeSettings, given
from .sinks import Sink

STATE_VERSION = 2
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Outcome:
    """One evaluation's result: what it measured and the alert events it raised or cleared;
    ``stop``: an alert fired and the action is ``"stop"`` (the loop should stop training)."""

    evaluation: Evaluation
    events: list[AlertEvent]
    stop: bool = False

    @property
    def fired(self) -> list[Alert]:
        return [alert_of(e) for e in self.events if e["event"] == "fired"]


class Monitor:
    """Grad-CAM on a fixed probe set, its metrics, alerts and pictures, in any training loop.

    Args:
        target_layer: dotted module name inside the model, or None for the last layer whose
            Grad-CAM explains the class (picked at the first pass with a non-zero map).
        probes: a ProbeSet, a saved probe file, a probe folder, or None to pick
            ``probe_settings.num_probes`` probes from the ``loader`` given to :meth:`prepare`.
        probe_settings, cams, alerting, pictures, discovery: the settings groups (:mod:`settings`;
            ``discovery`` also takes True/False).
        name: tells several monitors apart: metrics ``cam/<name>/...``, output folder, state key.
        on_error: a fault inside the monitor is reported once per kind and training goes on
            ("warn"), or re-raised ("raise").
        voice: how notes and warnings reach the user (default: logging and ``warnings``).
    """

    def __init__(self, target_layer: str | None = None, probes: ProbeArg = None, *,
                 probe_settings: ProbeSettings | None = None, cams: CAMSettings | None = None,
                 alerting: AlertSettings | None = None, pictures: PictureSettings | None = None,
                 discovery: bool | DiscoverySettings = True, name: str | None = None, on_error: OnError = "warn",
                 voice: Voice | None = None) -> None:
        if target_layer is not None and (not isinstance(target_layer, str) or not target_layer):
            raise ValueError(f"target_layer must be a dotted module name or None, got {target_layer!r}")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise ValueError(f"name must be letters, digits, '_', '.' or '-' (it becomes a metric prefix and a "
                             f"folder), got {name!r}")
        pick, cams = probe_settings or ProbeSettings(), cams or CAMSettings()
        self.alerting, self.pictures = alerting or AlertSettings(), pictures or PictureSettings()
        if not isinstance(discovery, (bool, DiscoverySettings)):
            raise TypeError(f"discovery must be True, False or a DiscoverySettings, got {type(discovery).__name__}")
        if isinstance(discovery, bool):
            discovery = DiscoverySettings(enabled=discovery, seed=pick.seed)
        self.target_layer, self.name, self.cams = target_layer, name, cams
        self.prefix = "cam" if name is None else f"cam/{name}"
        self.settings = EvalSettings(target_layer, cams.methods, cams.targets, cams.batch_size, cams.faithfulness,
                                     cams.border_fraction, as_callable(cams.output_transform, "output_transform"),
                                     cams.reshape, cams.layout, discovery)
        self.report_settings = ReportSettings(self.pictures.max_grid_probes, self.pictures.tile_size,
                                              curve_probes=self.pictures.curve_probes)
        self.rules = default_rules(**self.alerting.thresholds(), shortcut_alpha=discovery.alpha)
        self.action = resolve_action(self.alerting.action)
        self.source = ProbeSource(probes, pick.num_probes, pick.seed, pick.mean, pick.std,
                                  as_callable(pick.transform, "probe_transform"))
        self.voice = voice or Voice()
        self.guard = FaultGuard(on_error, self.voice.fault, self.tag)
        self.outputs: Outputs | None = None
        self.reset()

    # ---- the run's state -------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything of the previous run (a new fit is a new run unless resumed)."""
        self.series = History(self.prefix, self.pictures.filmstrip_probes)
        self.book = AlertBook(self.alerting.patience)
        self.alerts: list[Alert] = []
        self.guard.reset()
        self.probes: ProbeSet | None = self.source.ready()
        self.layer_name: str | None = self.target_layer
        self.evidence: EvidenceState | None = None
        self.shown_regions: torch.Tensor | None = None
        self.checked = False
        self.resumed_probes = False
        self._layer_module: nn.Module | None = None
        self._unsettled_said = False
        self._waiting_said = False

    @property
    def tag(self) -> str:
        """The monitor's name as messages show it (``[layer3]``), empty for an unnamed one."""
        return "" if self.name is None else f"[{self.name}]"

    @property
    def faults(self) -> dict[str, int]:
        """Faults so far, counted by ``<kind>:<exception type>``."""
        return self.guard.counts

    @property
    def history(self) -> list[dict[str, Any]]:
        """One row per evaluation: ``epoch``, ``global_step``, ``stage`` and the logged metrics."""
        return self.series.rows

    @property
    def reference(self) -> Reference | None:
        """The evaluation drift and the reference rules compare with."""
        return self.series.reference

    @property
    def last_evaluation(self) -> Evaluation | None:
        return self.series.last

    @property
    def active_alerts(self) -> list[str]:
        """The rules whose alert is active now, sorted."""
        return sorted(rule for rule, on in self.book.active.items() if on)

    def latest_metrics(self) -> dict[str, float]:
        """The last evaluation's metrics by logged name (what a loop logs every validation)."""
        return self.series.latest_metrics()

    def pin_reference(self) -> None:
        """Use the latest evaluation as the drift reference from now on (instead of the first)."""
        self.series.pin_reference()

    def inferred_probes(self, min_excess: float = 0.0) -> ProbeSet:
        """The probe set with the regions the last evaluation's discovery found as its
        ``spurious_masks``, for review, correction and gating: ``monitor.inferred_probes().save("probes.pt")``.
        A region is a box of the local test whose flips beat its control by more than ``min_excess``,
        in a class whose local-arm evidence is for a cue
        (:meth:`~cam_monitor.discovery.Discovery.backed_classes`), or the pixels a mark test
        (recurring, marked) carried from a probe whose pairs beat their controls so, where that
        test's evidence is for a cue (:meth:`~cam_monitor.discovery.Discovery.backed_marks`);
        probes without one get an empty mask (i.e. the border band), and so does every probe when
        the evidence rests on the whole-image tests (a cast, a texture, a frame has no box)."""
        ev = self.last_evaluation
        if ev is None or ev.discovery is None or self.probes is None:
            raise CAMError("no discovery yet: the monitor infers regions at its evaluations (with discovery=True)")
        masks = ev.discovery.found_masks(ev.evidence, len(self.probes), self.probes.image_size, min_excess)
        return replace(self.probes, spurious_masks=masks)

    # ---- outputs ---------------------------------------------------------------------------------

    def open(self, folder: str | Path, sinks: list[Sink] | Callable[[], list[Sink]] | None = None,
             background: bool = False) -> Outputs:
        """Send this run's pictures and alerts to ``sinks`` (default: PNG files in ``folder``) and
        ``folder/alerts.jsonl``, drawn on a worker thread with ``background=True``."""
        self.outputs = Outputs(folder, sinks, background, self.guard)
        return self.outputs

    def close(self) -> None:
        """Finish every queued picture, close the sinks, and let go of the outputs."""
        outputs, self.outputs = self.outputs, None
        if outputs is not None:
            outputs.close()

    def abort(self) -> None:
        """As :meth:`close`, for a run that is failing: faults go to the debug log only."""
        outputs, self.outputs = self.outputs, None
        if outputs is not None:
            outputs.abort()

    # ---- before training ------------------------------------------------------------------------

    def prepare(self, model: nn.Module, placement: Placement | None = None, loader: Any = None,
                which: str = "loader", stage: str = "fit", runner: nn.Module | None = None) -> bool:
        """Make the probes ready (given, loaded, or picked from ``loader``, which ``which`` names)
        and check them with one dry pass of the model; False when they must be picked and no
        loader was given yet. ``runner`` is the module a pass calls when it is not ``model``
        itself (an FSDP root); ``target_layer`` names a module of ``model``."""
        if self.target_layer is not None:
            resolve_layer(unwrap_compiled(model), self.target_layer)
        if self.probes is None:
            if not self.source.from_data:
                self.probes = self.source.load()
            elif loader is None:
                return False
            else:
                self.probes = self.source.pick(loader, which)
                self.voice.info(f"CAMMonitor{self.tag}: picked {len(self.probes)} probes of "
                                f"{len(set(self.probes.labels.tolist()))} classes from the {which}")
        if not self.checked:
            self.check(model, placement, stage, runner)
        return True

    def check(self, model: nn.Module, placement: Placement | None = None, stage: str = "fit",
              runner: nn.Module | None = None) -> None:
        """One probe batch through the CAM pass before training: a wrong layer, probe shape or
        label fails here; what would not mean what its name says is warned, with the fix; and
        ``target_layer=None`` is resolved and logged."""
        placement = placement or _placement_of(model)
        when = "before training" if stage == "fit" else f"before {stage}"
        settings = self._settings(model)
        result = dry_run(runner or model, self.probes, settings, placement, when, type(model).__name__)
        found = dry_run_findings(result, self.probes, settings, rule_threshold(self.rules, "spurious_enrichment"),
                                 self.prefix)
        discovery = self.settings.discovery
        found.warnings.extend(inert_setting_findings(given(self.alerting), given(discovery).get("min_effect"),
                                                     self.probes, discovery.enabled))
        for note in found.notes:
            self.voice.info(f"CAMMonitor{self.tag}: {note}")
        for warning in found.warnings:
            self.voice.warn(f"CAMMonitor{self.tag}: {warning}")
        self._settle_layer(model, runner or model, result)
        self.checked = True

    def start_reference(self, model: nn.Module, placement: Placement | None = None,
                        runner: nn.Module | None = None) -> None:
        """Measure the model as it is now (before training) as the reference drift compares with."""
        ev = self.guard.run("reference", lambda: self._measure(model, placement, 0, 0, runner))
        if ev is not None:
            self.series.start_from(ev)

    def explain_resumed_probes(self) -> None:
        """A resumed run keeps the checkpoint's probes (history and drift continue on the same
        images); say so, and warn when the monitor was asked for a different set."""
        if not self.resumed_probes:
            return
        self.resumed_probes = False
        differs, asked = self.source.resumed_differs(self.probes)
        n = len(self.probes)
        if differs:
            self.voice.warn(f"CAMMonitor{self.tag}: resuming with the checkpoint's {n} probes, not {asked}: history, "
                            "drift and alerts must continue on the same images; start a new run (no ckpt_path) or add "
                            "a monitor with another name= to monitor a new set")
        else:
            self.voice.info(f"CAMMonitor{self.tag}: resuming with the checkpoint's {n} probes")

    # ---- one evaluation --------------------------------------------------------------------------

    def evaluate(self, model: nn.Module, placement: Placement | None = None, *, epoch: int = 0, step: int = 0,
                 stage: str = "fit", runner: nn.Module | None = None) -> Outcome | None:
        """One evaluation: the CAM pass and metrics, the rules, the history, the pictures and the
        alert log, then the alert action. None when there are no probes yet or the evaluation
        failed (a fault, reported once per kind unless ``on_error="raise"``)."""
        if self.probes is None:
            return None
        if self.layer_name is None:
            self.guard.run("evaluate", lambda: self._settle_layer(model, runner or model, first_pass(
                runner or model, self.probes, self._settings(model), placement or _placement_of(model))))
        ev = self.guard.run("evaluate", lambda: self._measure(model, placement, epoch, step, runner))
        if ev is None:
            return None
        self._say_if_waiting(ev)
        rank_zero = placement is None or placement.rank == 0
        outcome = Outcome(ev, self._record(ev, stage, rank_zero))
        self._act(outcome, rank_zero)
        return outcome

    def _settings(self, model: nn.Module) -> EvalSettings:
        """The settings with the layer as a module object, so a pass through a wrapper finds it."""
        if self._layer_module is None and self.layer_name is not None:
            self._layer_module = resolve_layer(unwrap_compiled(model), self.layer_name)[1]
        return replace(self.settings, layer=self._layer_module)

    def _measure(self, model: nn.Module, placement: Placement | None, epoch: int, step: int,
                 runner: nn.Module | None) -> Evaluation:
        return evaluate(runner or model, self.probes, self._settings(model), placement or _placement_of(model),
                        epoch=epoch, global_step=step, previous=self.series.previous_maps,
                        reference=self.series.reference, evidence=self.evidence)

    def _say_if_waiting(self, ev: Evaluation) -> None:
        """Say once that the rules judged nothing and discovery tested nothing because the model is
        at chance on the probes (:func:`~cam_monitor.alerts.at_chance`), and what to do if it stays there."""
        if self._waiting_said or not at_chance(ev.aggregates, self.settings.discovery.skill_level):
            return
        right = int((ev.preds == self.probes.labels.to(ev.preds.device)).sum())
        who = "the alert rules and shortcut discovery wait" if self.settings.discovery.enabled else "the alert rules wait"
        self.voice.info(f"CAMMonitor{self.tag}: {who}: the model gets {right} of {len(self.probes)} probes right, "
                        "no better than always predicting their most common class (cam/skill_p above "
                        "DiscoverySettings.skill_level), so its maps explain no decision yet; they judge from the "
                        "first evaluation that beats chance. A model that reads only a cue your probes lack is at "
                        "chance on them too: draw the probes from data like your training data")
        self._waiting_said = True

    def _settle_layer(self, model: nn.Module, runner: nn.Module, result: CAMResult) -> None:
        """Keep ``target_layer=None``'s pick once a non-zero map settled it (the pick then holds for
        the run and its checkpoints); until then every evaluation picks again."""
        if self.layer_name is not None:
            return
        if not result.layer_settled:
            if not self._unsettled_said:
                self.voice.info(f"CAMMonitor{self.tag}: target_layer=None found no layer whose map is non-zero yet "
                                f"(provisionally {result.layer_name!r}); it picks again at each evaluation until one is")
                self._unsettled_said = True
            return
        module = runner.get_submodule(result.layer_name)
        self.layer_name = next(n for n, m in unwrap_compiled(model).named_modules() if m is module)
        self._layer_module = module
        self.voice.info(f"CAMMonitor{self.tag}: target_layer=None picked {self.layer_name!r} "
                        f"({result.grid_size[0]}x{result.grid_size[1]} grid)")

    def _record(self, ev: Evaluation, stage: str, rank_zero: bool) -> list[AlertEvent]:
        """Rules, history, then (rank 0) pictures and the alert log; the events it raised or cleared."""
        ref = self.series.reference
        regions = None if ev.discovery is None else {"shortcut_evidence": ev.discovery.found_regions(
            ev.evidence, self.probes.ids, self.probes.class_names)}
        by_test = None if ev.evidence is None or ev.discovery is None else {
            "shortcut_evidence": {arm: ev.evidence.detector(arm) for arm in (*ev.discovery.arms, ALL)}}
        checks = check_rules(self.rules, ev.aggregates, ev.per_probe, self.probes.ids,
                             None if ref is None else ref.aggregates, self.alerting.hysteresis, regions, by_test,
                             self.settings.discovery.skill_level)
        events = self.book.update(checks, ev.epoch, ev.global_step, self.prefix)
        self.evidence = ev.evidence or self.evidence
        self.shown_regions = self._regions_to_show(ev)
        self.series.record(ev, stage, {"alerts": float(self.book.n_active)})
        self.alerts.extend(alert_of(e) for e in events if e["event"] == "fired")
        if rank_zero and self.outputs is not None:
            every = self.pictures.every_n_evals
            if every and (len(self.history) - 1) % every == 0:
                self.guard.run("render", lambda: self._publish(ev))
            for event in events:
                self.guard.run("alert_log", lambda e=event: self.outputs.alert(e))
            self.outputs.report_faults()
        for event in events:
            if event["event"] == "cleared":
                self.voice.info(f"CAMMonitor{self.tag} alert cleared: {describe_alert(event)}")
        return events

    def _publish(self, ev: Evaluation) -> None:
        probes, history, settings, regions = self.probes, self.series.snapshot(), self.report_settings, self.shown_regions
        self.outputs.publish(ev, lambda trends: build_panel(probes, ev, history, settings, trends=trends,
                                                            inferred_masks=regions))

    def _regions_to_show(self, ev: Evaluation) -> torch.Tensor | None:
        """The inferred shortcut regions the pictures outline: none unless ``shortcut_confirmed`` is
        active and the evidence backs some region (a class of the local test or a mark test:
        :meth:`~cam_monitor.discovery.Discovery.backs_regions`); then this evaluation's regions
        (:meth:`~cam_monitor.discovery.Discovery.found_masks`), or, where it drew none, the last
        ones shown. Without an alert a box may be one chance win of one pair, not a region found;
        with an alert that rests on the whole-image tests alone, an earlier box is a region the
        pairs no longer back."""
        discovery = ev.discovery
        if discovery is None or not self.book.active.get("shortcut_confirmed"):
            return None
        if not discovery.backs_regions(ev.evidence):
            return None
        now = discovery.found_masks(ev.evidence, len(self.probes), self.probes.image_size)
        return now if bool(now.any()) else self.shown_regions

    def _act(self, outcome: Outcome, rank_zero: bool) -> None:
        """Carry out the alert action on the alerts that fired (``stop`` only sets ``outcome.stop``)."""
        fired = outcome.fired
        if not fired:
            return
        text = "; ".join(describe_alert(a) for a in fired)
        if self.action == "warn":
            self.voice.warn(f"CAMMonitor alert: {text}")
        elif self.action == "stop":
            outcome.stop = True
            self.voice.info(f"CAMMonitor alert, stopping training: {text}")
        elif self.action == "raise":
            raise CAMAlertError(f"CAMMonitor alert: {text}")
        elif callable(self.action) and rank_zero:
            for a in fired:
                self.guard.run("alert_action", lambda a=a: self.action(dict(a)))

    # ---- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The run's state as CPU tensors and primitives (loadable with ``weights_only=True``)."""
        return {"version": STATE_VERSION, "name": self.name, "target_layer": self.layer_name,
                "history": self.series.state_dict(), "alerts": [dict(a) for a in self.alerts],
                "book": self.book.state_dict(), "probes": None if self.probes is None else self.probes.state(),
                "evidence": None if self.evidence is None else self.evidence.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the run ``state`` describes: its history, alerts, evidence and probes."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"CAMMonitor state version {state.get('version')!r} is not {STATE_VERSION}: the checkpoint "
                             "was written by another cam_monitor version")
        self.series.load_state_dict(state["history"])
        self.alerts = [dict(a) for a in state["alerts"]]
        self.book.load_state_dict(state["book"])
        evidence = state.get("evidence")  # absent from checkpoints written before the evidence was kept
        self.evidence = None if evidence is None else EvidenceState.from_state(evidence)
        self.layer_name = state["target_layer"]
        if state["probes"] is not None:
            self.probes = ProbeSet.from_state(state["probes"], source="CAMMonitor checkpoint state")
            self.resumed_probes = True
            self.checked = False  # some strategies restore after the check before training: check these too


def _placement_of(model: nn.Module) -> Placement:
    """Where a plain model runs: the device of its first parameter."""
    param = next(iter(model.parameters()), None)
    return Placement(device=param.device if param is not None else "cpu")

