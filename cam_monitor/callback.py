"""``CAMMonitor``: Lightning's adapter of :class:`~cam_monitor.monitor.Monitor`. It decides *when*
(the hooks and the one skip test, :meth:`CAMMonitor._due`), reads what the monitor needs from the
Trainer (:mod:`trainer_access`) and attaches the explanation card to checkpoints. Each ``fit`` is
one run: its state starts fresh in ``setup`` unless a checkpoint restores it, and its outputs live
from ``setup`` to ``teardown``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from . import trainer_access as access
from .discovery import DiscoverySettings
from .errors import InputError, ScheduleError
from .faults import OnError
from .monitor import Monitor
from .probes import ProbeSet
from .publisher import background_worker
from .settings import AlertSettings, CAMSettings, PictureSettings, ProbeSettings, flatten, from_flat


class CAMMonitor(Callback):
    """Grad-CAM on a fixed probe set at every validation: metrics, pictures, alerts.

    ``docs/reference.md`` says more about every argument and settings field.

    Args:
        target_layer: dotted module name inside the LightningModule (``net.layer4``), or None for
            the last layer whose Grad-CAM explains the class (logged at fit start).
        probes: a ProbeSet, a saved probe file, a probe folder, or None to pick
            ``probe_settings.num_probes`` class-balanced probes from the loaders the trainer uses
            (validation, else training).
        every_n_epochs: 1 evaluates at every validation; N at the first validation, then at the
            first validation at least N epochs after the last evaluation (the others re-log the
            last values, so monitored metrics are never stale).
        probe_settings: how probes are picked from data or read from a folder (:class:`ProbeSettings`).
        cams: what each evaluation computes (:class:`CAMSettings`).
        alerting: the alert rules' thresholds, patience, hysteresis and action (:class:`AlertSettings`).
        pictures: what the pictures show and where they are drawn (:class:`PictureSettings`).
        discovery: mask-free shortcut discovery: True, False, or a DiscoverySettings (false-alarm
            rate ``alpha``, 1e-3 per evaluation).
        on_error: a fault inside the monitor is reported once per kind and training goes on
            ("warn"), or re-raised ("raise").
        log_dir: where alerts.jsonl and PNG files go; default <trainer.log_dir>/cam_monitor.
        name: tells several monitors in one Trainer apart: metrics cam/<name>/..., image tags,
            output folder cam_monitor/<name>/, state key and checkpoint card.
        **flat: the flat keyword arguments of earlier releases (``num_probes=``,
            ``spurious_enrichment=``, ...), deprecated: each warns and names its new spelling.
    """

    def __init__(self, target_layer: str | None = None, probes: ProbeSet | str | Path | None = None, *,
                 every_n_epochs: int = 1, probe_settings: ProbeSettings = ProbeSettings(),
                 cams: CAMSettings = CAMSettings(), alerting: AlertSettings = AlertSettings(),
                 pictures: PictureSettings = PictureSettings(), discovery: bool | DiscoverySettings = True,
                 on_error: OnError = "warn", log_dir: str | None = None, name: str | None = None, **flat: Any) -> None:
        super().__init__()
        if not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        groups = from_flat({"probe_settings": probe_settings, "cams": cams, "alerting": alerting,
                            "pictures": pictures, "discovery": discovery}, flat)
        self.monitor = Monitor(target_layer, probes, **groups, name=name, on_error=on_error,
                               voice=access.rank_zero_voice())
        self.every_n_epochs, self.log_dir, self.target_layer, self.name = every_n_epochs, log_dir, target_layer, name
        self._given = {"target_layer": target_layer, "probes": probes, "every_n_epochs": every_n_epochs, **groups,
                       "discovery": self.monitor.settings.discovery, "on_error": on_error, "log_dir": log_dir,
                       "name": name}
        self._out_dir: Path | None = None
        self._last_eval_key: tuple[int, int] | None = None

    # ---- what the monitor knows, read through the callback -----------------------------------------

    prefix = property(lambda self: self.monitor.prefix, doc="Metric prefix: cam, or cam/<name>.")
    history = property(lambda self: self.monitor.history, doc="One row per evaluation (epoch, step, stage, metrics).")
    alerts = property(lambda self: self.monitor.alerts, doc="The alerts that fired, in order.")
    active_alerts = property(lambda self: self.monitor.active_alerts, doc="The rules whose alert is active now.")
    faults = property(lambda self: self.monitor.faults, doc="Faults so far, by <kind>:<exception type>.")
    probes = property(lambda self: self.monitor.probes, doc="The probe set (None until picked).")
    layer_name = property(lambda self: self.monitor.layer_name, doc="The target layer (picked when None was given).")
    rules = property(lambda self: self.monitor.rules, doc="The alert rules at their thresholds.")
    settings = property(lambda self: self.monitor.settings, doc="What each evaluation computes.")

    reference = property(lambda self: self.monitor.reference, doc="What drift and the reference rules compare with.")
    last_evaluation = property(lambda self: self.monitor.last_evaluation, doc="The latest Evaluation.")

    def inferred_probes(self, min_excess: float = 0.0) -> ProbeSet:
        """The probes with discovery's confirmed regions as spurious masks (:meth:`Monitor.inferred_probes`)."""
        return self.monitor.inferred_probes(min_excess)

    def pin_reference(self) -> None:
        """Use the latest evaluation as the drift reference from now on (instead of the first)."""
        self.monitor.pin_reference()

    def hyperparameters(self) -> dict[str, Any]:
        """The monitor's settings, flat, for the loggers' hyperparameters: ``cam_monitor.<argument>``
        and ``cam_monitor.<group>.<field>`` (``cam_monitor.<name>. ...`` for a named monitor)."""
        return flatten("cam_monitor" if self.name is None else f"cam_monitor.{self.name}", self._given)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name, target_layer=self.target_layer,
                                        methods=self.monitor.settings.methods)

    # ---- Lightning hooks -------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse a clash with another monitor; start a fresh run for ``fit``; open the outputs (rank 0)."""
        if stage == "fit":
            self.monitor.reset()
        self._out_dir = Path(self.log_dir) if self.log_dir else (
            Path(trainer.log_dir or trainer.default_root_dir) / "cam_monitor" / (self.name or ""))
        for other in trainer.callbacks:
            if isinstance(other, CAMMonitor) and other is not self and (
                    other.prefix == self.prefix or other._out_dir == self._out_dir):
                raise ScheduleError(
                    f"two CAMMonitors in one Trainer would log under {self.prefix!r} / write to {self._out_dir}: give "
                    "each a distinct name=, e.g. CAMMonitor(target_layer='layer3', name='layer3')")
        if trainer.is_global_zero:
            folder, prefix = self._out_dir, self.prefix
            self.monitor.open(folder, lambda: access.trainer_sinks(trainer, prefix, folder),
                              background_worker(self.monitor.pictures.background, trainer.strategy.root_device.type))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Finish every queued picture (before Lightning closes the loggers), then close the sinks."""
        self.monitor.close()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A failing fit still gets the pictures of its evaluations (written before its loggers close)."""
        self.monitor.abort()

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before any training step: refuse a schedule that never fires, check the layer, and check
        given (or resumed) probes with one dry pass."""
        access.check_schedule(trainer, pl_module)
        self.monitor.prepare(pl_module, access.placement(trainer, pl_module), stage="fit",
                             runner=access.cam_model(trainer, pl_module))
        for logger in trainer.loggers:
            logger.log_hyperparams(self.hyperparameters())
        if self.monitor.outputs is not None:
            rank_zero_info(f"CAMMonitor{self.monitor.tag}: {self.monitor.outputs.where()}")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probes picked from data are picked here, once the trainer has built its loaders; a resumed
        run's probes are explained here, after every strategy has restored the callback state."""
        self.monitor.explain_resumed_probes()
        for finding in access.schedule_findings(trainer, pl_module):
            access.rank_zero_warn_user(f"CAMMonitor{self.monitor.tag}: {finding}")
        ready = self._prepare(trainer, pl_module, "fit")
        if self.monitor.cams.reference != "fit_start" or self.monitor.reference is not None:
            return
        if not ready:
            raise InputError(
                "CAMMonitor(cams=CAMSettings(reference='fit_start'), probes=None) needs the validation loader before "
                "training, but the Trainer builds it only at the first validation here (check_val_every_n_epoch > 1 "
                "and num_sanity_val_steps=0): pass probes=, or set num_sanity_val_steps > 0")
        self.monitor.start_reference(pl_module, access.placement(trainer, pl_module), access.cam_model(trainer, pl_module))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._prepare(trainer, pl_module, _stage(trainer))

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(trainer, pl_module, "test")

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
        access.rank_zero_warn_user(f"CAMMonitor{self.monitor.tag}: this fit ended without a single evaluation ({why}); "
                                   "nothing was measured, logged or checked")

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Attach the explanation card: the latest aggregates and the active alerts."""
        last = self.history[-1] if self.history else {}
        card = {"name": self.name, "prefix": self.prefix, "target_layer": self.layer_name,
                "epoch": last.get("epoch"), "global_step": last.get("global_step"),
                "metrics": self.monitor.latest_metrics(),
                "active_alerts": self.monitor.active_alerts,
                "alerts": [dict(a) for a in self.alerts]}
        checkpoint.setdefault("cam_monitor_cards", {})[self.state_key] = card

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)

    # ---- when ------------------------------------------------------------------------------------

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> bool:
        """Make the probes ready (loading, or picking from the loader ``stage`` uses) and check them
        once; False if that loader is not built yet (they then come at the first validation)."""
        found = access.probe_loader(trainer, pl_module, stage) if self.monitor.probes is None else None
        loader, which = found or (None, "loader")
        return self.monitor.prepare(pl_module, access.placement(trainer, pl_module), loader, which, stage,
                                    access.cam_model(trainer, pl_module))

    def _due(self, trainer: pl.Trainer, stage: str) -> bool:
        """The one skip test: validate/test evaluate every time; fit follows ``every_n_epochs``."""
        if stage != "fit":
            return True
        if self._last_eval_key == (trainer.current_epoch, trainer.global_step):
            return False
        last = self.monitor.series.last_epoch("fit")
        return last is None or self.every_n_epochs == 1 or trainer.current_epoch - last >= self.every_n_epochs

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Evaluate when due (a stop alert stops every rank at the same step); log the latest metrics."""
        if self.probes is None:
            return
        if self._due(trainer, stage):
            self._last_eval_key = (trainer.current_epoch, trainer.global_step)
            outcome = self.monitor.evaluate(pl_module, access.placement(trainer, pl_module), epoch=trainer.current_epoch,
                                            step=trainer.global_step, stage=stage,
                                            runner=access.cam_model(trainer, pl_module))
            if self.monitor.action == "stop" and trainer.strategy.reduce_boolean_decision(
                    bool(outcome and outcome.stop), all=False):
                trainer.should_stop = True
        for key, value in self.monitor.latest_metrics().items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)


def _stage(trainer: pl.Trainer) -> str:
    """``"validate"`` under ``trainer.validate``, else ``"fit"`` (validation inside fit)."""
    return "validate" if trainer.state.fn == "validate" else "fit"
