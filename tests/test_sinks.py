"""Sinks: W&B offline run contents and the durable alert log."""
from __future__ import annotations

import json

import pytest

from cam_monitor.sinks import AlertLog
from lightning_helpers import fit, quick_monitor


def event(step: int, rule: str = "spurious_enrichment", kind: str = "fired") -> dict:
    return {"event": kind, "epoch": step // 10, "global_step": step, "rule": rule, "metric": "cam/x",
            "value": 5.0, "threshold": 4.0, "probe_ids": ["a"]}


def test_alert_log_appends_flushed_lines_and_skips_duplicates(tmp_path) -> None:
    log = AlertLog(tmp_path / "x" / "alerts.jsonl")
    assert log.append(event(10)) and log.append(event(20)) and not log.append(event(10))
    again = AlertLog(tmp_path / "x" / "alerts.jsonl")  # a resumed process
    assert not again.append(event(20)) and again.append(event(20, kind="cleared"))
    assert [e["global_step"] for e in again.read()] == [10, 20, 20]


def test_alert_log_drops_a_torn_last_line(tmp_path) -> None:
    path = tmp_path / "alerts.jsonl"
    path.write_text(json.dumps(event(10)) + "\n" + '{"event": "fired", "epoch": 2, "glo')
    log = AlertLog(path)
    assert log.append(event(30))
    assert log.repaired
    lines = path.read_text().splitlines()
    assert [json.loads(line)["global_step"] for line in lines] == [10, 30]


def test_wandb_offline_run_holds_images_table_and_alerts(tmp_path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    mon = quick_monitor(tile_size=48)
    logger = WandbLogger(save_dir=str(tmp_path), project="cam-monitor-test", offline=True)
    try:
        fit(tmp_path, mon, epochs=2, logger=logger)
    finally:
        wandb.finish()
    assert mon.faults == {}
    (run_dir,) = list((tmp_path / "wandb").glob("offline-run-*"))
    media = run_dir / "files" / "media"
    assert len(list((media / "images" / "cam").glob("probe_grid_*.png"))) == 2
    assert list((media / "images" / "cam").glob("trends_*.png"))
    assert len(list((media / "images" / "cam").glob("filmstrip_*.png"))) == 2
    tables = sorted((media / "table" / "cam").glob("probes_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"][:5] == ["probe_id", "label", "prediction", "probability", "overlay"]
    assert [row[0] for row in table["data"]] == mon.probes.ids
    alert_tables = list((media / "table" / "cam").glob("alert_events_*.table.json"))
    rules = {row[3] for t in alert_tables for row in json.loads(t.read_text())["data"]}
    assert "spurious_enrichment" in rules and rules <= {"spurious_enrichment", "shortcut_confirmed"}
    assert (run_dir / f"run-{run_dir.name.split('-')[-1]}.wandb").stat().st_size > 0


def test_registry_serves_a_users_logger_type_and_falls_back_to_files(tmp_path) -> None:
    from cam_monitor.sinks import FileSink, register_sink, sinks_for
    from cam_monitor.sinks import _REGISTRY

    class MyLogger:
        pass

    class MySink:
        name = "mine"

        def __init__(self, logger, prefix):
            self.logger, self.prefix = logger, prefix

    saved = list(_REGISTRY)
    try:
        register_sink(MyLogger, MySink)
        (sink,) = sinks_for([MyLogger(), object()], "cam/x", tmp_path)
        assert isinstance(sink, MySink) and sink.prefix == "cam/x"
        (fallback,) = sinks_for([object()], "cam", tmp_path)
        assert isinstance(fallback, FileSink) and fallback.folder == tmp_path
    finally:
        _REGISTRY[:] = saved
