"""Sinks: W&B offline run contents and the durable alert log."""
from __future__ import annotations

import json

import pytest
import torch

import cam_monitor as cm
from cam_monitor.evaluation import Evaluation
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
    mon = quick_monitor(alerting=cm.AlertSettings(action="log", object_enrichment_floor=1.0),
                        pictures=cm.PictureSettings(tile_size=48))  # a second rule: the object floor at chance
    logger = WandbLogger(save_dir=str(tmp_path), project="cam-monitor-test", offline=True)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # staged table files stay under tmp_path
    try:
        fit(tmp_path, mon, epochs=2, logger=logger)
        config = dict(logger.experiment.config)
    finally:
        wandb.finish()
    assert mon.faults == {}
    (run_dir,) = list((tmp_path / "wandb").glob("offline-run-*"))
    media = run_dir / "files" / "media"
    assert len(list((media / "images" / "cam").glob("probe_grid_*.png"))) == 2
    assert not list((media / "images" / "cam").glob("trends_*.png"))  # curves are scalars W&B plots itself
    assert len(list((media / "images" / "cam").glob("filmstrip_*.png"))) == 2
    tables = sorted((media / "table" / "cam").glob("probes_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"][:5] == ["probe_id", "label", "prediction", "probability", "overlay"]
    assert [row[0] for row in table["data"]] == mon.probes.ids
    alert_tables = list((media / "table" / "cam").glob("alert_events_*.table.json"))
    rules = {row[3] for t in alert_tables for row in json.loads(t.read_text())["data"]}
    assert "spurious_enrichment" in rules and rules <= {"spurious_enrichment", "object_enrichment_floor",
                                                        "shortcut_confirmed"}
    assert (run_dir / f"run-{run_dir.name.split('-')[-1]}.wandb").stat().st_size > 0
    # one table of alert events that accumulates: its incremental parts hold each event once, in words too
    events = [row for t in alert_tables for row in json.loads(t.read_text())["data"]]
    assert len(events) == len({(r[0], r[2], r[3]) for r in events}) >= 2
    assert all(r[-1].startswith(r[3] + " (") for r in events)
    # the monitor's settings are in the run's config
    assert config["cam_monitor.target_layer"] == "net.features" and config["cam_monitor.probe_settings.num_probes"] == 20


def test_wandb_overlays_carry_the_masks_and_the_inferred_box_natively() -> None:
    pytest.importorskip("wandb")
    from cam_monitor.history import History
    from cam_monitor.report import ReportSettings, build_panel
    from cam_monitor.sinks.wandb import overlay_image

    spurious = torch.zeros(2, 16, 16, dtype=torch.bool)
    spurious[0, :4, :4] = True
    probes = cm.ProbeSet(torch.rand(2, 3, 16, 16), torch.tensor([0, 1]), spurious_masks=spurious)
    ev = Evaluation(epoch=0, global_step=1, maps=torch.rand(2, 4, 4), preds=torch.tensor([0, 0]),
                    probs=torch.tensor([0.9, 0.4]), per_probe={"spurious_energy": torch.tensor([0.1, 0.2])})
    inferred = torch.zeros(2, 16, 16, dtype=torch.bool)
    inferred[1, 8:12, 4:10] = True
    panel = build_panel(probes, ev, History("cam", 1), ReportSettings(tile_size=32), trends=False,
                        inferred_masks=inferred)
    first, second = overlay_image(panel, 0), overlay_image(panel, 1)
    assert list(first._masks) == ["spurious"] and first._boxes is None
    assert list(second._masks) == ["inferred"]
    (box,) = second._boxes["inferred"]._val
    assert box["position"] == {"minX": 8, "minY": 16, "maxX": 20, "maxY": 24}  # the 16 px box at 32 px tiles


def test_registry_serves_a_users_logger_type_and_falls_back_to_files(tmp_path) -> None:
    from cam_monitor.sinks import FileSink, Sink, register_sink, sinks_for
    from cam_monitor.sinks import _REGISTRY

    class MyLogger:
        pass

    class MySink(Sink):
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


def test_tensorboard_sink_writes_its_own_event_file_with_a_native_checksum(tmp_path) -> None:
    """Images and alert text land in one event file per monitor, beside whatever the logger writes,
    readable by TensorBoard; the record checksum is the native crc32c (tensorboard's own writer
    computes it in pure Python, about 0.3 s per MB), and nothing is written before the first send."""
    import tensorboardX.crc32c
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cam_monitor.report import Panel
    from cam_monitor.sinks import TensorBoardSink

    assert tensorboardX.crc32c._crc32c_native is not None  # the crc32c package is installed and used
    sink = TensorBoardSink(tmp_path, prefix="cam/late")
    assert list(tmp_path.iterdir()) == []
    ev = type("Ev", (), {"global_step": 7})()
    panel = Panel(grid=torch.rand(3, 40, 60), tiles=torch.rand(1, 3, 8, 8), trends=torch.rand(3, 20, 30),
                  ids=["a"], labels=[0], filmstrip=None, curves={"spurious_energy": {"a": 0.25, "b": 0.5}})
    sink.log_evaluation(ev, panel)
    sink.log_alert({"event": "fired", "rule": "shortcut_confirmed", "metric": "shortcut_flip_excess", "value": 0.31,
                    "threshold": 0.1, "epoch": 2, "global_step": 7, "probe_ids": ["a"],
                    "regions": [{"class": 3, "class_name": "three", "boxes": [[0, 0, 4, 4]], "flips": 9,
                                 "control_flips": 1, "tests": 12, "flip_rate": 0.75, "control_rate": 0.08}]})
    sink.close()
    (event_file,) = tmp_path.iterdir()
    assert event_file.name.startswith("events.out.tfevents.") and event_file.name.endswith(".cam_monitor.cam.late")
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"cam/late/probe_grid", "cam/late/trends"}
    (grid,) = acc.Images("cam/late/probe_grid")
    assert (grid.step, grid.width, grid.height) == (7, 60, 40)
    assert {"cam/late/alerts", "custom_scalars__config__"} == set(acc.Tags()["tensors"])
    (text,) = acc.Tensors("cam/late/alerts")
    markdown = text.tensor_proto.string_val[0].decode()  # what the Text tab renders as Markdown
    assert text.step == 7 and markdown.startswith("**shortcut_confirmed fired** at epoch 2, step 7: "
                                                  "`shortcut_flip_excess` = 0.31 (threshold 0.1)")
    assert "| three | local | (0, 0, 4, 4) | 9 | 1 | 12 |" in markdown and "{" not in markdown
    assert set(acc.Tags()["scalars"]) == {"cam_late_probes/spurious_energy/a", "cam_late_probes/spurious_energy/b"}
    (point,) = acc.Scalars("cam_late_probes/spurious_energy/b")
    assert (point.step, point.value) == (7, 0.5)


def test_a_sink_whose_close_fails_is_a_fault_reported_once_and_the_fit_completes(tmp_path) -> None:
    """Sinks that keep a file open get ``close()`` at teardown, after the worker drained; a failing
    close is reported like any other sink fault."""
    from lightning.pytorch.loggers import CSVLogger

    from cam_monitor.sinks import _REGISTRY, Sink, register_sink

    closed = []

    class ClosingSink(Sink):
        name = "closing"

        def __init__(self, logger, prefix) -> None:
            self.sent = 0

        def log_evaluation(self, ev, panel) -> None:
            self.sent += 1

        def log_alert(self, event) -> None:
            pass

        def close(self) -> None:
            closed.append(self.sent)
            raise OSError("disk went away")

    saved = list(_REGISTRY)
    try:
        register_sink(CSVLogger, ClosingSink)
        mon = quick_monitor(pictures=cm.PictureSettings(tile_size=32, background=True))
        with pytest.warns(UserWarning, match=r"sink:closing failed \(OSError: disk went away\)"):
            trainer, _ = fit(tmp_path, mon, epochs=2, logger=CSVLogger(str(tmp_path)))
    finally:
        _REGISTRY[:] = saved
    assert trainer.current_epoch == 2 and closed == [2]  # closed once, after both evaluations were sent
    assert mon.faults == {"sink:closing:OSError": 1}
