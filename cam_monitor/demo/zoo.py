"""The shortcut zoo: one monitored fit per (cue, variant, seed), with NO masks given to the monitor.

Each task of :data:`~cam_monitor.demo.data.CUES` has a shortcut variant (the cue codes the label)
and a control (the same cue, independent of the label). Ground truth of shortcut use after every
validation: accuracy on test digits with matched cues minus accuracy with random cues. The
monitor sees only mask-free probes picked from the validation data, so whatever it reports it
found by itself. ``benchmarks/bench_zoo.py`` runs the table; the tests run reduced fits.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

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


def truth_probes(cue: str, seed: int, num_probes: int = 64, base: str = "digits") -> ProbeSet:
    """Class-balanced probes from the task's validation split with their true cue and object
    masks: for benchmarks that score where a mask-free test looked, never for the monitor."""
    data = make_decoy_digits(seed, cue=cue, base=base)
    return ProbeSet.from_dataset(data.val, num_probes=num_probes, seed=seed, num_classes=10,
                                 class_names=[str(c) for c in range(10)])


def mask_free_probes(cue: str, seed: int, num_probes: int = 64, base: str = "digits") -> ProbeSet:
    """The same probes as :func:`truth_probes`, with every mask dropped (what the zoo's monitor sees)."""
    return replace(truth_probes(cue, seed, num_probes, base), spurious_masks=None, object_masks=None)


def run_task(cue: str, variant: str, seed: int, epochs: int, root: str, *, num_probes: int = 64,
             limit_train_batches: int | float | None = None, arch: str = "cnn", base: str = "digits",
             **monitor_kwargs: Any) -> ZooRun:
    """Train the demo CNN (or ``arch="resnet18"``) on one zoo task (``cue`` over the ``base`` task)
    with a mask-free :class:`CAMMonitor` on every epoch."""
    L.seed_everything(seed, verbose=False)
    data = DecoyDigitsDataModule(variant, seed=seed, cue=cue, base=base)
    data.setup()
    accuracy = DecoyAccuracy({"matched": data.data.test_matched, "random": data.data.test_random})
    kwargs = {"target_layer": ARCHS[arch], "alerting": AlertSettings(action="log"),
              "pictures": PictureSettings(every_n_evals=0), **monitor_kwargs}
    probes = mask_free_probes(cue, seed, num_probes, base)
    monitor = CAMMonitor(probes=probes, log_dir=f"{root}/cam_monitor", **kwargs)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, deterministic=True, logger=False,
                        callbacks=[accuracy, monitor], enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, default_root_dir=root, num_sanity_val_steps=0,
                        limit_train_batches=limit_train_batches)
    model = DigitClassifier(arch=arch, in_channels=probes.images.shape[1], image_size=probes.image_size[0])
    trainer.fit(model, data)
    rows = [{**acc, **{k: v for k, v in hist.items() if k.startswith("cam/")}}
            for acc, hist in zip(accuracy.rows, monitor.history)]
    return ZooRun(cue, variant, seed, rows, list(monitor.alerts), monitor, model)
