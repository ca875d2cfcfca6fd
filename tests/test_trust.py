"""Trust suite: the monitor never changes training, does not leak, survives faults, loses nothing.

Each test here backs one line of docs/guarantees.md.
"""
from __future__ import annotations

import gc
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

import cam_monitor as cm
from cam_monitor.demo.model import DigitClassifier
from lightning_helpers import fit, quick_monitor

ROOT = Path(__file__).resolve().parents[1]


class BNDropoutNet(DigitClassifier):
    """The demo CNN (BatchNorm) with a Dropout before the head: RNG is consumed in training."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.drop(self.net.pool(self.net.features(x)).flatten(1)))


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def run_training(tmp_path: Path, with_monitor: bool, **trainer_kwargs):
    recorder = LossRecorder()
    monitor = quick_monitor(cams=cm.CAMSettings(methods=("gradcam", "gradcam++"), faithfulness=True)) if with_monitor else None
    L.seed_everything(0, verbose=False)
    model = BNDropoutNet()
    trainer, model = fit(tmp_path, monitor, epochs=2, model=model, callbacks=[recorder], **trainer_kwargs)
    return model, trainer.optimizers[0].state_dict(), recorder.losses, monitor


def assert_same_tree(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"differs at {path}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"differs at {path}: {a} != {b}"


@pytest.mark.parametrize("schedule", [
    {},
    {"val_check_interval": 0.5, "accumulate_grad_batches": 2},
], ids=["every-epoch", "mid-epoch-validation-during-accumulation"])
def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path, schedule) -> None:
    torch.use_deterministic_algorithms(True)
    try:
        off = run_training(tmp_path / "off", False, **schedule)
        on = run_training(tmp_path / "on", True, **schedule)
    finally:
        torch.use_deterministic_algorithms(False)
    model_off, opt_off, losses_off, _ = off
    model_on, opt_on, losses_on, monitor = on
    assert monitor.history, "the monitor must actually have run"
    if schedule:
        assert len(monitor.history) == 4  # two validations per epoch, mid-accumulation included
    assert_same_tree(model_off.state_dict(), model_on.state_dict())  # weights and BatchNorm buffers
    assert_same_tree(opt_off, opt_on)
    assert losses_off == losses_on and len(losses_on) == 16


def live_tensors() -> int:
    gc.collect()
    count = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                count += 1
        except ReferenceError:
            pass
    return count


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Soak(L.Callback):
    """Samples live tensors and RSS after evaluations 60 and 200 (after the first three picture sets
    have filled the bounded caches of matplotlib, PIL and the allocator), each once the background
    worker has drained: both are picture evaluations, and a picture still in flight holds its
    tensors for as long as the worker's thread happens to take (without the drain it failed two
    runs of four with one thread)."""

    def __init__(self, monitor: cm.CAMMonitor) -> None:
        self.monitor, self.samples = monitor, {}

    def on_validation_end(self, trainer, pl_module) -> None:
        n = len(self.monitor.history)
        if n in (60, 200) and n not in self.samples:
            self.monitor.monitor.outputs.publisher.drain()
            self.samples[n] = (live_tensors(), rss_mb())


@pytest.mark.slow
def test_soak_200_evaluations_leave_no_hooks_tensors_or_memory_behind(tmp_path) -> None:
    # the worker, as on a GPU: its own malloc arena is what used to grow
    monitor = quick_monitor(probe_settings=cm.ProbeSettings(num_probes=10),
                            pictures=cm.PictureSettings(every_n_evals=20, tile_size=32, background=True))
    soak = Soak(monitor)
    trainer, model = fit(tmp_path, monitor, epochs=200, callbacks=[soak], limit_train_batches=1, limit_val_batches=1,
                         deterministic=False)
    assert len(monitor.history) == 200
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name!r}"
        assert not module._backward_hooks, f"backward hook left on {name!r}"
    (t60, r60), (t200, r200) = soak.samples[60], soak.samples[200]
    assert t200 - t60 <= 5, f"live tensors grew from {t60} to {t200}"
    assert r200 - r60 < 60, f"resident memory grew {r200 - r60:.0f} MB over 140 evaluations"


KILL_SCRIPT = ROOT / "tests" / "kill_resume_script.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(KILL_SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    straight = run_script(str(tmp_path / "straight"), "run")
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_script(str(tmp_path / "job"), "kill")
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    alerts = tmp_path / "job" / "cam_monitor" / "alerts.jsonl"
    lines_before = alerts.read_text().splitlines()
    assert lines_before, "the killed run had written its alert before dying"
    with open(alerts, "a") as f:
        f.write('{"event": "fired", "epoch": 3, "glo')  # what a kill in the middle of a write leaves
    resumed = run_script(str(tmp_path / "job"), "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((tmp_path / "straight" / "result.json").read_text())
    b = json.loads((tmp_path / "job" / "result.json").read_text())
    assert b["history"] == a["history"] and b["alerts"] == a["alerts"] and len(a["history"]) == 5
    lines = alerts.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # the torn line was dropped: every line parses
    assert len(lines) == len(set(lines))  # no event written twice across the kill
    straight_events = [json.loads(line) for line in
                       (tmp_path / "straight" / "cam_monitor" / "alerts.jsonl").read_text().splitlines()]
    assert events == straight_events  # the same events (fired and cleared) as the uninterrupted run
    # the same kill under a checkpoint whose gate never passes: last.ckpt is there to resume from
    gated = tmp_path / "gated"
    assert run_script(str(gated), "kill", "gated").returncode == -9
    assert not list((gated / "ckpt").glob("epoch=*.ckpt")) and (gated / "ckpt" / "last.ckpt").exists()
    assert run_script(str(gated), "resume", "gated").returncode == 0
    assert json.loads((gated / "result.json").read_text())["history"] == a["history"]


class NaNOnce(DigitClassifier):
    """Returns NaN logits in eval mode during the first epoch (a numerically broken model)."""

    def __init__(self) -> None:
        super().__init__()
        self.poisoned = 0

    def forward(self, x):
        out = super().forward(x)
        if not self.training and self.trainer.current_epoch == 0:
            self.poisoned += 1
            return out * float("nan")
        return out


def test_nan_model_output_is_reported_once_and_next_evaluation_retries(tmp_path) -> None:
    monitor = quick_monitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, model = fit(tmp_path, monitor, epochs=3, model=NaNOnce())
    reports = [w for w in caught if "NaN or inf" in str(w.message)]
    assert len(reports) == 1 and monitor.faults == {"evaluate:NonFiniteOutputError": 1}
    assert [h["epoch"] for h in monitor.history] == [1, 2] and trainer.current_epoch == 3


def test_unwritable_log_dir_is_reported_once_and_training_completes(tmp_path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the log folder should be")
    monitor = quick_monitor(log_dir=str(blocker / "cam_monitor"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, monitor, epochs=2)
    assert trainer.current_epoch == 2 and len(monitor.history) == 2
    kinds = sorted(monitor.faults)
    assert kinds and all(k.startswith(("alert_log:", "sink:files:", "render:")) for k in kinds)
    reported = [w for w in caught if "CAMMonitor:" in str(w.message) and "failed" in str(w.message)]
    assert len(reported) == len(kinds)  # once per kind, although each evaluation hit it


def test_full_disk_for_alert_log_is_reported_once(tmp_path, monkeypatch) -> None:
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cam_monitor.sinks.alert_log.os.fsync", no_space)
    monitor = quick_monitor(alerting=cm.AlertSettings(action="log", spurious_enrichment=1.0, patience=1))
    with pytest.warns(UserWarning, match="No space left on device"):
        trainer, _ = fit(tmp_path, monitor, epochs=2)
    assert trainer.current_epoch == 2 and monitor.faults.get("alert_log:OSError", 0) >= 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_tensorboard_server_serves_probe_grids_and_cam_scalars(tmp_path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    fit(tmp_path, quick_monitor(pictures=cm.PictureSettings(tile_size=32)), epochs=2, logger=TensorBoardLogger(str(tmp_path / "tb"), name="run"))
    port = free_port()
    tb = ROOT / ".venv" / "bin" / "tensorboard"
    exe = [str(tb)] if tb.exists() else [sys.executable, "-m", "tensorboard.main"]
    server = subprocess.Popen([*exe, "--logdir", str(tmp_path / "tb"), "--host", "127.0.0.1", "--port", str(port),
                               "--load_fast", "false"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        images: dict = {}
        while time.time() < deadline:
            try:
                images = get_json(f"{base}/data/plugin/images/tags")
                if images:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        run = next(iter(images))
        assert {"cam/probe_grid", "cam/filmstrip"} <= set(images[run])
        scalars = get_json(f"{base}/data/plugin/scalars/tags")
        assert {"cam/spurious_enrichment", "cam/quality", "cam/drift_ref"} <= set(scalars[run])
        assert any(tag.startswith("cam_probes/spurious_energy/") for tag in scalars[run])  # the per-probe curves
        series = get_json(f"{base}/data/plugin/images/images?run={run}&tag=cam/probe_grid&sample=0")
        assert len(series) == 2
        with urllib.request.urlopen(f"{base}/data/plugin/images/individualImage?{series[-1]['query']}", timeout=5) as r:
            assert r.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_source_has_no_eval_exec_yaml_load_or_unsafe_torch_load() -> None:
    offenders = []
    for path in (ROOT / "cam_monitor").rglob("*.py"):
        text = path.read_text()
        for pattern in (r"(?<![\w.])eval\(", r"(?<![\w.])exec\(", r"yaml\.load\(", r"pickle\.loads?\(", r"torch\.load\((?![^)]*weights_only=True)"):
            for match in re.finditer(pattern, text):
                offenders.append(f"{path.name}: {match.group(0)}")
    assert offenders == []


def test_monitor_opens_no_network_connection(tmp_path, monkeypatch) -> None:
    attempts = []
    real_connect = socket.socket.connect

    def spy(self, address):
        attempts.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", spy)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: attempts.append(a) or None)
    from lightning.pytorch.loggers import TensorBoardLogger

    fit(tmp_path, quick_monitor(), epochs=1, logger=TensorBoardLogger(str(tmp_path)))
    assert attempts == []
