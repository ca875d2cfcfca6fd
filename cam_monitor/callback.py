"""``CAMMonitor``: the Lightning callback that schedules evaluations and wires the pieces.

It only schedules and wires: the engine, metrics, alert rules, rendering and sinks do the work
and know nothing of Lightning. Skip logic lives in :meth:`CAMMonitor._should_evaluate`;
cross-rank decisions go through the strategy; state is CPU tensors and primitives.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden

from .alerts import AlertBook, AlertThresholds, check_rules, resolve_action
from .engine import cam_pass
from .errors import CAMError, InputError, TargetError
from .evaluation import PER_PROBE, Evaluation, evaluate
from .layers import resolve_layer, unwrap_compiled
from .methods import check_methods
from .probes import ProbeSet, _dataset_labels
from .render import figure_to_tensor, filmstrip, metric_curves, probe_tiles, tile_grid
from .sinks import AlertLog, FileSink, Panel, TensorBoardSink, WandbSink

log = logging.getLogger(__name__)

STATE_VERSION = 1
TREND_METRICS = ("spurious_energy", "spurious_enrichment", "object_energy", "drift_ref")
FILMSTRIP_FRAMES = 8


class CAMAlertError(CAMError, RuntimeError):
    """Raised by an alert whose action is ``"raise"``."""


class CAMMonitor(Callback):
    """Grad-CAM on a fixed probe set at every validation: metrics, pictures, alerts.

    Args:
        target_layer: dotted module name inside the LightningModule (e.g. ``"net.layer4"``), or
            ``None`` for the last layer with a spatial 4-D output.
        probes: a :class:`ProbeSet`, a path to a saved probe file or a probe folder, or ``None``
            to pick ``num_probes`` (stratified, seeded by ``probe_seed``) from the validation
            dataset at fit start; the set is then frozen (and saved in checkpoints).
        num_probes: probes to pick when ``probes`` is None.
        every_n_epochs: evaluate when ``current_epoch % every_n_epochs == 0``; other validations
            re-log the last values so monitored metrics are never stale.
        methods: CAM methods computed in the one pass; metrics use the first.
        targets: ``"label"`` (explain the true class) or ``"pred"`` (the predicted class).
        batch_size: probes per CAM chunk, so a large probe set never runs the device out of memory.
        images_every_n_evals: render and send pictures every N-th evaluation (0 = never).
        max_grid_probes: at most this many probes in the pictures.
        filmstrip_probes: the first N probes also get a filmstrip of their maps over the last
            eight evaluations (``cam/filmstrip``); 0 = none.
        tile_size: tile size of the pictures (longer side, px; default 128); ``None`` keeps the
            image size (large grids cost more to encode and send).
        faithfulness: compute ``cam/average_drop`` (one extra forward on image x map).
        border_fraction: width of the default spurious region (a border band) when probes have no
            spurious masks.
        spurious_enrichment / spurious_energy_rise / object_energy_floor / drift_threshold /
            patience / hysteresis: alert rule settings (README, "Alerts").
        alert_action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or ``"package.module:function"``
            (called with the alert dict). Alerts are always logged.
        on_error: ``"warn"`` (a fault in the monitor is reported once per kind and training goes
            on; the next evaluation retries) or ``"raise"``.
        log_dir: where ``alerts.jsonl`` and PNGs go; default ``<trainer.log_dir>/cam_monitor``.
        reference: what drift and the reference rules compare with: ``"first"`` (the first
            evaluation, after the first epoch) or ``"fit_start"`` (the model before its first
            training step, e.g. the pretrained model being fine-tuned).
        mean / std: display normalisation of probes picked from data (un-normalise overlays).
        reshape: ``(h, w)`` of a token layer whose grid is not square.
    """

    def __init__(
        self,
        target_layer: str | None = None,
        probes: ProbeSet | str | None = None,
        num_probes: int = 32,
        every_n_epochs: int = 1,
        methods: Sequence[str] = ("gradcam",),
        targets: str = "label",
        batch_size: int = 64,
        images_every_n_evals: int = 1,
        max_grid_probes: int = 32,
        filmstrip_probes: int = 4,
        tile_size: int | None = 128,
        faithfulness: bool = True,
        border_fraction: float = 0.1,
        spurious_enrichment: float = 4.0,
        spurious_energy_rise: float = 0.15,
        object_energy_floor: float = 0.3,
        drift_threshold: float = 0.5,
        patience: int = 1,
        hysteresis: float = 0.1,
        alert_action: str = "warn",
        on_error: str = "warn",
        log_dir: str | None = None,
        reference: str = "first",
        probe_seed: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        reshape: Sequence[int] | None = None,
        output_transform: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        _check_int("every_n_epochs", every_n_epochs, 1)
        _check_int("num_probes", num_probes, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("images_every_n_evals", images_every_n_evals, 0)
        _check_int("max_grid_probes", max_grid_probes, 1)
        _check_int("filmstrip_probes", filmstrip_probes, 0)
        if tile_size is not None:
            _check_int("tile_size", tile_size, 8)
        if targets not in ("label", "pred"):
            raise ValueError(f"targets must be 'label' or 'pred', got {targets!r}")
        if reference not in ("first", "fit_start"):
            raise ValueError(f"reference must be 'first' or 'fit_start', got {reference!r}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if not 0 < border_fraction < 0.5:
            raise ValueError(f"border_fraction must be in (0, 0.5), got {border_fraction}")
        if target_layer is not None and (not isinstance(target_layer, str) or not target_layer):
            raise ValueError(f"target_layer must be a dotted module name or None, got {target_layer!r}")
        if probes is not None and not isinstance(probes, (ProbeSet, str, Path)):
            raise TypeError(f"probes must be a ProbeSet, a path or None, got {type(probes).__name__}")
        self.target_layer = target_layer
        self.methods = check_methods(tuple(methods) if not isinstance(methods, str) else methods)
        self.thresholds = AlertThresholds(spurious_enrichment, spurious_energy_rise, object_energy_floor,
                                          drift_threshold, patience, hysteresis)
        self.action = resolve_action(alert_action)
        self.alert_action = alert_action
        self._probe_source = probes
        self.probes: ProbeSet | None = probes if isinstance(probes, ProbeSet) else None
        self.num_probes, self.every_n_epochs, self.targets = num_probes, every_n_epochs, targets
        self.batch_size, self.images_every_n_evals = batch_size, images_every_n_evals
        self.max_grid_probes, self.tile_size, self.faithfulness = max_grid_probes, tile_size, faithfulness
        self.filmstrip_probes = filmstrip_probes
        self.border_fraction, self.on_error, self.log_dir = border_fraction, on_error, log_dir
        self.reference_mode = reference
        self.probe_seed = probe_seed
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        self.reshape = None if reshape is None else tuple(reshape)
        self.output_transform = output_transform
        self.book = AlertBook(patience)
        self.alerts: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.per_probe_history: dict[str, torch.Tensor] = {}  # metric -> (evaluations, probes)
        self.filmstrip_maps: torch.Tensor | None = None  # (last <= 8 evaluations, filmstrip probes, h, w)
        self.filmstrip_steps: list[int] = []
        self.reference: Evaluation | None = None
        self.previous_maps: torch.Tensor | None = None
        self.last_evaluation: Evaluation | None = None
        self.faults: dict[str, int] = {}
        self._out_dir: Path | None = None
        self._sinks: list[Any] | None = None
        self._alert_log: AlertLog | None = None
        self._last_eval_key: tuple[int, int] | None = None

    # ---- Lightning plumbing ----------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target_layer=self.target_layer, methods=self.methods)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail fast on a layer name typo, before any data is loaded."""
        if self.target_layer is not None:
            resolve_layer(unwrap_compiled(pl_module), self.target_layer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Freeze the probe set, dry-run one probe through the CAM pass, resolve the output folder."""
        self._out_dir = Path(self.log_dir) if self.log_dir else Path(trainer.log_dir or trainer.default_root_dir) / "cam_monitor"
        if self.probes is None:
            self.probes = self._load_probes(trainer, pl_module)
        first = self.probes.images[:1].to(pl_module.device)
        targets = self.probes.labels[:1].to(pl_module.device) if self.targets == "label" else None
        try:
            result = cam_pass(pl_module, first, self.target_layer, targets, self.methods, reshape=self.reshape,
                              output_transform=self.output_transform)
            self._check_probe_labels(result.logits.shape[1])
        except CAMError as err:
            raise type(err)(f"CAMMonitor check before training failed: {err}") from err
        except Exception as err:  # noqa: BLE001 - e.g. a conv rejecting the probes' channel count
            raise InputError(
                f"CAMMonitor could not run a probe of shape {tuple(self.probes.images.shape[1:])} through "
                f"{type(pl_module).__name__} before training ({type(err).__name__}: {err}); make the probes match "
                "the model's input (channels, size, normalisation)") from err
        if self.reference_mode == "fit_start" and self.reference is None:
            self.reference = self._guarded("reference", lambda: self._evaluate(trainer, pl_module), trainer)
            if self.reference is not None:
                self.previous_maps = self.reference.maps

    def _check_probe_labels(self, num_classes: int) -> None:
        """With ``targets="label"`` every probe label must be a class of the model."""
        if self.targets != "label":
            return
        bad = (self.probes.labels < 0) | (self.probes.labels >= num_classes)
        if bad.any():
            ids = [self.probes.ids[i] for i in bad.nonzero()[:, 0].tolist()][:10]
            raise TargetError(f"target classes {self.probes.labels[bad].unique().tolist()} are out of range for a model "
                              f"with {num_classes} classes (0..{num_classes - 1}): probes {ids}")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fallback when the model has no validation loop: evaluate at the end of the epoch."""
        if self._has_validation(trainer, pl_module):
            return
        self._run(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Attach the explanation card: this evaluation's aggregates and the active alerts."""
        last = self.history[-1] if self.history else None
        card = {"epoch": None if last is None else last["epoch"], "global_step": None if last is None else last["global_step"],
                "metrics": {} if last is None else {k: v for k, v in last.items() if k.startswith("cam/")},
                "active_alerts": sorted(rule for rule, on in self.book.active.items() if on),
                "alerts": [dict(a) for a in self.alerts]}
        checkpoint.setdefault("cam_monitor_cards", {})[self.state_key] = card

    def state_dict(self) -> dict[str, Any]:
        ref = self.reference
        return {
            "version": STATE_VERSION,
            "history": [dict(h) for h in self.history],
            "per_probe_history": dict(self.per_probe_history),
            "filmstrip_maps": self.filmstrip_maps,
            "filmstrip_steps": list(self.filmstrip_steps),
            "alerts": [dict(a) for a in self.alerts],
            "book": self.book.state_dict(),
            "previous_maps": self.previous_maps,
            "reference": None if ref is None else {
                "maps": ref.maps, "aggregates": dict(ref.aggregates), "per_probe": dict(ref.per_probe),
                "epoch": ref.epoch, "global_step": ref.global_step},
            "probes": None if self.probes is None else self.probes.state(),
            "last_eval_key": None if self._last_eval_key is None else list(self._last_eval_key),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"CAMMonitor state version {state.get('version')!r} is not {STATE_VERSION}")
        self.history = [dict(h) for h in state["history"]]
        self.per_probe_history = dict(state["per_probe_history"])
        self.filmstrip_maps = state["filmstrip_maps"]
        self.filmstrip_steps = [int(v) for v in state["filmstrip_steps"]]
        self.alerts = [dict(a) for a in state["alerts"]]
        self.book.load_state_dict(state["book"])
        self.previous_maps = state["previous_maps"]
        self.reference = None
        if state["reference"] is not None:
            r = state["reference"]
            self.reference = Evaluation(r["epoch"], r["global_step"], r["maps"], torch.empty(0), torch.empty(0),
                                        torch.empty(0), dict(r["per_probe"]), dict(r["aggregates"]), 0)
        if state["probes"] is not None:
            self.probes = ProbeSet.from_state(state["probes"], source="CAMMonitor checkpoint state")
        self._last_eval_key = None if state["last_eval_key"] is None else tuple(state["last_eval_key"])

    # ---- scheduling ------------------------------------------------------------------------------

    @staticmethod
    def _has_validation(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether validation runs at all (else the monitor evaluates at the end of each training epoch)."""
        return is_overridden("validation_step", pl_module) and trainer.limit_val_batches != 0

    def _should_evaluate(self, trainer: pl.Trainer) -> bool:
        """The one place that decides whether this validation runs a full evaluation."""
        if trainer.current_epoch % self.every_n_epochs != 0:
            return False
        return self._last_eval_key != (trainer.current_epoch, trainer.global_step)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probes is None:
            return
        if self._should_evaluate(trainer):
            ev = self._guarded("evaluate", lambda: self._evaluate(trainer, pl_module), trainer)
            if ev is not None:
                self._record(trainer, pl_module, ev)
        self._log_metrics(pl_module)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Evaluation:
        world, rank = trainer.world_size, trainer.global_rank
        device = pl_module.device

        def gather(t: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.all_gather(t.to(device)).cpu()

        return evaluate(pl_module, self.probes, self.target_layer, epoch=trainer.current_epoch,
                        global_step=trainer.global_step, methods=self.methods, targets_mode=self.targets,
                        batch_size=self.batch_size, device=device, previous=self.previous_maps,
                        reference=None if self.reference is None else self.reference.maps,
                        faithfulness=self.faithfulness, border_fraction=self.border_fraction,
                        output_transform=self.output_transform, reshape=self.reshape,
                        rank=rank, world=world, gather=gather if world > 1 else None)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ev: Evaluation) -> None:
        """Update history and alert state, then (rank 0) write pictures and alerts, then act."""
        self._last_eval_key = (trainer.current_epoch, trainer.global_step)
        ref = self.reference
        checks = check_rules(ev.aggregates, None if ref is None else ref.aggregates, ev.per_probe,
                             None if ref is None else ref.per_probe, self.probes.ids, self.thresholds)
        events = self.book.update(checks, ev.epoch, ev.global_step)
        ev.aggregates["cam/alerts"] = float(self.book.n_active)
        self.history.append({"epoch": ev.epoch, "global_step": ev.global_step, **ev.aggregates})
        for name in PER_PROBE:
            if name in ev.per_probe:
                row = ev.per_probe[name].float().cpu()[None]
                old = self.per_probe_history.get(name)
                self.per_probe_history[name] = row if old is None else torch.cat([old, row])
        if self.filmstrip_probes:
            frame = ev.maps[None, : self.filmstrip_probes]
            old = self.filmstrip_maps
            self.filmstrip_maps = (frame if old is None else torch.cat([old, frame]))[-FILMSTRIP_FRAMES:]
            self.filmstrip_steps = (self.filmstrip_steps + [ev.global_step])[-FILMSTRIP_FRAMES:]
        self.previous_maps = ev.maps
        if self.reference is None:
            self.reference = ev
        self.last_evaluation = ev
        fired = [e for e in events if e["event"] == "fired"]
        self.alerts.extend({k: v for k, v in e.items() if k != "event"} for e in fired)
        if trainer.is_global_zero:
            n_eval = len(self.history)
            if self.images_every_n_evals and (n_eval - 1) % self.images_every_n_evals == 0:
                self._guarded("render", lambda: self._publish(trainer, ev), trainer)
            for event in events:
                self._guarded("alert_log", lambda e=event: self._write_alert(trainer, e), trainer)
        self._act(trainer, fired)

    def _log_metrics(self, pl_module: pl.LightningModule) -> None:
        """Log the latest aggregates through ``pl_module.log`` (so checkpoints/early stopping see them)."""
        if not self.history:
            return
        for key, value in self.history[-1].items():
            if key.startswith("cam/"):
                pl_module.log(key, float(value), on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    # ---- outputs ---------------------------------------------------------------------------------

    def _sinks_for(self, trainer: pl.Trainer) -> list[Any]:
        if self._sinks is None:
            sinks: list[Any] = []
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    sinks.append(TensorBoardSink(logger.experiment))
                elif isinstance(logger, WandbLogger):
                    sinks.append(WandbSink(logger.experiment))
            if not sinks:
                sinks.append(FileSink(self._out_dir))
            self._sinks = sinks
        return self._sinks

    def _panel(self, ev: Evaluation) -> Panel:
        n = min(len(self.probes), self.max_grid_probes)
        p = self.probes
        spur = p.spurious_masks
        display = p.display_images()
        tiles = probe_tiles(display[:n], ev.maps[:n], ids=p.ids[:n], labels=p.labels[:n].tolist(),
                            preds=ev.preds[:n].tolist(), scores=ev.probs[:n].tolist(),
                            spurious_energy=ev.per_probe["spurious_energy"][:n].tolist(),
                            spurious_masks=None if spur is None else spur[:n],
                            object_masks=None if p.object_masks is None else p.object_masks[:n],
                            class_names=p.class_names, tile_size=self.tile_size)
        steps = [h["global_step"] for h in self.history]
        per_probe = {f"cam/{k}": v[:, :n] for k, v in self.per_probe_history.items() if k in TREND_METRICS}
        trends = figure_to_tensor(metric_curves(steps, per_probe, p.ids[:n])) if per_probe else None
        return Panel(grid=tile_grid(tiles, nrow=8), tiles=tiles, trends=trends, ids=p.ids[:n],
                     labels=p.labels[:n].tolist(), filmstrip=self._filmstrip(display))

    def _filmstrip(self, display: torch.Tensor) -> torch.Tensor | None:
        """One row per filmstrip probe: its overlay at each of the last evaluations."""
        if self.filmstrip_maps is None:
            return None
        p = self.probes
        rows = []
        for j in range(self.filmstrip_maps.shape[1]):
            maps = self.filmstrip_maps[:, j]
            frames = probe_tiles(display[j:j + 1].expand(len(maps), -1, -1, -1), maps,
                                 ids=[p.ids[j]] * len(maps), labels=[int(p.labels[j])] * len(maps),
                                 spurious_masks=None if p.spurious_masks is None else p.spurious_masks[j:j + 1].expand(len(maps), -1, -1),
                                 object_masks=None if p.object_masks is None else p.object_masks[j:j + 1].expand(len(maps), -1, -1),
                                 class_names=p.class_names, tile_size=self.tile_size)
            rows.append(filmstrip(list(frames), [f"step {s}" for s in self.filmstrip_steps]))
        return torch.cat(rows, dim=1)

    def _publish(self, trainer: pl.Trainer, ev: Evaluation) -> None:
        panel = self._panel(ev)
        for sink in self._sinks_for(trainer):
            self._guarded(f"sink:{sink.name}", lambda s=sink: s.log_evaluation(ev, panel), trainer)

    def _write_alert(self, trainer: pl.Trainer, event: dict[str, Any]) -> None:
        if self._alert_log is None:
            self._alert_log = AlertLog(self._out_dir / "alerts.jsonl")
        written = self._alert_log.append(event)
        if self._alert_log.repaired:
            warnings.warn(f"CAMMonitor: dropped a torn last line from {self._alert_log.path} (a process died mid-write)",
                          stacklevel=2)
            self._alert_log.repaired = False
        if written:
            for sink in self._sinks_for(trainer):
                self._guarded(f"sink:{sink.name}", lambda s=sink: s.log_alert(event), trainer)

    def _act(self, trainer: pl.Trainer, fired: list[dict[str, Any]]) -> None:
        """Carry out the alert action; ``stop`` is decided across ranks so every rank stops together."""
        if self.action == "stop":
            stop = trainer.strategy.reduce_boolean_decision(bool(fired), all=False)
            if stop:
                trainer.should_stop = True
        if not fired:
            return
        text = "; ".join(_describe(a) for a in fired)
        if self.action == "warn" and trainer.is_global_zero:
            warnings.warn(f"CAMMonitor alert: {text}", stacklevel=2)
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
            if self.on_error == "raise":
                raise
            key = f"{kind}:{type(err).__name__}"
            self.faults[key] = self.faults.get(key, 0) + 1
            if self.faults[key] == 1:
                warnings.warn(f"CAMMonitor: {kind} failed ({type(err).__name__}: {err}); training goes on, "
                              f"the next evaluation retries (reported once per kind)", stacklevel=2)
            log.debug("CAMMonitor %s failed", kind, exc_info=True)
            return None

    # ---- probes ----------------------------------------------------------------------------------

    def _load_probes(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeSet:
        src = self._probe_source
        if isinstance(src, (str, Path)):
            path = Path(src)
            return ProbeSet.from_folder(path) if path.is_dir() else ProbeSet.load(path)
        dataset = _validation_dataset(trainer, pl_module)
        labels = _dataset_labels(dataset, None)
        n_classes = len(set(labels.tolist()))
        per_class = max(1, math.ceil(self.num_probes / n_classes))
        probes = ProbeSet.from_dataset(dataset, per_class=per_class, seed=self.probe_seed, labels=labels,
                                       mean=self.mean, std=self.std)
        return probes.subset(slice(0, self.num_probes)) if len(probes) > self.num_probes else probes

    def pin_reference(self) -> None:
        """Use the latest evaluation as the drift reference from now on (instead of the first)."""
        if self.last_evaluation is None:
            raise RuntimeError("pin_reference() needs at least one evaluation")
        self.reference = self.last_evaluation


def _validation_dataset(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """The validation dataset (or the training one when there is no validation loop)."""
    source = trainer.datamodule if trainer.datamodule is not None else pl_module
    for hook in ("val_dataloader", "train_dataloader"):
        if is_overridden(hook, source, parent=pl.LightningDataModule if trainer.datamodule is not None else pl.LightningModule):
            loader = getattr(source, hook)()
            loader = loader[0] if isinstance(loader, (list, tuple)) else loader
            return loader.dataset
    raise ValueError("CAMMonitor(probes=None) picks probes from the validation data, but neither the datamodule nor the "
                     "model defines val_dataloader/train_dataloader; pass probes=ProbeSet(...) or a probe file")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _describe(alert: dict[str, Any]) -> str:
    probes = ", ".join(alert["probe_ids"][:5]) or "-"
    return (f"{alert['rule']} ({alert['metric']} = {alert['value']:.3g}, threshold {alert['threshold']:.3g}) "
            f"at epoch {alert['epoch']}, step {alert['global_step']}; probes: {probes}")
