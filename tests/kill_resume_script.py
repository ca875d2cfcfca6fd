"""Run by tests/test_trust.py: a demo fit that can be SIGKILLed mid-epoch and resumed.

Usage: python tests/kill_resume_script.py OUT_DIR run|kill|resume [gated]
- run: 5 epochs uninterrupted; ``kill``: checkpoints every 2 epochs, SIGKILLs itself in the
  middle of epoch 3 (after epoch 2's alert was written); ``resume``: continues from the last
  checkpoint (end of epoch 1) to epoch 5. ``run`` and ``resume`` write result.json.
- gated: the checkpoint is a GatedModelCheckpoint whose gate never passes (every epoch); its
  ``last.ckpt`` (end of epoch 2) is the resume point.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import cam_monitor as cm  # noqa: E402
from lightning_helpers import fit, quick_monitor  # noqa: E402


class KillMidEpoch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 3 and batch_idx == 4:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    warnings.filterwarnings("ignore")
    # the model is at chance at the first evaluation (no rule judges it), so the shortcut alert fires at the third
    monitor = quick_monitor(alerting=cm.AlertSettings(action="log", patience=2),
                            pictures=cm.PictureSettings(tile_size=32))
    if sys.argv[3:] == ["gated"]:
        ckpt = cm.GatedModelCheckpoint(dirpath=out / "ckpt", save_last=True, gate={"cam/quality": ">= 2"})
    else:
        ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_epochs=2, save_top_k=-1, save_last=True)
    callbacks = [ckpt] + ([KillMidEpoch()] if mode == "kill" else [])
    last = out / "ckpt" / "last.ckpt"
    fit(out, monitor, epochs=5, callbacks=callbacks, enable_checkpointing=True,
        ckpt_path=str(last) if mode == "resume" else None)
    (out / "result.json").write_text(json.dumps({"history": monitor.history, "alerts": monitor.alerts}))


if __name__ == "__main__":
    main()
