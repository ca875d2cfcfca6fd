"""The shortcut zoo: one monitored fit per (cue, variant, seed), with NO masks given to the monitor.

Each task of :data:`~cam_monitor.demo.data.CUES` has a shortcut variant (the cue codes the label)
and a control (the same cue, independent of the label). Ground truth of shortcut use after every
validation: accuracy on test digits with matched cues minus accuracy with random cues. The
monitor sees only mask-free probes picked from the validation data, so whatever it reports it
found by itself. ``benchmarks/bench_zoo.py`` runs the table; the tests run reduced fits.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import lightning as L

from ..callback import CAMMonitor
from ..settings import AlertSettings, PictureSettings
from ..probes import ProbeSet
from .data import make_decoy_digits
from .model import ARCHS, DecoyDigitsDataModule, DigitClassifier
from .run import GAP_LINE, DecoyAccuracy

LAYER = ARCHS["cnn"]


@dataclass
class ZooRecord:
    """What a zoo fit leaves to compare: per-epoch ground truth (``acc_matched``, ``acc_random``,
    ``accuracy_gap``) next to the monitor's history rows, and every alert it raised."""

    cue: str
    variant: str
    seed: int
    rows: list[dict[str, Any]]
    alerts: list[dict[str, Any]]

    @property
    def first_alert_epoch(self) -> int | None:
        return min((a["epoch"] for a in self.alerts), default=None)

    @property
    def confirmed_epoch(self) -> int | None:
        """The first epoch ``shortcut_confirmed`` (the mask-free detector) fired; None if it never did."""
        return min((a["epoch"] for a in self.alerts if a["rule"] == "shortcut_confirmed"), default=None)

    @property
    def gap_epoch(self) -> int | None:
        """The first epoch whose accuracy gap passes :data:`GAP_LINE` (None if it never does)."""
        return next((r["epoch"] for r in self.rows if r["accuracy_gap"] > GAP_LINE), None)


@dataclass
class ZooRun(ZooRecord):
    """One fit: its :class:`ZooRecord`, the monitor and the trained model."""

    monitor: CAMMonitor
    model: DigitClassifier

    @property
    def active_at_end(self) -> bool:
        """Whether ``shortcut_confirmed`` is still active after the last evaluation."""
        return "shortcut_confirmed" in self.monitor.active_alerts


class EvidenceTrace(L.Callback):
    """After each validation, the monitor's evidence streams (:class:`~cam_monitor.evidence.EvidenceState`,
    log of each e-detector) and the evaluation's paired differences per arm, in the order they
    were bet on: what a benchmark needs to replay the run under another statistic (the pairs drawn
    follow each arm's own stream, not the statistic). Listed after the monitor, so it reads the
    evaluation the monitor just made."""

    def __init__(self, monitor: CAMMonitor) -> None:
        self.monitor = monitor
        self.rows: list[dict[str, Any]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        evidence, ev = self.monitor.monitor.evidence, self.monitor.last_evaluation
        found = None if ev is None else ev.discovery
        self.rows.append({"evidence_streams": {} if evidence is None else dict(evidence.log_detector),
                          "evidence_pairs": {} if found is None else {a: d.tolist() for a, d in found.diffs().items()}})


def replayed(rows: list[dict[str, Any]], statistic: Callable[[dict[str, Any]], float],
             alpha: float = 1e-3) -> tuple[int | None, bool]:
    """``shortcut_confirmed`` replayed on a zoo run's rows under another ``statistic`` of their
    recorded evidence (a row, with its ``evidence_streams`` and ``evidence_pairs``, -> the value
    the rule reads): the first epoch it would have fired (above ``1 / alpha``, patience 1) and
    whether it would be active after the last evaluation (it clears at 1). The pairs a run draws
    follow each arm's and class's own stream, never the statistic, so the replay is the run the
    other statistic would have had."""
    first, active = None, False
    for row in rows:
        value = statistic(row)
        if not active and value > 1 / alpha:
            active, first = True, row["epoch"] if first is None else first
        elif active and value <= 1.0:
            active = False
    return first, active


def truth_probes(cue: str, seed: int, num_probes: int = 64, base: str = "digits",
                 degradation: str = "clean") -> ProbeSet:
    """Class-balanced probes from the task's validation split (put through ``degradation``, as
    :func:`~cam_monitor.demo.data.make_decoy_digits` takes it) with their true cue and object
    masks: for benchmarks that score where a mask-free test looked, never for the monitor."""
    data = make_decoy_digits(seed, cue=cue, base=base, degradation=degradation)
    return ProbeSet.from_dataset(data.val, num_probes=num_probes, seed=seed, num_classes=10,
                                 class_names=[str(c) for c in range(10)])


def mask_free_probes(cue: str, seed: int, num_probes: int = 64, base: str = "digits",
                     degradation: str = "clean") -> ProbeSet:
    """The same probes as :func:`truth_probes`, with every mask dropped (what the zoo's monitor sees)."""
    return replace(truth_probes(cue, seed, num_probes, base, degradation), spurious_masks=None, object_masks=None)


def run_task(cue: str, variant: str, seed: int, epochs: int, root: str, *, num_probes: int = 64,
             limit_train_batches: int | float | None = None, arch: str = "cnn", base: str = "digits",
             spurious_masks: bool = False, object_masks: bool = False, degradation: str = "clean",
             **monitor_kwargs: Any) -> ZooRun:
    """Train the demo CNN (or ``arch="resnet18"``) on one zoo task (``cue`` over the ``base`` task,
    every image put through ``degradation``: sensor noise or JPEG, as
    :func:`~cam_monitor.demo.data.make_decoy_digits` takes it) with a mask-free
    :class:`CAMMonitor` on every epoch; with ``spurious_masks`` its probes carry the true cue masks
    (as a user who marked the cue would give them), with ``object_masks`` the true object masks
    (as a user who outlined the objects would)."""
    L.seed_everything(seed, verbose=False)
    data = DecoyDigitsDataModule(variant, seed=seed, cue=cue, base=base, degradation=degradation)
    data.setup()
    accuracy = DecoyAccuracy({"matched": data.data.test_matched, "random": data.data.test_random})
    kwargs = {"target_layer": ARCHS[arch], "alerting": AlertSettings(action="log"),
              "pictures": PictureSettings(every_n_evals=0), **monitor_kwargs}
    probes = mask_free_probes(cue, seed, num_probes, base, degradation)
    if spurious_masks or object_masks:
        truth = truth_probes(cue, seed, num_probes, base, degradation)
        probes = replace(probes, spurious_masks=truth.spurious_masks if spurious_masks else None,
                         object_masks=truth.object_masks if object_masks else None)
    monitor = CAMMonitor(probes=probes, log_dir=f"{root}/cam_monitor", **kwargs)
    trace = EvidenceTrace(monitor)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, deterministic=True, logger=False,
                        callbacks=[accuracy, monitor, trace], enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, default_root_dir=root, num_sanity_val_steps=0,
                        limit_train_batches=limit_train_batches)
    model = DigitClassifier(arch=arch, in_channels=probes.images.shape[1], image_size=probes.image_size[0])
    trainer.fit(model, data)
    rows = [{**acc, **{k: v for k, v in hist.items() if k.startswith("cam/")}, **traced}
            for acc, hist, traced in zip(accuracy.rows, monitor.history, trace.rows, strict=True)]
    return ZooRun(cue, variant, seed, rows, list(monitor.alerts), monitor, model)
