"""CAMMonitor with Weights & Biases: overlays, a per-probe table and alerts in the W&B run.

    python examples/wandb_offline.py [--epochs 3] [--out runs/wandb]

Runs offline by default (``WANDB_MODE=offline``; ``wandb sync <run dir>`` uploads later); set
``WANDB_MODE=online`` after ``wandb login`` to stream live.
"""
from __future__ import annotations

import argparse
import os

import lightning as L
import wandb
from lightning.pytorch.loggers import WandbLogger

import cam_monitor as cm
from cam_monitor.demo.model import DecoyDigitsDataModule, DigitClassifier


def main(argv: list[str] | None = None) -> cm.CAMMonitor:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", default="runs/wandb")
    p.add_argument("--limit-train-batches", type=int, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")

    logger = WandbLogger(project="cam-monitor-example", save_dir=args.out)
    monitor = cm.CAMMonitor("net.features", probe_settings=cm.ProbeSettings(num_probes=20))
    trainer = L.Trainer(max_epochs=args.epochs, logger=logger, callbacks=[monitor], default_root_dir=args.out,
                        limit_train_batches=args.limit_train_batches, enable_checkpointing=False)
    trainer.fit(DigitClassifier(), DecoyDigitsDataModule("shortcut"))
    wandb.finish()
    print(f"alerts: {[a['rule'] for a in monitor.alerts]}; run files under {args.out}/wandb")
    return monitor


if __name__ == "__main__":
    main()
