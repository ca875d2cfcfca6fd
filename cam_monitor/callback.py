"""``CAMMonitor``: the Lightning callback. Hooks, scheduling, per-run resources and the fault guard.

Data flows one way: probes -> :mod:`engine` (via :mod:`evaluation`) -> metrics -> :mod:`alerts`
rules -> :mod:`report` pictures -> :mod:`sinks`. This module only decides *when* (one skip test,
:meth:`CAMMonitor._due`) and wires the pieces; :mod:`trainer_access` reads what it needs from
the Trainer. Each ``fit`` is one run: its state (history, alerts, reference) starts fresh in
``setup`` unless a checkpoint restores it, and its resources (output folder, sinks, alert log)
live from ``setup`` to ``teardown``.
"""
from __future__ import annotations

import inspect
import logging
import re
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union

import lightning.pytorch as pl
import torch
from jsonargparse.typing import restricted_string_type
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from . import trainer_access as access
from .alerts import AlertBook, check_rules, default_rules, describe_alert, resolve_action, rule_threshold
from .checks import JUDGED_SETTINGS, dry_run_findings, inert_setting_findings
from .discovery import DiscoverySettings
from .evidence import EvidenceState
from .engine import CAMResult
from .errors import CAMAlertError, CAMError, InputError, ScheduleError
from .evaluation import EvalSettings, Evaluation, Reference, evaluate
from .history import History
from .imports import as_callable
from .layers import resolve_layer, unwrap_compiled
from .probes import ProbeSet, load_probe_source
from .publisher import Publisher, background_worker
from .report import ReportSettings, build_panel
from .sinks import AlertLog, Sink, sinks_for

log = logging.getLogger(__name__)

STATE_VERSION = 2
#: A CAM method's name (``cam_monitor.methods.METHODS``), spelled out so a CLI or YAML typo fails at parsing.
Method = Literal["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"]
#: An import path ``package.module:function`` (an alert action or a transform named in YAML).
ImportPath = restricted_string_type("ImportPath", r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
#: Which probes get per-probe curves on the dashboards: the few the filmstrip follows, every tiled one, or none.
ProbeCurves = Literal["filmstrip", "all", "none"]
PROBE_CURVES = typing.get_args(ProbeCurves)
DRY_RUN_PROBES = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CAMMonitor(Callback):
    """Grad-CAM on a fixed probe set at every validation: metrics, pictures, alerts.

    The README's "CAMMonitor arguments" table says more about each argument.

    Args:
        target_layer: dotted module name inside the LightningModule (``net.layer4``), or None for
            the last layer whose Grad-CAM explains the class (the pick is logged at fit start and
            kept in the state and checkpoint card).
        probes: a ProbeSet, a saved probe file, a probe folder, or None to pick ``num_probes``
            class-balanced probes from the loaders the trainer uses (validation, else training).
        num_probes: probes to pick when ``probes`` is None.
        every_n_epochs: 1 evaluates at every validation; N at the first validation, then at the
            first validation at least N epochs after the last evaluation (the others re-log the
            last values, so monitored metrics are never stale).
        methods: CAM methods computed in the one pass; the metrics use the first.
        targets: explain the true class ("label") or the predicted class ("pred").
        batch_size: probes per CAM chunk (bounds device memory).
        images_every_n_evals: send pictures every N-th evaluation (0 = never).
        max_grid_probes: probes shown in the pictures.
        filmstrip_probes: the first N probes also get a filmstrip (their overlay over the last
            evaluations) and, by default, per-probe curves on the dashboard.
        tile_size: picture tile size in px (longer side); None keeps the image size.
        faithfulness: compute cam/average_drop (one extra forward on image x map).
        border_fraction: width of the border band that stands in for a spurious mask (share of
            each side).
        spurious_enrichment: alert threshold on the energy share on the user's spurious masks
            over their area share (needs spurious masks).
        spurious_energy_rise: alert threshold on the rise of the spurious energy since the reference.
        object_enrichment_floor: alert when the object masks' enrichment falls below this (1.0 =
            chance; needs object masks).
        drift_threshold: alert threshold on drift from the reference (1 - Spearman rho) while
            the maps move off the object.
        shortcut_flip_excess: the smallest excess of flips over the control that counts as a
            shortcut (the margin of discovery's null hypothesis; default: the DiscoverySettings'
            ``min_effect``, 0.05). The false-alarm rate is DiscoverySettings' ``alpha``.
        object_energy_floor: opt-in absolute floor on cam/object_energy (needs object masks).
        discovery: mask-free shortcut discovery with paste and amplitude-swap confirmation: True,
            False, or a DiscoverySettings (false-alarm rate ``alpha``, 1e-3 per evaluation).
        patience: consecutive failing evaluations before a rule fires.
        hysteresis: a fired rule clears only this share of its threshold past it.
        alert_action: "log", "warn", "stop" (every rank stops at the same step), "raise"
            (CAMAlertError), or an import path "package.module:function" called with the alert.
        on_error: a fault inside the monitor is reported once per kind and training goes on
            ("warn"), or re-raised ("raise").
        log_dir: where alerts.jsonl and PNG files go; default <trainer.log_dir>/cam_monitor.
        reference: what drift and the reference rules compare with: the first evaluation
            ("first") or the model before its first training step ("fit_start").
        probe_seed: seed of the probe pick (and of discovery's controls).
        mean: display normalisation (per-channel mean) of probes picked from data.
        std: display normalisation (per-channel std) of probes picked from data.
        reshape: (h, w) of a token layer whose grid is not square.
        output_transform: callable or import path "pkg.module:function" picking the
            (B, classes) logits from the model's output; None finds a tensor, ["logits"],
            .logits or [0].
        name: tells several monitors in one Trainer apart: metrics cam/<name>/..., image tags,
            output folder cam_monitor/<name>/, state key and checkpoint card.
        probe_transform: with a probe folder, a callable or import path mapping each image
            (float (C, H, W) in [0, 1]) to the model's input.
        layout: of a 4-D layer output: "nchw", "nhwc" (channels-last), or "auto" (by evidence:
            the shape, then what produced the output).
        background: draw and write the pictures on a worker thread (True), on the training
            thread (False), or "auto": on the worker where training runs on an accelerator.
        probe_curves: which probes get per-probe curves on the dashboards: the filmstrip's
            ("filmstrip"), every probe in the grid ("all"), or none ("none").
    """

    def __init__(
        self,
        target_layer: str | None = None,
        probes: ProbeSet | str | Path | None = None,
        num_probes: int = 64,
        every_n_epochs: int = 1,
        methods: Sequence[Method] = ("gradcam",),
        targets: Literal["label", "pred"] = "label",
        batch_size: int = 64,
        images_every_n_evals: int = 1,
        max_grid_probes: int = 32,
        filmstrip_probes: int = 4,
        tile_size: int | None = 128,
        faithfulness: bool = True,
        border_fraction: float = 0.1,
        spurious_enrichment: float = 4.0,
        spurious_energy_rise: float = 0.15,
        object_enrichment_floor: float = 0.5,
        drift_threshold: float = 0.5,
        shortcut_flip_excess: float | None = None,
        object_energy_floor: float | None = None,
        discovery: bool | DiscoverySettings = True,
        patience: int = 1,
        hysteresis: float = 0.1,
        alert_action: Union[Literal["log", "warn", "stop", "raise"], ImportPath] = "warn",
        on_error: Literal["warn", "raise"] = "warn",
        log_dir: str | None = None,
        reference: Literal["first", "fit_start"] = "first",
        probe_seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        reshape: Sequence[int] | None = None,
        output_transform: Union[Callable[[Any], torch.Tensor], ImportPath, None] = None,
        name: str | None = None,
        probe_transform: Union[Callable[..., torch.Tensor], ImportPath, None] = None,
        layout: Literal["auto", "nchw", "nhwc"] = "auto",
        background: Union[bool, Literal["auto"]] = "auto",
        probe_curves: ProbeCurves = "filmstrip",
    ) -> None:
        super().__init__()
        self._settings_given = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        for arg, value, minimum in (("every_n_epochs", every_n_epochs, 1), ("num_probes", num_probes, 1),
                                    ("images_every_n_evals", images_every_n_evals, 0),
                                    ("filmstrip_probes", filmstrip_probes, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{arg} must be an int >= {minimum}, got {value!r}")
        if reference not in ("first", "fit_start"):
            raise ValueError(f"reference must be 'first' or 'fit_start', got {reference!r}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if target_layer is not None and (not isinstance(target_layer, str) or not target_layer):
            raise ValueError(f"target_layer must be a dotted module name or None, got {target_layer!r}")
        if probes is not None and not isinstance(probes, (ProbeSet, str, Path)):
            raise TypeError(f"probes must be a ProbeSet, a path or None, got {type(probes).__name__}")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise ValueError(f"name must be letters, digits, '_', '.' or '-' (it becomes a metric prefix and a "
                             f"folder), got {name!r}")
        if probe_transform is not None and not isinstance(probes, (str, Path)):
            raise ValueError("probe_transform applies to probes loaded from a folder (probes='folder/'); a ProbeSet or "
                             "probes picked from data are already as the model consumes them")
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis must be in [0, 1), got {hysteresis!r}")
        if not isinstance(discovery, (bool, DiscoverySettings)):
            raise TypeError(f"discovery must be True, False or a DiscoverySettings, got {type(discovery).__name__}")
        if isinstance(discovery, bool):
            discovery = DiscoverySettings(enabled=discovery, seed=probe_seed)
        if shortcut_flip_excess is not None:
            discovery = replace(discovery, min_effect=shortcut_flip_excess)
        self.target_layer, self.name = target_layer, name
        self.prefix = "cam" if name is None else f"cam/{name}"
        self.settings = EvalSettings(target_layer, tuple(methods) if not isinstance(methods, str) else (methods,),
                                     targets, batch_size, faithfulness, border_fraction,
                                     as_callable(output_transform, "output_transform"), reshape, layout, discovery)
        self.probe_transform = as_callable(probe_transform, "probe_transform")
        if probe_curves not in PROBE_CURVES:
            raise ValueError(f"probe_curves must be one of {PROBE_CURVES}, got {probe_curves!r}")
        self.report_settings = ReportSettings(max_grid_probes, tile_size,
                                              curve_probes={"filmstrip": filmstrip_probes, "all": None,
                                                            "none": 0}[probe_curves])
        self.rules = default_rules(spurious_enrichment, spurious_energy_rise, object_enrichment_floor, drift_threshold,
                                   discovery.alpha, object_energy_floor)
        self._explicit = {k: self._settings_given[k] for k in JUDGED_SETTINGS
                          if self._settings_given[k] != _DEFAULTS[k]}  # the judged settings the user gave
        self.patience, self.hysteresis = patience, hysteresis
        AlertBook(patience)  # validates patience now rather than at setup
        self.action = resolve_action(alert_action)
        self.num_probes, self.every_n_epochs, self.probe_seed = num_probes, every_n_epochs, probe_seed
        self.images_every_n_evals, self.filmstrip_probes = images_every_n_evals, filmstrip_probes
        self.on_error, self.log_dir, self.reference_mode = on_error, log_dir, reference
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        self._probe_source = probes
        if background not in (True, False, "auto"):
            raise ValueError(f"background must be True, False or 'auto', got {background!r}")
        self.background = background
        self._reset_run()
        self._drop_resources()

    # ---- run state and resources -----------------------------------------------------------------

    def _reset_run(self) -> None:
        """Forget everything of the previous run (a new ``fit`` is a new run unless resumed)."""
        self.series = History(self.prefix, self.filmstrip_probes)
        self.book = AlertBook(self.patience)
        self.alerts: list[dict[str, Any]] = []
        self.faults: dict[str, int] = {}
        self.probes: ProbeSet | None = self._probe_source if isinstance(self._probe_source, ProbeSet) else None
        self.layer_name: str | None = self.target_layer
        self._resumed_probes = False
        self._checked = False
        self._unsettled_said = False
        self._shown_regions: torch.Tensor | None = None
        self._last_eval_key: tuple[int, int] | None = None
        self._evidence: EvidenceState | None = None

    def _drop_resources(self) -> None:
        self._out_dir: Path | None = None
        self._sinks: list[Sink] | None = None
        self._alert_log: AlertLog | None = None
        self._layer_module: torch.nn.Module | None = None
        self._publisher: Publisher | None = None

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

    def inferred_probes(self, min_excess: float = 0.0) -> ProbeSet:
        """The probe set with the regions the last evaluation's discovery confirmed as its
        ``spurious_masks`` (probes without one get an empty mask, i.e. the border band), for review,
        correction and gating: ``monitor.inferred_probes().save("probes.pt")``."""
        ev = self.last_evaluation
        if ev is None or ev.discovery is None or self.probes is None:
            raise CAMError("no discovery yet: the monitor infers regions at its evaluations (with discovery=True)")
        masks = ev.discovery.masks(len(self.probes), self.probes.image_size, min_excess)
        return replace(self.probes, spurious_masks=masks)

    def pin_reference(self) -> None:
        """Use the latest evaluation as the drift reference from now on (instead of the first)."""
        self.series.pin_reference()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, target_layer=self.target_layer, methods=self.settings.methods)

    def _close_sinks(self, on_fault: Callable[[Sink, Exception], None]) -> None:
        """Close every sink that keeps a file of its own (``close()``); a failing one goes to ``on_fault``."""
        for sink in self._sinks or []:
            close = getattr(sink, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as err:  # noqa: BLE001 - reported by on_fault, the other sinks still close
                    on_fault(sink, err)

    # ---- Lightning hooks -------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse a clash with another monitor; resolve the output folder; start a fresh run for ``fit``."""
        if stage == "fit":
            self._reset_run()
        self._publisher = Publisher(background_worker(self.background, trainer.strategy.root_device.type))
        self._out_dir = Path(self.log_dir) if self.log_dir else (
            Path(trainer.log_dir or trainer.default_root_dir) / "cam_monitor" / (self.name or ""))
        for other in trainer.callbacks:
            if isinstance(other, CAMMonitor) and other is not self and (
                    other.prefix == self.prefix or other._out_dir == self._out_dir):
                raise ScheduleError(
                    f"two CAMMonitors in one Trainer would log under {self.prefix!r} / write to {self._out_dir}: give "
                    "each a distinct name=, e.g. CAMMonitor(target_layer='layer3', name='layer3')")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Finish every queued picture (before Lightning closes the loggers), close the sinks' own
        files, then drop the resources."""
        try:
            if self._publisher is not None:
                self._publisher.close()
                self._report_worker_faults(trainer)
            self._close_sinks(lambda sink, err: self._fault(f"sink:{sink.name}", err))
        finally:
            self._drop_resources()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A failing fit still gets the pictures of its evaluations (written before its loggers close)."""
        if self._publisher is not None:
            self._publisher.close()
            for kind, err in self._publisher.faults():
                log.debug("CAMMonitor %s failed while the fit was failing: %r", kind, err)
        self._close_sinks(lambda sink, err: log.debug("CAMMonitor could not close sink %s while the fit was failing: "
                                                      "%r", sink.name, err))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before any training step: refuse a schedule that never fires, check the layer, and check
        explicit (or resumed) probes with one dry pass."""
        access.check_schedule(trainer, pl_module)
        if self.target_layer is not None:
            resolve_layer(unwrap_compiled(pl_module), self.target_layer)
        if self.probes is None and self._probe_source is not None:
            self.probes = load_probe_source(self._probe_source, self.probe_transform)
        if self.probes is not None:
            self._dry_run(trainer, pl_module, "fit")
        for logger in trainer.loggers:
            logger.log_hyperparams(self.hyperparameters())
        if trainer.is_global_zero:
            places = "; ".join(getattr(s, "where", lambda s=s: s.name)() for s in self._sinks_of(trainer))
            rank_zero_info(f"CAMMonitor{self._tag}: alerts go to {self._out_dir / 'alerts.jsonl'}; pictures to {places}")

    def hyperparameters(self) -> dict[str, Any]:
        """The monitor's settings, flat, for the loggers' hyperparameters (``run.config``,
        TensorBoard's HParams): ``cam_monitor.<argument>`` (``cam_monitor.<name>.<argument>`` for a named monitor)."""
        head = "cam_monitor" if self.name is None else f"cam_monitor.{self.name}"
        return {f"{head}.{k}": _plain(v) for k, v in self._settings_given.items()}
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probes picked from data are picked here, once the trainer has built its loaders; a resumed
        run's probes are explained here, after every strategy has restored the callback state."""
        self._explain_resumed_probes()
        for finding in access.schedule_findings(trainer, pl_module):
            access.rank_zero_warn_user(f"CAMMonitor{self._tag}: {finding}")
        ready = self._ensure_probes(trainer, pl_module, "fit")
        if self.reference_mode != "fit_start" or self.series.reference is not None:
            return
        if not ready:
            raise InputError(
                "CAMMonitor(reference='fit_start', probes=None) needs the validation loader before training, but the "
                "Trainer builds it only at the first validation here (check_val_every_n_epoch > 1 and "
                "num_sanity_val_steps=0): pass probes=, or set num_sanity_val_steps > 0")
        ev = self._guarded("reference", lambda: self._evaluate(trainer, pl_module), trainer)
        if ev is not None:
            self.series.start_from(ev)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._ensure_probes(trainer, pl_module, _stage(trainer))

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_probes(trainer, pl_module, "test")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._run(trainer, pl_module, _stage(trainer))

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run(trainer, pl_module, "test")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Without a validation loop the monitor evaluates at the end of each training epoch."""
        if not access.validation_runs(trainer, pl_module):
            self._run(trainer, pl_module, "fit")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit that ended without a single evaluation says so, and why."""
        if self.history:
            return
        if self.probes is None:
            why = "no probes: the loader they are picked from was never built (no validation ran)"
        elif self.faults:
            why = f"every evaluation failed ({', '.join(sorted(self.faults))})"
        else:
            why = f"the fit ended at step {trainer.global_step}, before any validation at which the monitor was due"
        access.rank_zero_warn_user(f"CAMMonitor{self._tag}: this fit ended without a single evaluation ({why}); nothing was "
                       "measured, logged or checked")

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Attach the explanation card: the latest aggregates and the active alerts."""
        last = self.history[-1] if self.history else {}
        card = {"name": self.name, "prefix": self.prefix, "target_layer": self.layer_name,
                "epoch": last.get("epoch"), "global_step": last.get("global_step"),
                "metrics": self.series.latest_metrics(),
                "active_alerts": sorted(rule for rule, on in self.book.active.items() if on),
                "alerts": [dict(a) for a in self.alerts]}
        checkpoint.setdefault("cam_monitor_cards", {})[self.state_key] = card

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "name": self.name, "target_layer": self.layer_name,
                "history": self.series.state_dict(), "alerts": [dict(a) for a in self.alerts],
                "book": self.book.state_dict(), "probes": None if self.probes is None else self.probes.state(),
                "evidence": None if self._evidence is None else self._evidence.state_dict()}

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"CAMMonitor state version {state.get('version')!r} is not {STATE_VERSION}: the checkpoint "
                             "was written by another cam_monitor version")
        self.series.load_state_dict(state["history"])
        self.alerts = [dict(a) for a in state["alerts"]]
        self.book.load_state_dict(state["book"])
        evidence = state.get("evidence")  # absent from checkpoints written before the evidence was kept
        self._evidence = None if evidence is None else EvidenceState.from_state(evidence)
        self.layer_name = state["target_layer"]
        if state["probes"] is not None:
            self.probes = ProbeSet.from_state(state["probes"], source="CAMMonitor checkpoint state")
            self._resumed_probes = True
            self._checked = False  # some strategies restore after on_fit_start's dry run: check these probes too

    # ---- when and what ---------------------------------------------------------------------------

    def _due(self, trainer: pl.Trainer, stage: str) -> bool:
        """The one skip test: validate/test evaluate every time; fit follows ``every_n_epochs``."""
        if stage != "fit":
            return True
        if self._last_eval_key == (trainer.current_epoch, trainer.global_step):
            return False
        last = self.series.last_epoch("fit")
        return last is None or self.every_n_epochs == 1 or trainer.current_epoch - last >= self.every_n_epochs

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.probes is None:
            return
        if self._due(trainer, stage):
            self._last_eval_key = (trainer.current_epoch, trainer.global_step)
            if self.layer_name is None:
                self._guarded("evaluate", lambda: self._settle_layer(pl_module, *self._first_probe_pass(trainer, pl_module)),
                             trainer)
            ev = self._guarded("evaluate", lambda: self._evaluate(trainer, pl_module), trainer)
            if ev is not None:
                self._record(trainer, ev, stage)
        for key, value in self.series.latest_metrics().items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    def _settings(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> EvalSettings:
        """The settings with the layer as a module object, so a pass through a wrapper finds it."""
        if self._layer_module is None and self.layer_name is not None:
            self._layer_module = resolve_layer(unwrap_compiled(pl_module), self.layer_name)[1]
        return replace(self.settings, layer=self._layer_module)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Evaluation:
        return evaluate(access.cam_model(trainer, pl_module), self.probes, self._settings(trainer, pl_module),
                        access.placement(trainer, pl_module), epoch=trainer.current_epoch,
                        global_step=trainer.global_step, previous=self.series.previous_maps,
                        reference=self.series.reference, evidence=self._evidence)

    def _record(self, trainer: pl.Trainer, ev: Evaluation, stage: str) -> None:
        """Rules, history, then (rank 0) pictures and the alert log, then the alert action."""
        ref = self.series.reference
        regions = None if ev.discovery is None else {
            "shortcut_evidence": ev.discovery.regions(self.probes.ids, self.probes.class_names)}
        checks = check_rules(self.rules, ev.aggregates, ev.per_probe, self.probes.ids,
                             None if ref is None else ref.aggregates, self.hysteresis, regions)
        events = self.book.update(checks, ev.epoch, ev.global_step, self.prefix)
        self._evidence = ev.evidence or self._evidence
        self._shown_regions = self._regions_to_show(ev)
        self.series.record(ev, stage, {"alerts": float(self.book.n_active)})
        fired = [{k: v for k, v in e.items() if k != "event"} for e in events if e["event"] == "fired"]
        self.alerts.extend(fired)
        if trainer.is_global_zero:
            k = self.images_every_n_evals
            if k and (len(self.history) - 1) % k == 0:
                self._guarded("render", lambda: self._publish(trainer, ev), trainer)
            for event in events:
                self._guarded("alert_log", lambda e=event: self._write_alert(trainer, e), trainer)
            self._report_worker_faults(trainer)
        for event in events:
            if event["event"] == "cleared":
                rank_zero_info(f"CAMMonitor{self._tag} alert cleared: {describe_alert(event)}")
        self._act(trainer, fired)

    # ---- probes ----------------------------------------------------------------------------------

    def _ensure_probes(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> bool:
        """Make the probe set ready (loading or picking it) and dry-run it once; False if the loader
        it must come from is not built yet (it then comes at the first validation)."""
        if self.probes is None:
            if self._probe_source is not None:
                self.probes = load_probe_source(self._probe_source, self.probe_transform)
            else:
                found = access.probe_loader(trainer, pl_module, stage)
                if found is None:
                    return False
                loader, which = found
                self.probes = access.pick_probes(loader, which, self.num_probes, self.probe_seed, self.mean, self.std)
                rank_zero_info(f"CAMMonitor{self._tag}: picked {len(self.probes)} probes of "
                               f"{len(set(self.probes.labels.tolist()))} classes from the {which}")
        if not self._checked:
            self._dry_run(trainer, pl_module, stage)
        return True

    def _dry_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """One probe through the CAM pass (on every rank, through the strategy's model): a wrong layer,
        probe shape or label fails here, before training; also resolves and logs ``target_layer=None``."""
        when = "before training" if stage == "fit" else f"before {stage}"
        settings = self._settings(trainer, pl_module)
        try:
            model, result = self._first_probe_pass(trainer, pl_module, DRY_RUN_PROBES)
            if settings.targets == "label":
                self.probes.check_classes(result.logits.shape[1])
        except CAMError as err:
            raise type(err)(f"CAMMonitor check {when} failed: {err}") from err
        except Exception as err:  # noqa: BLE001 - e.g. a conv rejecting the probes' channel count
            raise InputError(
                f"CAMMonitor could not run a probe of shape {tuple(self.probes.images.shape[1:])} through "
                f"{type(pl_module).__name__} {when} ({type(err).__name__}: {err}); make the probes match the model's "
                "input (channels, size, normalisation)") from err
        found = dry_run_findings(result, self.probes, settings, rule_threshold(self.rules, "spurious_enrichment"),
                                 self.prefix)
        found.warnings.extend(inert_setting_findings(self._explicit, self.probes, settings.discovery.enabled))
        for note in found.notes:
            rank_zero_info(f"CAMMonitor{self._tag}: {note}")
        for warning in found.warnings:
            access.rank_zero_warn_user(f"CAMMonitor{self._tag}: {warning}")
        self._settle_layer(pl_module, model, result)
        self._checked = True

    def _first_probe_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule, n: int = 1
                          ) -> tuple[torch.nn.Module, CAMResult]:
        """One CAM pass over the first ``n`` probes as the evaluations run it: ``(the model it ran, result)``."""
        place, model, settings = access.placement(trainer, pl_module), access.cam_model(trainer, pl_module), \
            self._settings(trainer, pl_module)
        first = slice(0, min(len(self.probes), n))
        images = place.to_model(self.probes.images[first])
        targets = self.probes.labels[first] if settings.targets == "label" else None
        with place.forward_context():
            return model, settings.cam_pass(model, images, targets)

    def _settle_layer(self, pl_module: pl.LightningModule, model: torch.nn.Module, result: CAMResult) -> None:
        """Keep ``target_layer=None``'s pick once a non-zero map settled it (the pick then holds for the
        run and its checkpoints); until then every evaluation picks again."""
        if self.layer_name is not None:
            return
        if not result.layer_settled:
            if not self._unsettled_said:
                rank_zero_info(f"CAMMonitor{self._tag}: target_layer=None found no layer whose map is non-zero yet "
                               f"(provisionally {result.layer_name!r}); it picks again at each evaluation until one is")
                self._unsettled_said = True
            return
        module = model.get_submodule(result.layer_name)
        self.layer_name = next(n for n, m in unwrap_compiled(pl_module).named_modules() if m is module)
        self._layer_module = module
        rank_zero_info(f"CAMMonitor{self._tag}: target_layer=None picked {self.layer_name!r} "
                       f"({result.grid_size[0]}x{result.grid_size[1]} grid)")

    def _explain_resumed_probes(self) -> None:
        """A resumed run keeps the checkpoint's probes (history and drift continue on the same
        images); say so, and warn when the monitor was configured with a different set."""
        if not self._resumed_probes:
            return
        self._resumed_probes = False
        n = len(self.probes)
        src = self._probe_source
        if src is None:
            differs, asked = n != self.num_probes, f"num_probes={self.num_probes}"
        else:
            differs, asked = not load_probe_source(src, self.probe_transform).same_as(self.probes), f"probes={src!r}"[:80]
        if differs:
            access.rank_zero_warn_user(f"CAMMonitor{self._tag}: resuming with the checkpoint's {n} probes, not {asked}: history, "
                           "drift and alerts must continue on the same images; start a new run (no ckpt_path) or add "
                           "a monitor with another name= to monitor a new set")
        else:
            rank_zero_info(f"CAMMonitor{self._tag}: resuming with the checkpoint's {n} probes")

    # ---- outputs ---------------------------------------------------------------------------------

    def _sinks_of(self, trainer: pl.Trainer) -> list[Sink]:
        """This run's sinks, built on first use (rank 0 only) from the trainer's loggers."""
        if self._sinks is None:
            self._sinks = sinks_for(trainer.loggers, self.prefix, self._out_dir)
        return self._sinks

    def _publish(self, trainer: pl.Trainer, ev: Evaluation) -> None:
        """Queue this evaluation's pictures: rendered and sent by the worker, from a snapshot."""
        sinks, probes, history, settings = self._sinks_of(trainer), self.probes, self.series.snapshot(), self.report_settings
        figure = any(not getattr(sink, "draws_curves", False) for sink in sinks)  # else the dashboards plot the numbers
        regions = self._shown_regions

        def job() -> None:
            panel = build_panel(probes, ev, history, settings, trends=figure, inferred_masks=regions)
            self._to_sinks(sinks, lambda sink: sink.log_evaluation(ev, panel))

        self._publisher.submit("render", job)

    def _regions_to_show(self, ev: Evaluation) -> torch.Tensor | None:
        """The inferred shortcut regions the pictures outline: this evaluation's; while the
        ``shortcut_confirmed`` alert stays active and this evaluation inferred none, the last ones shown."""
        now = None if ev.discovery is None else ev.discovery.masks(len(self.probes), self.probes.image_size)
        if now is not None and bool(now.any()):
            return now
        return self._shown_regions if self.book.active.get("shortcut_confirmed") else now

    def _to_sinks(self, sinks: list[Sink], send: Callable[[Sink], None]) -> None:
        """Send to every sink; a failing sink is a fault of its own kind and the others still get it."""
        for sink in sinks:
            try:
                send(sink)
            except Exception as err:  # noqa: BLE001 - reported on the training thread
                self._publisher.record_fault(f"sink:{sink.name}", err)

    def _write_alert(self, trainer: pl.Trainer, event: dict[str, Any]) -> None:
        """``alerts.jsonl`` now (durability first); the dashboards in order, from the worker."""
        if self._alert_log is None:
            self._alert_log = AlertLog(self._out_dir / "alerts.jsonl")
        written = self._alert_log.append(event)
        if self._alert_log.repaired:
            access.rank_zero_warn_user(f"CAMMonitor: dropped a torn last line from {self._alert_log.path} (a process died mid-write)")
            self._alert_log.repaired = False
        if written:
            sinks = self._sinks_of(trainer)
            self._publisher.submit("alert", lambda: self._to_sinks(sinks, lambda sink: sink.log_alert(event)))

    def _act(self, trainer: pl.Trainer, fired: list[dict[str, Any]]) -> None:
        """Carry out the alert action; ``stop`` is decided across ranks so every rank stops together."""
        if self.action == "stop" and trainer.strategy.reduce_boolean_decision(bool(fired), all=False):
            trainer.should_stop = True
        if not fired:
            return
        text = "; ".join(describe_alert(a) for a in fired)
        if self.action == "warn":
            access.rank_zero_warn_user(f"CAMMonitor alert: {text}")
        elif self.action == "stop":
            rank_zero_info(f"CAMMonitor alert, stopping training: {text}")
        elif self.action == "raise":
            raise CAMAlertError(f"CAMMonitor alert: {text}")
        elif callable(self.action) and trainer.is_global_zero:
            for a in fired:
                self._guarded("alert_action", lambda a=a: self.action(dict(a)), trainer)

    # ---- failure handling ------------------------------------------------------------------------

    def _guarded(self, kind: str, fn: Callable[[], Any], trainer: pl.Trainer) -> Any:
        """Run ``fn``; on error re-raise (``on_error="raise"``) or report once per kind and go on."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - the monitor must never kill training unless asked
            self._fault(kind, err)
            return None

    def _report_worker_faults(self, trainer: pl.Trainer) -> None:
        """Faults of the background jobs that finished since the last call, reported as any other."""
        for kind, err in self._publisher.faults():
            self._fault(kind, err)

    def _fault(self, kind: str, err: BaseException) -> None:
        if self.on_error == "raise":
            raise err
        key = f"{kind}:{type(err).__name__}"
        self.faults[key] = self.faults.get(key, 0) + 1
        if self.faults[key] == 1:
            access.warn_user(f"CAMMonitor{self._tag}: {kind} failed ({type(err).__name__}: {err}); training goes on, "
                          "the next evaluation retries (reported once per kind)")
        log.debug("CAMMonitor %s failed", kind, exc_info=err)

    @property
    def _tag(self) -> str:
        return "" if self.name is None else f"[{self.name}]"


#: The constructor's defaults: a setting that differs from its default was given by the user.
_DEFAULTS = {k: p.default for k, p in inspect.signature(CAMMonitor.__init__).parameters.items()}


def _plain(value: Any) -> Any:
    """A setting as a logger can store it: numbers, strings, booleans and None as they are; a
    sequence as a list of those; anything else (a ProbeSet, a callable) as its short text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    if isinstance(value, ProbeSet):
        return f"ProbeSet({len(value)} probes)"
    return getattr(value, "__qualname__", None) or repr(value)[:200]


def _stage(trainer: pl.Trainer) -> str:
    """``"validate"`` under ``trainer.validate``, else ``"fit"`` (validation inside fit)."""
    return "validate" if trainer.state.fn == "validate" else "fit"
