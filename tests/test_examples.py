"""The scripts in examples/ run as documented (on small generated data)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torchvision.io import write_png

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_image_folder(root: Path, per_class: int, size: int = 32) -> None:
    """Two classes told apart by a bright square's position, with a red tag in a corner."""
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["left", "right"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = (torch.rand(3, size, size, generator=g) * 60).to(torch.uint8)
            x0 = 4 if c == 0 else size // 2
            img[:, 8:20, x0:x0 + 10] = 220
            img[0, :4, :4] = 255
            write_png(img, str(root / name / f"{name}_{i}.png"))


def test_imagefolder_example_trains_with_probe_folder(tmp_path) -> None:
    make_image_folder(tmp_path / "data" / "train", per_class=6)
    make_image_folder(tmp_path / "data" / "val", per_class=3)
    make_image_folder(tmp_path / "probes", per_class=2)
    for mask_img in (tmp_path / "probes").rglob("*.png"):
        mask = torch.zeros(1, 32, 32, dtype=torch.uint8)
        mask[0, :4, :4] = 255
        write_png(mask, str(mask_img.with_name(mask_img.stem + ".spurious.png")))
    trainer = load("train_imagefolder").main([
        "--data", str(tmp_path / "data"), "--probes", str(tmp_path / "probes"), "--epochs", "2", "--size", "64",
        "--batch-size", "4", "--out", str(tmp_path / "out")])
    monitor = next(c for c in trainer.callbacks if c.__class__.__name__ == "CAMMonitor")
    assert len(monitor.history) == 2 and len(monitor.probes) == 4 and monitor.probes.spurious_masks.any()
    assert "cam/spurious_enrichment" in trainer.callback_metrics


def test_wandb_example_runs_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monitor = load("wandb_offline").main(["--epochs", "1", "--out", str(tmp_path), "--limit-train-batches", "8"])
    assert monitor.history and list((tmp_path / "wandb").glob("offline-run-*"))


def test_plain_pytorch_loop_example_sees_the_shortcut(tmp_path, capsys) -> None:
    rows = load("plain_pytorch_loop").main(["--epochs", "2", "--out", str(tmp_path)])
    assert len(rows) == 2 and rows[-1]["spurious_enrichment"] > 4.0
    assert "fired=[spurious_enrichment" in capsys.readouterr().out
    assert len(list(tmp_path.glob("probe_grid_*.png"))) == 2 and "spurious_enrichment" in (tmp_path / "alerts.jsonl").read_text()


def test_fabric_example_drives_the_monitor_by_hand(tmp_path) -> None:
    monitor = load("fabric_loop").main(["--epochs", "1", "--out", str(tmp_path)])
    assert [h["epoch"] for h in monitor.history] == [0] and "spurious_enrichment" in {a["rule"] for a in monitor.alerts}
    assert list(tmp_path.glob("probe_grid_e000_*.png")) and (tmp_path / "alerts.jsonl").exists()
