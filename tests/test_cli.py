"""The ``cam-monitor`` command: the demo runs end to end and writes what the README promises."""
from __future__ import annotations

import json

import pytest

from cam_monitor.cli import main


def test_demo_writes_overlays_and_summary(tmp_path, capsys) -> None:
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path), "--per-class", "1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["before"]) == {"spurious_enrichment", "spurious_energy", "object_energy"}
    assert summary["after"]["spurious_enrichment"] > 0
    assert (tmp_path / "probes_before.png").stat().st_size > 1000
    assert (tmp_path / "probes_after.png").stat().st_size > 1000
    assert "spurious_enrichment" in capsys.readouterr().out


def test_no_subcommand_prints_usage_and_fails(capsys) -> None:
    assert main([]) == 2
    assert "cam-monitor demo" in capsys.readouterr().err


def test_demo_rejects_bad_epochs() -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])


def test_lightning_cli_config_wires_the_callback(tmp_path) -> None:
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    with pytest.warns(UserWarning, match="CAMMonitor alert"):
        main(["fit", "--config", str(config), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "8",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger.init_args.save_dir", str(tmp_path)])
    alerts = list(tmp_path.rglob("cam_monitor/alerts.jsonl"))
    assert len(alerts) == 1 and "spurious_enrichment" in alerts[0].read_text()
    assert not list(tmp_path.rglob("*.ckpt"))  # the gate refused the shortcut model's checkpoint
