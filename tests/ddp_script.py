"""Run by tests/test_ddp.py in a subprocess: a 2-process CPU DDP fit with CAMMonitor.

Usage: python tests/ddp_script.py OUT_DIR ACTION
Each rank writes rank<r>.json (its step, epoch, monitor history and alerts); rank 0 also writes
the final weights and the monitor state so the test can recompute the metrics in one process.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import cam_monitor as cm  # noqa: E402

from lightning_helpers import quick_monitor  # noqa: E402
from cam_monitor.demo.model import DecoyDigitsDataModule, DigitClassifier  # noqa: E402
from cam_monitor.discovery import DiscoverySettings  # noqa: E402


class EvidenceBefore(L.Callback):
    """Keeps the monitor's evidence as it stood before each evaluation: the arms' shares of the
    paste tests follow it, so a single-process replay of the last evaluation needs it."""

    def __init__(self, monitor: cm.CAMMonitor) -> None:
        self.monitor, self.state = monitor, None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evidence = self.monitor.monitor.evidence
        self.state = None if evidence is None else evidence.state_dict()


def main() -> None:
    out, action = Path(sys.argv[1]), sys.argv[2]
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    # discovery with low minimums, so its rates are defined on 15 probes and can be compared
    monitor = quick_monitor(discovery=DiscoverySettings(box_cells=1), probe_settings=cm.ProbeSettings(num_probes=15),
                            cams=cm.CAMSettings(batch_size=4), alerting=cm.AlertSettings(action=action),
                            pictures=cm.PictureSettings(tile_size=32))
    before = EvidenceBefore(monitor)
    # the model beats chance on the probes from epoch 2 (when the rules start judging): "stop" gets a 4th epoch to skip
    epochs = 4 if action == "stop" else 3
    trainer = L.Trainer(callbacks=[before, monitor], accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs, limit_train_batches=4,
                        limit_val_batches=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out))
    model = DigitClassifier()
    trainer.fit(model, DecoyDigitsDataModule("shortcut", batch_size=32))
    rank = trainer.global_rank
    record = {"rank": rank, "world": trainer.world_size, "global_step": trainer.global_step,
              "epoch": trainer.current_epoch, "history": monitor.history, "alerts": monitor.alerts,
              "pid": os.getpid(), "faults": monitor.faults}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        torch.save({"model": model.state_dict(), "monitor": monitor.state_dict(), "evidence_before_last": before.state},
                   out / "final.pt")


if __name__ == "__main__":
    main()
