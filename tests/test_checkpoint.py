"""GatedModelCheckpoint: best saves wait for the gates, last.ckpt stays the resume point, gate syntax."""
from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

import cam_monitor as cm
from lightning_helpers import fit, quick_monitor


def test_gated_checkpoint_refuses_shortcut_and_keeps_control(tmp_path) -> None:
    gate = {"cam/spurious_enrichment": "<= 1.5"}
    refusing = cm.GatedModelCheckpoint(dirpath=tmp_path / "a", gate=gate, save_last=True)
    fit(tmp_path / "runa", quick_monitor(), epochs=2, callbacks=[refusing], enable_checkpointing=True)
    # no "best" checkpoint while the gate fails, but last.ckpt stays the run's resume point
    assert sorted(p.name for p in (tmp_path / "a").glob("*.ckpt")) == ["last.ckpt"]
    assert refusing.best_model_path == ""
    assert len(refusing.refused) == 2 and "fails '<= 1.5'" in refusing.refused[0][1][0]
    strict = cm.GatedModelCheckpoint(dirpath=tmp_path / "c", gate=gate, save_last=True, gate_last=True)
    fit(tmp_path / "runc", quick_monitor(), epochs=1, callbacks=[strict], enable_checkpointing=True)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.ckpt"))
    keeping = cm.GatedModelCheckpoint(dirpath=tmp_path / "b", gate=gate, monitor="cam/quality", mode="max")
    fit(tmp_path / "runb", quick_monitor(), epochs=3, variant="control", callbacks=[keeping], enable_checkpointing=True)
    assert list((tmp_path / "b").glob("*.ckpt")) and keeping.best_model_path


@pytest.mark.parametrize("condition", ["== 1.5", "<=", "1.5", "< 1.5 and 2", None])
def test_gate_syntax_errors(condition) -> None:
    with pytest.raises(ValueError, match="must look like"):
        cm.GatedModelCheckpoint(gate={"cam/quality": condition})


class LastCheckpointSeen(L.Callback):
    """Notes, at the start of every epoch after the first, whether ``last.ckpt`` exists (mid-run)."""

    def __init__(self, path) -> None:
        self.path, self.seen = path, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch > 0:
            self.seen.append((trainer.current_epoch, self.path.exists()))


@pytest.mark.parametrize("save_last, monitor", [(True, None), ("link", "cam/quality")])
def test_last_ckpt_is_written_during_the_run_wherever_modelcheckpoint_writes_it(tmp_path, save_last, monitor) -> None:
    seen = {}
    for kind in ("lightning", "gated"):
        folder = tmp_path / kind
        kwargs = dict(dirpath=folder, save_last=save_last, monitor=monitor, mode="max")
        ckpt = (ModelCheckpoint(**kwargs) if kind == "lightning"
                else cm.GatedModelCheckpoint(gate={"cam/quality": ">= 2"}, **kwargs))  # never passes
        probe = LastCheckpointSeen(folder / "last.ckpt")
        fit(tmp_path / f"run_{kind}", quick_monitor(), epochs=3, callbacks=[probe, ckpt], enable_checkpointing=True)
        seen[kind] = probe.seen
        if kind == "gated":
            assert len(ckpt.refused) == 3 and sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt"]
            assert not (folder / "last.ckpt").is_symlink()
    assert seen["gated"] == seen["lightning"] == [(1, True), (2, True)]
