"""CAMMonitor inside real (small) Lightning fits: scheduling, logging, alerts, faults, checkpoints, resume."""
from __future__ import annotations

import json
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import cam_monitor as cm
from cam_monitor.demo.model import SmallCNN
from lightning_helpers import cam_scalars, fit, quick_monitor

ALL_METRICS = {"cam/spurious_energy", "cam/spurious_enrichment", "cam/object_energy", "cam/drift_prev",
               "cam/drift_ref", "cam/pointing_spurious", "cam/average_drop", "cam/quality", "cam/degenerate",
               "cam/alerts", "cam/spurious_energy_rise", "cam/object_enrichment", "cam/spurious_masked", "cam/spurious_rise_p",
               "cam/shortcut_suspects", "cam/shortcut_flip_rate", "cam/shortcut_flip_control", "cam/shortcut_flip_excess",
               "cam/colour_flip_rate", "cam/colour_flip_control", "cam/colour_flip_excess", "cam/border_flip_rate",
               "cam/border_flip_control", "cam/border_flip_excess", "cam/detail_flip_rate", "cam/detail_flip_control",
               "cam/detail_flip_excess", "cam/texture_flip_rate", "cam/texture_flip_control",
               "cam/texture_flip_excess", "cam/marked_flip_rate", "cam/marked_flip_control", "cam/marked_flip_excess",
               "cam/shortcut_p", "cam/shortcut_evidence", "cam/skill_p"}  # the probes carry spurious masks: the marked arm runs

RECORDED: list[dict] = []


def record_alert(alert: dict) -> None:
    """Target of the import-path alert action test."""
    RECORDED.append(alert)


class MetricsSeen(L.Callback):
    """Records which cam/ metrics Lightning holds after every validation."""

    def __init__(self) -> None:
        self.seen: list[set[str]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.seen.append({k for k in trainer.callback_metrics if k.startswith("cam/")})


def test_logs_every_metric_at_every_validation_and_skips_sanity_check(tmp_path) -> None:
    mon, seen = quick_monitor(), MetricsSeen()
    trainer, _ = fit(tmp_path, mon, epochs=2, num_sanity_val_steps=2, callbacks=[seen])
    assert [h["epoch"] for h in mon.history] == [0, 1]
    assert seen.seen == [ALL_METRICS, ALL_METRICS]
    last = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert 0 <= last["cam/spurious_energy"] <= 1 and 0 <= last["cam/quality"] <= 1
    assert last["cam/drift_ref"] == pytest.approx(mon.history[-1]["cam/drift_ref"])
    assert len(mon.probes) == 20 and mon.probes.spurious_masks is not None


def test_every_n_epochs_evaluates_on_schedule_and_relogs_in_between(tmp_path) -> None:
    mon, seen = quick_monitor(every_n_epochs=2), MetricsSeen()
    fit(tmp_path, mon, epochs=3, callbacks=[seen])
    assert [h["epoch"] for h in mon.history] == [0, 2]
    assert all(s == ALL_METRICS for s in seen.seen) and len(seen.seen) == 3


class TrainOnly(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = SmallCNN()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["image"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_falls_back_to_train_epoch_end_without_validation_loop(tmp_path) -> None:
    mon = quick_monitor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(tmp_path, mon, epochs=2, model=TrainOnly())
    assert [h["epoch"] for h in mon.history] == [0, 1]


class CountSteps(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def test_layer_typo_fails_before_the_first_training_step(tmp_path) -> None:
    counter = CountSteps()
    with pytest.raises(cm.LayerNotFoundError, match="Did you mean: 'net.features'"):
        fit(tmp_path, quick_monitor(target_layer="net.featurs"), callbacks=[counter])
    assert counter.steps == 0


def test_probe_shape_mismatch_fails_before_the_first_training_step(tmp_path) -> None:
    counter = CountSteps()
    probes = cm.ProbeSet(torch.rand(4, 3, 32, 32), torch.arange(4))
    with pytest.raises(cm.InputError, match=r"probe of shape \(3, 32, 32\)"):
        fit(tmp_path, quick_monitor(probes=probes), callbacks=[counter])
    assert counter.steps == 0


def test_probes_of_wrong_type_raise_type_error() -> None:
    with pytest.raises(TypeError, match="ProbeSet, a path or None"):
        cm.CAMMonitor(probes=[1, 2, 3])


def test_shortcut_fires_spurious_alert_and_writes_jsonl(tmp_path) -> None:
    mon = quick_monitor()
    fit(tmp_path, mon, epochs=2)  # at chance on the probes after one epoch, when no rule judges the maps
    assert [a["rule"] for a in mon.alerts] == ["spurious_enrichment"]
    alert = mon.alerts[0]
    assert set(alert) == {"epoch", "global_step", "rule", "metric", "value", "threshold", "probe_ids"}
    assert alert["value"] > alert["threshold"] == 4.0 and alert["probe_ids"]
    lines = (tmp_path / "cam_monitor" / "alerts.jsonl").read_text().splitlines()
    assert [json.loads(line)["rule"] for line in lines] == ["spurious_enrichment"]
    assert json.loads(lines[0])["event"] == "fired"


def test_control_run_raises_no_alert(tmp_path) -> None:
    mon = quick_monitor()
    fit(tmp_path, mon, epochs=3, variant="control")
    assert mon.alerts == [] and all(h["cam/alerts"] == 0 for h in mon.history)


def test_stop_action_stops_training(tmp_path) -> None:
    trainer, _ = fit(tmp_path, quick_monitor(alerting=cm.AlertSettings(action="stop")), epochs=5)
    assert trainer.current_epoch == 2  # at chance after epoch 0; stopped after epoch 1's evaluation


def test_raise_action_raises_alert_error(tmp_path) -> None:
    with pytest.raises(cm.CAMAlertError, match="spurious_enrichment"):
        fit(tmp_path, quick_monitor(on_error="warn", alerting=cm.AlertSettings(action="raise")), epochs=2)


def test_import_path_action_is_called_with_the_alert(tmp_path) -> None:
    RECORDED.clear()
    fit(tmp_path, quick_monitor(alerting=cm.AlertSettings(action="test_callback:record_alert")), epochs=2)
    assert [a["rule"] for a in RECORDED] == ["spurious_enrichment"]


def test_warn_action_warns(tmp_path) -> None:
    with pytest.warns(UserWarning, match="CAMMonitor alert: spurious_enrichment"):
        fit(tmp_path, quick_monitor(alerting=cm.AlertSettings(action="warn")), epochs=2)


def test_fault_in_pass_is_reported_once_and_retried(tmp_path, monkeypatch) -> None:
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("CAM pass exploded")

    monkeypatch.setattr("cam_monitor.monitor.evaluate", broken)
    mon = quick_monitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, mon, epochs=3)
    reports = [w for w in caught if "CAM pass exploded" in str(w.message)]
    assert len(reports) == 1 and len(calls) == 3 and mon.faults == {"evaluate:RuntimeError": 3}
    assert trainer.current_epoch == 3  # training completed


def test_on_error_raise_stops_fit_with_the_original_exception(tmp_path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise KeyError("original")

    monkeypatch.setattr("cam_monitor.monitor.evaluate", broken)
    with pytest.raises(KeyError, match="original"):
        fit(tmp_path, quick_monitor(on_error="raise"), epochs=2)


@pytest.mark.parametrize("background", [True, False])
def test_failing_logger_never_kills_training(tmp_path, monkeypatch, background: bool) -> None:
    def refuse(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("cam_monitor.sinks.tensorboard.image_summary", refuse)
    mon = quick_monitor(pictures=cm.PictureSettings(background=background))
    with pytest.warns(UserWarning, match="sink:tensorboard failed"):
        trainer, _ = fit(tmp_path, mon, epochs=2, logger=TensorBoardLogger(str(tmp_path)))
    assert len(mon.history) == 2 and trainer.current_epoch == 2


def test_tensorboard_event_files_hold_images_and_scalars(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = quick_monitor(pictures=cm.PictureSettings(tile_size=48))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    fit(tmp_path, mon, epochs=2, logger=logger)
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"cam/probe_grid", "cam/filmstrip"} <= set(tags["images"])
    assert ALL_METRICS <= set(tags["scalars"])
    # per-probe curves are scalars TensorBoard plots itself, not a rendered figure
    assert "cam/trends" not in tags["images"]
    pid = mon.probes.ids[0]
    assert [e.step for e in acc.Scalars(f"cam_probes/spurious_energy/{pid}")] == [h["global_step"] for h in mon.history]
    assert acc.Scalars(f"cam_probes/spurious_energy/{pid}")[-1].value == pytest.approx(
        float(mon.last_evaluation.per_probe["spurious_energy"][0]))
    steps = [e.step for e in acc.Images("cam/probe_grid")]
    assert steps == [h["global_step"] for h in mon.history]
    assert "cam/alerts" in tags["tensors"]  # alerts as Markdown text summaries under the documented tag
    # per-probe curves only for the filmstrip's probes: the monitor's own scalars stay few
    mine = [t for t in tags["scalars"] if t.startswith(("cam/", "cam_probes/"))]
    curves = {t.split("/")[-1] for t in mine if t.startswith("cam_probes/")}
    assert curves == set(mon.probes.ids[:mon.monitor.pictures.filmstrip_probes]) and len(mine) <= 48, sorted(mine)  # 35 cam/ (3 of the marked arm: these probes carry masks) + the curves
    assert logger.hparams["cam_monitor.target_layer"] == "net.features"  # the settings in TensorBoard's HParams


def test_csv_logger_gets_scalars_and_pngs_go_to_the_log_dir(tmp_path) -> None:
    mon = quick_monitor()
    logger = CSVLogger(str(tmp_path), name="csv")
    fit(tmp_path, mon, epochs=2, logger=logger)
    out = tmp_path / "csv" / "version_0" / "cam_monitor"
    grids = sorted(p.name for p in out.glob("probe_grid_*.png"))
    assert len(grids) == 2 and (out / "trends.png").exists() and (out / "alerts.jsonl").exists()
    from torchvision.io import read_image
    strip = read_image(str(out / "filmstrip.png"))
    assert strip.shape[1] > strip.shape[2] / 4  # 4 probes stacked, 2 evaluations side by side
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "cam/spurious_enrichment" in header


def test_checkpoint_holds_state_and_explanation_card_loadable_weights_only(tmp_path) -> None:
    mon = quick_monitor()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    fit(tmp_path, mon, epochs=2, callbacks=[ckpt], enable_checkpointing=True)
    data = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    card = data["cam_monitor_cards"][mon.state_key]
    assert card["epoch"] == 1 and "spurious_enrichment" in card["active_alerts"]
    assert set(card["active_alerts"]) <= {"spurious_enrichment", "shortcut_confirmed"}
    # a mask-free alert's regions (lists of plain values) load under weights_only too
    assert all(isinstance(r["boxes"], list) for a in card["alerts"] for r in a.get("regions", []))
    assert card["metrics"]["cam/spurious_enrichment"] == pytest.approx(mon.history[-1]["cam/spurious_enrichment"])
    state = data["callbacks"][mon.state_key]
    assert len(state["history"]["rows"]) == 2 and state["probes"]["images"].shape[0] == 20
    assert state["target_layer"] == card["target_layer"] == "net.features" and card["name"] is None


def test_state_dict_roundtrip_through_weights_only_file(tmp_path) -> None:
    mon = quick_monitor()
    fit(tmp_path, mon, epochs=2)
    torch.save(mon.state_dict(), tmp_path / "s.pt")
    fresh = quick_monitor()
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert cam_scalars(fresh) == cam_scalars(mon) and fresh.alerts == mon.alerts
    assert torch.equal(fresh.reference.maps, mon.reference.maps) and fresh.probes.ids == mon.probes.ids


def test_resumed_run_matches_uninterrupted_run_without_duplicate_alert_lines(tmp_path) -> None:
    straight = quick_monitor(alerting=cm.AlertSettings(action="log", patience=2))
    fit(tmp_path / "straight", straight, epochs=3)

    first = quick_monitor(alerting=cm.AlertSettings(action="log", patience=2))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, filename="{epoch}")
    fit(tmp_path / "resumed", first, epochs=3, callbacks=[ckpt], enable_checkpointing=True)
    resumed = quick_monitor(alerting=cm.AlertSettings(action="log", patience=2))  # the job died after epoch 2; restart from epoch 0's checkpoint
    fit(tmp_path / "resumed", resumed, epochs=3, ckpt_path=str(tmp_path / "ck" / "epoch=0.ckpt"))

    assert cam_scalars(resumed) == cam_scalars(straight)
    assert resumed.alerts == straight.alerts and straight.alerts[0]["epoch"] == 2  # beats chance from epoch 1, patience 2
    lines = (tmp_path / "resumed" / "cam_monitor" / "alerts.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == len(straight.alerts)


def test_fit_start_reference_lets_rise_and_drift_rules_fire_only_for_the_shortcut(tmp_path) -> None:
    shortcut = quick_monitor(cams=cm.CAMSettings(reference="fit_start"))
    fit(tmp_path / "s", shortcut, epochs=2, limit_train_batches=None)
    assert shortcut.reference.epoch == 0 and shortcut.reference.global_step == 0
    # the maps drift, but the untrained model's put about as much energy on the digit's box (0.54 against 0.50):
    # not the fall of 0.15 drift_off_object asks of a move off the object
    assert {a["rule"] for a in shortcut.alerts} - {"shortcut_confirmed"} == {"spurious_enrichment", "spurious_energy_rise"}
    assert shortcut.history[0]["cam/drift_ref"] > 0.5
    assert shortcut.history[0]["cam/drift_prev"] > 0  # the first evaluation already compares with fit start
    control = quick_monitor(cams=cm.CAMSettings(reference="fit_start"))
    fit(tmp_path / "c", control, epochs=2, variant="control", limit_train_batches=None)
    assert control.alerts == [] and control.history[-1]["cam/drift_ref"] > 0.5  # moved onto the digit: no alert


def test_target_layer_none_pick_is_logged_and_kept_in_state_and_card(tmp_path, caplog) -> None:
    import logging

    mon = quick_monitor(target_layer=None)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        fit(tmp_path, mon, epochs=1, callbacks=[ckpt], enable_checkpointing=True)
    assert mon.layer_name == "net.features"  # the last module with a spatial 4-D output
    assert any("target_layer=None picked 'net.features'" in r.getMessage() for r in caplog.records)
    data = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)
    assert data["callbacks"][mon.state_key]["target_layer"] == "net.features"
    assert data["cam_monitor_cards"][mon.state_key]["target_layer"] == "net.features"


def tb_images(log_dir) -> dict[str, list[tuple[int, bytes]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    images = {tag: [(e.step, e.encoded_image_string) for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
    images["alerts"] = [(e.step, e.tensor_proto.SerializeToString()) for e in acc.Tensors("cam/alerts")]
    return images


def test_background_pictures_and_events_are_identical_to_the_synchronous_ones(tmp_path) -> None:
    outputs = {}
    for background in (False, True):
        root = tmp_path / str(background)
        tb = TensorBoardLogger(str(root), name="tb")
        fit(root / "a", quick_monitor(pictures=cm.PictureSettings(background=background, tile_size=48)), epochs=2, logger=tb)
        csv = CSVLogger(str(root), name="csv")  # no image-capable logger: PNG files
        fit(root / "b", quick_monitor(pictures=cm.PictureSettings(background=background, tile_size=48)), epochs=2, logger=csv)
        files = {p.name: p.read_bytes() for p in (root / "csv" / "version_0" / "cam_monitor").glob("*")}
        outputs[background] = (tb_images(tb.log_dir), files)
    sync_images, sync_files = outputs[False]
    assert sync_images == outputs[True][0] and len(sync_images["cam/probe_grid"]) == 2 and sync_images["alerts"]
    assert sync_files == outputs[True][1]
    assert {"alerts.jsonl", "trends.png", "filmstrip.png"} <= set(sync_files) and len(sync_files) == 5


def test_background_auto_draws_on_the_training_thread_on_a_cpu(tmp_path, monkeypatch) -> None:
    import threading

    import cam_monitor.monitor as callback_module

    threads: dict[object, set[str]] = {}
    real = callback_module.build_panel

    def spy(*args, **kwargs):
        threads[current].add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(callback_module, "build_panel", spy)
    for current in ("auto", True):
        threads[current] = set()
        mon = quick_monitor(pictures=cm.PictureSettings(tile_size=32, background=current))
        fit(tmp_path / str(current), mon, epochs=1)
    assert threads["auto"] == {threading.current_thread().name}
    assert len(threads[True]) == 1 and next(iter(threads[True])).startswith("cam_monitor")
    with pytest.raises(ValueError, match="background must be True, False or 'auto'"):
        quick_monitor(pictures=cm.PictureSettings(background="yes"))


def test_a_failing_fit_still_gets_the_pictures_of_its_evaluations(tmp_path) -> None:
    from cam_monitor.demo.model import DigitClassifier

    class FailsInEpoch1(DigitClassifier):
        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    mon = quick_monitor(pictures=cm.PictureSettings(tile_size=32, background=True))  # the worker is drained when the fit fails
    with pytest.raises(RuntimeError, match="boom"):
        fit(tmp_path, mon, epochs=3, model=FailsInEpoch1())
    assert len(list((tmp_path / "cam_monitor").glob("probe_grid_*.png"))) == 1 and len(mon.history) == 1


def test_a_vit_trained_from_scratch_gets_real_maps_from_the_first_evaluation(tmp_path) -> None:
    """torchvision zero-initialises the ViT head: at fit start no layer has a class gradient. The
    automatic pick is made by structure (the last attention input, not the final norm), holds for
    the run, and the first evaluation after the head moves has non-zero maps and finite metrics."""
    import math

    import torchvision

    from lightning_helpers import fit_classifier

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                               mlp_dim=64, num_classes=4)
    assert not vit.heads.head.weight.any()
    monitor = cm.CAMMonitor()
    fit_classifier(tmp_path, vit, monitor, 32, 4, train=32, val=16)
    assert monitor.layer_name == "model.encoder.layers.encoder_layer_1.ln_1"
    first = monitor.history[0]
    assert first["cam/degenerate"] < len(monitor.probes)
    assert math.isfinite(first["cam/spurious_energy"]) and math.isfinite(first["cam/quality"])


def test_the_console_says_where_outputs_go_when_an_alert_clears_and_warns_from_the_users_line(tmp_path, caplog) -> None:
    import logging
    import warnings

    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    # the shortcut run's enrichment on the decoy passes 15 at epoch 2 and falls back to 14.5 at epoch 4
    mon = quick_monitor(alerting=cm.AlertSettings(spurious_enrichment=15.0, hysteresis=0.01, action="warn"),
                        pictures=cm.PictureSettings(tile_size=32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, mon, epochs=5, logger=TensorBoardLogger(str(tmp_path), name="tb"))
    said = caplog.text
    assert f"alerts go to {tmp_path / 'tb' / 'version_0' / 'cam_monitor' / 'alerts.jsonl'}" in said
    assert "pictures to TensorBoard in" in said and "--samples_per_plugin images=0" in said
    cleared = [line for line in (tmp_path / "tb" / "version_0" / "cam_monitor" / "alerts.jsonl").read_text().splitlines()
               if '"cleared"' in line]
    assert len(cleared) == said.count("alert cleared: ") >= 1
    ours = [w for w in caught if str(w.message).startswith("CAMMonitor")]
    assert ours and all(w.filename.endswith("lightning_helpers.py") for w in ours)  # the line that called trainer.fit


