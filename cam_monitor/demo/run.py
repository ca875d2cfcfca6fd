"""``cam-monitor demo``: the monitor catching a Clever Hans model, in about a minute on a CPU.

Trains the small CNN twice on Decoy Digits: once where the corner pattern codes the label
(shortcut) and once where it is random (control). Two monitors explain the same probes at every
epoch: the default one is given NO masks and must find the decoy by itself (mask-free discovery
and paste confirmation); the ``masked`` one knows where the decoy is and is the ground truth beside
it. Prints one table per run, writes ``summary.json``, ``summary.png`` and the logger's files under
``--out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib.pyplot as plt
import torch

from ..atomic import atomic_path
from ..alerts import describe_alert, rule_threshold
from ..callback import CAMMonitor
from ..settings import AlertSettings, PictureSettings
from ..probes import ProbeSet
from ..render import probe_tiles, tile_grid
from .data import DecoySplit, make_decoy_digits
from .model import DecoyDigitsDataModule, DigitClassifier

LAYER = "net.features"
RUNS = ("shortcut", "control")
GAP_LINE = 0.2


class DecoyAccuracy(L.Callback):
    """After each validation, accuracy on the test digits with matched, random and no decoys.

    The model is already in eval mode during validation; this forward runs under ``no_grad``
    and changes nothing, so it does not alter training.
    """

    def __init__(self, splits: dict[str, DecoySplit]) -> None:
        self.splits = splits
        self.rows: list[dict[str, float]] = []

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        acc = {}
        for name, split in self.splits.items():
            preds = pl_module(split.images.to(pl_module.device)).argmax(1).cpu()
            acc[f"acc_{name}"] = float((preds == split.labels).float().mean())
        acc["accuracy_gap"] = acc["acc_matched"] - acc["acc_random"]
        self.rows.append({"epoch": trainer.current_epoch, **acc})
        for key, value in acc.items():
            pl_module.log(f"decoy/{key}", value, on_epoch=True, batch_size=1)


class FirstAlertEvaluation(L.Callback):
    """Keeps the monitor's evaluation at its first alert (or its last one), for the summary figure.
    Listed after the monitor, so it runs once the monitor has evaluated."""

    def __init__(self, monitor: CAMMonitor) -> None:
        self.monitor = monitor
        self.evaluation = None
        self._alerted = False  # whether an alert had fired before the latest evaluation

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if not self._alerted:
            self.evaluation = self.monitor.last_evaluation
        self._alerted = bool(self.monitor.alerts)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cam-monitor demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6, help="epochs per run (default 6)")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--logger", choices=("tensorboard", "wandb", "csv"), default="tensorboard",
                   help="where pictures and scalars go (default tensorboard; wandb runs offline unless WANDB_MODE=online)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=6,
                   help="probes per class (default 6: the mask-free discovery wants about 64 probes, README)")
    p.add_argument("--limit-train-batches", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bar")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.per_class < 1:
        p.error("--per-class must be >= 1")
    return args


def make_logger(kind: str, out: Path, run: str) -> Any:
    """The Lightning logger for one run, writing under ``out``."""
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger
        return TensorBoardLogger(str(out), name=run, version="")
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger
        return CSVLogger(str(out), name=run, version="")
    from lightning.pytorch.loggers import WandbLogger
    return WandbLogger(project="cam-monitor-demo", name=run, save_dir=str(out),
                       offline=os.environ.get("WANDB_MODE", "offline") != "online")


def train_run(run: str, args: argparse.Namespace, probes: ProbeSet, out: Path) -> dict[str, Any]:
    """One fit with the mask-free monitor and the masked one; returns per-epoch rows, alerts and monitors."""
    L.seed_everything(args.seed, verbose=False)
    data = DecoyDigitsDataModule(run, seed=args.seed)
    data.setup()
    splits = {"matched": data.data.test_matched, "random": data.data.test_random, "none": data.data.test_none}
    accuracy = DecoyAccuracy(splits)
    monitor = CAMMonitor(LAYER, replace(probes, spurious_masks=None, object_masks=None),
                         pictures=PictureSettings(tile_size=96), alerting=AlertSettings(action="log"),
                         log_dir=str(out / run / "cam_monitor"))
    masked = CAMMonitor(LAYER, probes, name="masked", pictures=PictureSettings(every_n_evals=0),
                        alerting=AlertSettings(action="log"), discovery=False,
                        log_dir=str(out / run / "cam_monitor_masked"))
    shown = FirstAlertEvaluation(monitor)
    accelerator = {"cuda": "gpu"}.get(args.device, args.device)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator=accelerator, devices=1, deterministic=True,
                        logger=make_logger(args.logger, out, run), callbacks=[accuracy, monitor, masked, shown],
                        enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=5,
                        enable_progress_bar=not args.no_progress, default_root_dir=str(out / run),
                        limit_train_batches=args.limit_train_batches)
    model = DigitClassifier()
    print(f"\n=== {run} run: the decoy {'codes the label' if run == 'shortcut' else 'is random'} in training ===")
    trainer.fit(model, data)
    if args.logger == "wandb":
        import wandb
        wandb.finish()
    rows = []
    for acc, hist, truth in zip(accuracy.rows, monitor.history, masked.history):
        rows.append({**acc, **{k: v for k, v in {**hist, **truth}.items() if k.startswith("cam/") or k == "global_step"}})
    return {"epochs": rows, "alerts": monitor.alerts, "masked_alerts": masked.alerts, "monitor": monitor,
            "masked": masked, "model": model, "shown": shown.evaluation}


def first_epoch(rows: list[dict[str, Any]], test) -> int | None:
    return next((r["epoch"] for r in rows if test(r)), None)


def print_table(run: str, result: dict[str, Any]) -> None:
    print(f"\n{run} run")
    print(f"{'':>28} {'mask-free monitor':^31} | {'masked monitor (truth)':^22}")
    print(f"{'epoch':>5} {'acc matched':>11} {'acc random':>10} {'evidence':>9} {'flips':>6} {'control':>7} "
          f"{'alerts':>7} | {'enrichment':>10} {'object E':>8}  alert regions")
    alerts_by_epoch: dict[int, list[str]] = {}
    for a in result["alerts"]:
        where = "; ".join(f"class {g['class']} {tuple(g['boxes'][0])}" for g in a.get("regions", [])[:2])
        alerts_by_epoch.setdefault(a["epoch"], []).append(f"{a['rule']}: {where}" if where else a["rule"])
    for r in result["epochs"]:
        print(f"{r['epoch']:>5} {r['acc_matched']:>11.3f} {r['acc_random']:>10.3f} {r['cam/shortcut_evidence']:>9.3g} "
              f"{r['cam/shortcut_flip_rate']:>6.2f} {r['cam/shortcut_flip_control']:>7.2f} {r['cam/alerts']:>7.0f} | "
              f"{r['cam/masked/spurious_enrichment']:>10.2f} {r.get('cam/masked/object_energy', float('nan')):>8.3f}  "
              f"{', '.join(alerts_by_epoch.get(r['epoch'], [])) or '-'}")


def summary_figure(results: dict[str, dict[str, Any]], probes: ProbeSet, threshold: float, path: Path) -> None:
    """Overlays of the same probes for both runs (at the shortcut run's first mask-free alert, with
    the regions it inferred), and the curves that tell the runs apart."""
    pick = _probes_to_show(probes, results["shortcut"]["shown"])
    sub = probes.subset(pick)
    fig = plt.figure(figsize=(14, 8.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.25, 1])
    for col, run in enumerate(RUNS):
        ev = results[run]["shown"]
        inferred = None if ev.discovery is None else ev.discovery.found_masks(
            ev.evidence, len(probes), probes.image_size)[pick]
        tiles = probe_tiles(sub.display_images(), ev.maps[pick], ids=[str(int(c)) for c in sub.labels],
                            labels=sub.labels.tolist(), preds=ev.preds[pick].tolist(),
                            spurious_masks=sub.spurious_masks, inferred_masks=inferred, tile_size=96)
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(tile_grid(tiles, nrow=5).permute(1, 2, 0).numpy())
        n_alerts = len(results[run]["alerts"])
        ax.set_title(f"{run} run, epoch {ev.epoch} ({n_alerts} mask-free alert{'s' if n_alerts != 1 else ''})\n"
                     "magenta: region found without masks; red: the true decoy", fontsize=10)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, 0])
    for run, style in zip(RUNS, ("-o", "-s")):
        rows = results[run]["epochs"]
        ax.plot([r["epoch"] for r in rows], [r["cam/shortcut_evidence"] for r in rows], style,
                label=f"{run} (no masks)")
        for a in results[run]["alerts"]:
            ax.axvline(a["epoch"], color="red", alpha=0.3)
    ax.axhline(threshold, color="red", ls="--", label=f"alert threshold 1/alpha = {threshold:g}")
    ax.set_yscale("log")
    ax.set(title="shortcut evidence accumulated over the run (e-detector)", xlabel="epoch")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[1, 1])
    for run, style in zip(RUNS, ("-o", "-s")):
        rows = results[run]["epochs"]
        ax.plot([r["epoch"] for r in rows], [r["accuracy_gap"] for r in rows], style, label=run)
    ax.axhline(GAP_LINE, color="grey", ls=":", label=f"gap {GAP_LINE}")
    ax.set(title="ground truth: accuracy(matched decoy) - accuracy(random decoy)", xlabel="epoch")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _probes_to_show(probes: ProbeSet, ev: Any, n: int = 10) -> list[int]:
    """Up to ``n`` probes whose region the discovery confirmed at ``ev``, then one per class to fill."""
    found = [] if ev is None or ev.discovery is None else [
        p for p, excess in sorted(ev.discovery.excess().items()) if excess > 0]
    rest = [i for i in _one_per_class(probes) if i not in found]
    return (found[:n] + rest)[:n]


def _one_per_class(probes: ProbeSet) -> list[int]:
    seen: dict[int, int] = {}
    for i, label in enumerate(probes.labels.tolist()):
        seen.setdefault(label, i)
    return [seen[c] for c in sorted(seen)]


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON written to ``summary.json`` (no tensors, no monitor objects)."""
    out = {}
    for run, res in results.items():
        rows = res["epochs"]
        out[run] = {
            "epochs": rows, "alerts": res["alerts"], "masked_alerts": res["masked_alerts"],
            "accuracy_gap": rows[-1]["accuracy_gap"] if rows else None,
            "first_alert_epoch": min((a["epoch"] for a in res["alerts"]), default=None),
            "gap_passes_0.2_epoch": first_epoch(rows, lambda r: r["accuracy_gap"] > GAP_LINE),
        }
    return out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|does not have many workers|logging interval).*")
    start = time.perf_counter()
    data = make_decoy_digits(args.seed)
    probes = ProbeSet.from_dataset(data.val, per_class=args.per_class, seed=args.seed, num_classes=10,
                                   class_names=[str(c) for c in range(10)])
    results = {run: train_run(run, args, probes, out) for run in RUNS}
    for run in RUNS:
        print_table(run, results[run])
    summary = summarise(results)
    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    threshold = rule_threshold(results["shortcut"]["monitor"].rules, "shortcut_confirmed")
    summary_figure(results, probes, threshold, out / "summary.png")
    s, c = summary["shortcut"], summary["control"]
    print(f"\nshortcut: first mask-free alert at epoch {s['first_alert_epoch']}, accuracy gap passes {GAP_LINE} at epoch "
          f"{s['gap_passes_0.2_epoch']} (final gap {s['accuracy_gap']:.3f}); control: {len(c['alerts'])} mask-free alerts "
          f"(final gap {c['accuracy_gap']:.3f})")
    for alert in s["alerts"][:1]:
        print(f"the shortcut run's first alert: {describe_alert(alert)}")
    print(f"wrote {out / 'summary.json'} and {out / 'summary.png'} in {time.perf_counter() - start:.0f} s")
    if args.logger == "tensorboard":
        print(f"dashboard: tensorboard --logdir {out}")
    return 0
