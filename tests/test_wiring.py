"""Every common way of wiring a Lightning run works with CAMMonitor (issue: first-class callback).

Loaders passed to ``fit``, validation schedules, ``validate``/``test`` alone, a reused monitor,
two monitors in one Trainer, precision settings and resuming with another probe set. Each test
is a real (small, CPU) fit.
"""
from __future__ import annotations

import json
import warnings
from collections import Counter

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

import cam_monitor as cm
from cam_monitor.demo.model import DecoyDigitsDataModule, DigitClassifier
from lightning_helpers import fit, quick_monitor

TRAINER = dict(enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, logger=False,
               enable_checkpointing=False, limit_train_batches=4)


def loaders(variant: str = "shortcut", batch_size: int = 64):
    data = DecoyDigitsDataModule(variant, batch_size=batch_size)
    data.setup()
    return data.train_dataloader(), data.val_dataloader(), data


def metrics_of(trainer: L.Trainer, prefix: str = "cam/") -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


class DigitClassifierWithTest(DigitClassifier):
    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)


# ---- loaders passed to fit -------------------------------------------------------------------------

def test_probes_come_from_val_loaders_passed_to_fit(tmp_path) -> None:
    train, val, data = loaders()
    mon = quick_monitor()
    trainer = L.Trainer(callbacks=[mon], max_epochs=1, default_root_dir=str(tmp_path), **TRAINER)
    trainer.fit(DigitClassifier(), train_dataloaders=train, val_dataloaders=val)
    assert len(mon.history) == 1 and "cam/spurious_enrichment" in trainer.callback_metrics
    picked = {int(pid[3:]) for pid in mon.probes.ids}
    assert all(torch.equal(mon.probes.images[i], data.data.val[j]["image"]) for i, j in
               enumerate(int(pid[3:]) for pid in mon.probes.ids)) and len(picked) == 20


def test_probes_come_from_the_first_of_several_val_loaders(tmp_path) -> None:
    train, val, data = loaders()
    other = torch.utils.data.DataLoader(data.data.train_control, batch_size=64)
    mon = quick_monitor()

    class TwoVal(DigitClassifier):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            return super().validation_step(batch, batch_idx)

    trainer = L.Trainer(callbacks=[mon], max_epochs=1, default_root_dir=str(tmp_path), limit_val_batches=1, **TRAINER)
    trainer.fit(TwoVal(), train_dataloaders=train, val_dataloaders=[val, other])
    first = int(mon.probes.ids[0][3:])
    assert torch.equal(mon.probes.images[0], data.data.val[first]["image"]) and len(mon.history) == 1


def test_without_validation_probes_come_from_the_train_loader_passed_to_fit(tmp_path) -> None:
    train, _, data = loaders()

    class NoVal(DigitClassifier):
        validation_step = L.LightningModule.validation_step

    mon = quick_monitor()
    trainer = L.Trainer(callbacks=[mon], max_epochs=2, default_root_dir=str(tmp_path), **TRAINER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(NoVal(), train_dataloaders=train)
    first = int(mon.probes.ids[0][3:])
    assert torch.equal(mon.probes.images[0], data.data.train_shortcut[first]["image"])
    assert [h["epoch"] for h in mon.history] == [0, 1]


def test_default_pick_covers_every_class(tmp_path) -> None:
    mon = quick_monitor(probe_settings=cm.ProbeSettings(num_probes=32))
    fit(tmp_path, mon, epochs=1)
    counts = Counter(mon.probes.labels.tolist())
    assert sorted(counts) == list(range(10)) and set(counts.values()) == {3, 4}
    assert sorted(mon.probes.labels[:10].tolist()) == list(range(10))  # the grid's first row shows every class


# ---- schedules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("check_val, every, epochs, expected", [
    (2, 2, 4, [1, 3]),      # Lightning validates at epochs 1, 3: both evaluate
    (2, 3, 6, [1, 5]),      # first validation, then the first one at least 3 epochs later
    (1, 2, 3, [0, 2]),
    (3, 1, 6, [2, 5]),
])
def test_schedule_evaluates_for_every_combination(tmp_path, check_val, every, epochs, expected) -> None:
    mon = quick_monitor(every_n_epochs=every, probe_settings=cm.ProbeSettings(num_probes=10),
                        cams=cm.CAMSettings(faithfulness=False), pictures=cm.PictureSettings(every_n_evals=0))
    fit(tmp_path, mon, epochs=epochs, check_val_every_n_epoch=check_val, limit_train_batches=1, limit_val_batches=1)
    assert [h["epoch"] for h in mon.history] == expected


def test_schedule_that_can_never_fire_is_an_error_before_training(tmp_path) -> None:
    with pytest.raises(cm.ScheduleError, match="check_val_every_n_epoch=5.*max_epochs=3"):
        fit(tmp_path, quick_monitor(), epochs=3, check_val_every_n_epoch=5)


def test_mid_epoch_validations_each_evaluate_with_every_n_epochs_1(tmp_path) -> None:
    mon = quick_monitor(probe_settings=cm.ProbeSettings(num_probes=10), cams=cm.CAMSettings(faithfulness=False),
                        pictures=cm.PictureSettings(every_n_evals=0))
    fit(tmp_path, mon, epochs=1, limit_train_batches=4, val_check_interval=2, limit_val_batches=1)
    assert [h["global_step"] for h in mon.history] == [2, 4]


# ---- validate / test / reuse -----------------------------------------------------------------------

def test_validate_alone_evaluates_once_and_writes_pictures_and_alerts(tmp_path) -> None:
    _, val, _ = loaders()
    model = DigitClassifier()
    fit(tmp_path / "train", None, epochs=2, model=model)  # one epoch leaves it at chance on the probes
    mon = quick_monitor()
    trainer = L.Trainer(callbacks=[mon], default_root_dir=str(tmp_path / "v"), enable_progress_bar=False,
                        enable_model_summary=False, logger=False)
    (results,) = trainer.validate(model, dataloaders=val)
    assert [h["stage"] for h in mon.history] == ["validate"]
    assert results["cam/spurious_enrichment"] == pytest.approx(mon.history[0]["cam/spurious_enrichment"])
    out = tmp_path / "v" / "cam_monitor"
    assert len(list(out.glob("probe_grid_*.png"))) == 1
    lines = [json.loads(x) for x in (out / "alerts.jsonl").read_text().splitlines()]
    assert [a["rule"] for a in lines] == [a["rule"] for a in mon.alerts] == ["spurious_enrichment"]


def test_validate_with_a_probe_set_and_test_after_fit(tmp_path) -> None:
    _, val, data = loaders()
    probes = cm.ProbeSet.from_dataset(data.data.val, num_probes=10, seed=1)
    mon = quick_monitor(probes=probes)
    trainer, model = fit(tmp_path, mon, epochs=1, model=DigitClassifierWithTest())
    (v,) = trainer.validate(model, dataloaders=val)
    (t,) = trainer.test(model, dataloaders=val)
    assert [h["stage"] for h in mon.history] == ["fit", "validate", "test"]
    assert "cam/quality" in v and "cam/quality" in t
    # the model did not change after fit: validate and test measure the same maps
    assert mon.history[1]["cam/spurious_energy"] == pytest.approx(mon.history[0]["cam/spurious_energy"], abs=1e-6)
    assert mon.history[2]["cam/drift_prev"] == pytest.approx(0.0, abs=1e-6)


def test_a_reused_monitor_starts_a_new_run_in_the_new_folder(tmp_path) -> None:
    mon = quick_monitor()
    fit(tmp_path / "one", mon, epochs=2)
    fit(tmp_path / "two", mon, epochs=2)
    assert [h["epoch"] for h in mon.history] == [0, 1]  # not skipped, not appended to run one
    assert len(list((tmp_path / "one" / "cam_monitor").glob("probe_grid_*.png"))) == 2
    assert len(list((tmp_path / "two" / "cam_monitor").glob("probe_grid_*.png"))) == 2
    assert (tmp_path / "two" / "cam_monitor" / "alerts.jsonl").exists()


# ---- two monitors ----------------------------------------------------------------------------------

def test_two_named_monitors_log_apart(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a = quick_monitor(target_layer="net.features.3", name="early", pictures=cm.PictureSettings(tile_size=32))
    b = quick_monitor(target_layer="net.features", name="late", pictures=cm.PictureSettings(tile_size=32))
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer, _ = fit(tmp_path, a, epochs=2, callbacks=[b, ckpt], logger=logger, enable_checkpointing=True)
    m = metrics_of(trainer)
    assert m["cam/early/spurious_enrichment"] != m["cam/late/spurious_enrichment"]
    assert m["cam/early/spurious_enrichment"] == pytest.approx(a.history[-1]["cam/early/spurious_enrichment"])
    assert not any(k.count("/") == 1 for k in m)  # nothing logged under the bare cam/ names
    for mon in (a, b):
        lines = (tmp_path / "tb" / "version_0" / "cam_monitor" / mon.name / "alerts.jsonl").read_text().splitlines()
        assert [json.loads(x)["metric"] for x in lines][0] == f"cam/{mon.name}/spurious_enrichment"
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert {"cam/early/probe_grid", "cam/late/probe_grid"} <= set(acc.Tags()["images"])
    cards = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=True)["cam_monitor_cards"]
    assert {c["name"] for c in cards.values()} == {"early", "late"}
    assert {c["target_layer"] for c in cards.values()} == {"net.features.3", "net.features"}


def test_two_monitors_under_one_name_is_an_error_at_setup(tmp_path) -> None:
    with pytest.raises(cm.ScheduleError, match="distinct name="):
        fit(tmp_path, quick_monitor(), callbacks=[quick_monitor(target_layer="net.features.3")])
    with pytest.raises(cm.ScheduleError, match="distinct name="):
        fit(tmp_path, quick_monitor(name="x"), callbacks=[quick_monitor(name="x", target_layer="net.features.3")])
    # the same name and layer: Lightning itself refuses two callbacks with one state key
    with pytest.raises(RuntimeError, match="state_key"):
        fit(tmp_path, quick_monitor(name="x"), callbacks=[quick_monitor(name="x")])


def test_bad_names_are_refused() -> None:
    for bad in ("", "a/b", " x", 3):
        with pytest.raises(ValueError, match="name must be"):
            cm.CAMMonitor(name=bad)


# ---- precision -------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_probes_follow_the_trainer_precision(tmp_path, precision) -> None:
    mon = quick_monitor(on_error="raise", probe_settings=cm.ProbeSettings(num_probes=10))
    fit(tmp_path, mon, epochs=1, precision=precision, deterministic=False)
    row = mon.history[0]
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("cam/spurious_energy", "cam/drift_prev", "cam/quality"))
    assert row["cam/degenerate"] < 10


def test_float64_probes_run_on_a_float32_model(tmp_path) -> None:
    _, _, data = loaders()
    probes = cm.ProbeSet.from_dataset(data.data.val, num_probes=10)
    probes = cm.ProbeSet(probes.images.double(), probes.labels, probes.spurious_masks, probes.object_masks, probes.ids)
    mon = quick_monitor(probes=probes, on_error="raise")
    fit(tmp_path, mon, epochs=1)
    assert len(mon.history) == 1


# ---- resume ----------------------------------------------------------------------------------------

def checkpointed_run(tmp_path, monitor: cm.CAMMonitor) -> str:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, filename="{epoch}")
    fit(tmp_path / "first", monitor, epochs=1, callbacks=[ckpt], enable_checkpointing=True)
    return str(tmp_path / "ck" / "epoch=0.ckpt")


def test_resume_with_another_num_probes_says_which_set_is_used(tmp_path) -> None:
    path = checkpointed_run(tmp_path, quick_monitor(probe_settings=cm.ProbeSettings(num_probes=20)))
    resumed = quick_monitor(probe_settings=cm.ProbeSettings(num_probes=30))
    with pytest.warns(UserWarning, match="checkpoint's 20 probes, not num_probes=30"):
        fit(tmp_path / "again", resumed, epochs=2, ckpt_path=path)
    assert len(resumed.probes) == 20 and [h["epoch"] for h in resumed.history] == [0, 1]


def test_resume_with_another_probe_set_says_which_set_is_used(tmp_path) -> None:
    _, _, data = loaders()
    first = cm.ProbeSet.from_dataset(data.data.val, num_probes=10, seed=0)
    other = cm.ProbeSet.from_dataset(data.data.val, num_probes=10, seed=5)
    path = checkpointed_run(tmp_path, quick_monitor(probes=first))
    resumed = quick_monitor(probes=other)
    with pytest.warns(UserWarning, match="checkpoint's 10 probes, not probes="):
        fit(tmp_path / "again", resumed, epochs=2, ckpt_path=path)
    assert resumed.probes.ids == first.ids


def test_resume_with_the_same_probe_set_is_silent(tmp_path) -> None:
    _, _, data = loaders()
    probes = cm.ProbeSet.from_dataset(data.data.val, num_probes=10, seed=0)
    path = checkpointed_run(tmp_path, quick_monitor(probes=probes))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path / "again", quick_monitor(probes=probes), epochs=2, ckpt_path=path)
    assert not [w for w in caught if "CAMMonitor" in str(w.message)]


def test_resume_under_a_strategy_that_restores_after_setup_checks_the_checkpoint_probes(tmp_path) -> None:
    from lightning.pytorch.strategies import SingleDeviceStrategy

    class LateRestore(SingleDeviceStrategy):
        """Restores callback state after on_fit_start, as Lightning's FSDP strategy does."""

        @property
        def restore_checkpoint_after_setup(self) -> bool:
            return True

    path = checkpointed_run(tmp_path, quick_monitor(probe_settings=cm.ProbeSettings(num_probes=20)))
    resumed = quick_monitor(probe_settings=cm.ProbeSettings(num_probes=30))
    checked = []
    real = resumed.monitor.check
    resumed.monitor.check = lambda *a: (checked.append(len(resumed.probes)), real(*a))
    with pytest.warns(UserWarning, match="checkpoint's 20 probes, not num_probes=30"):
        fit(tmp_path / "again", resumed, epochs=2, ckpt_path=path, strategy=LateRestore(device="cpu"))
    assert checked[-1] == 20 and len(resumed.probes) == 20 and [h["epoch"] for h in resumed.history] == [0, 1]


# ---- probe folders, transforms and model outputs ---------------------------------------------------

def to_32px(image: torch.Tensor) -> torch.Tensor:
    """Target of the probe_transform import-path test: greyscale, 32 x 32."""
    return torch.nn.functional.interpolate(image.mean(0, keepdim=True)[None], size=(32, 32), mode="bilinear")[0]


def test_folder_probes_go_through_probe_transform_given_as_an_import_path(tmp_path) -> None:
    from torchvision.io import write_png

    for i, size in enumerate([(20, 20), (40, 48)]):
        folder = tmp_path / "probes" / f"c{i}"
        folder.mkdir(parents=True)
        write_png(torch.randint(0, 255, (3, *size), dtype=torch.uint8), str(folder / f"p{i}.png"))
    mon = quick_monitor(probes=str(tmp_path / "probes"), on_error="raise",
                        probe_settings=cm.ProbeSettings(num_probes=20, transform="test_wiring:to_32px"))
    fit(tmp_path / "run", mon, epochs=1)
    assert mon.probes.images.shape == (2, 1, 32, 32) and len(mon.history) == 1


def test_probe_transform_is_refused_where_it_cannot_apply(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"ProbeSettings\(transform=\.\.\.\) applies to probes loaded from a folder"):
        cm.CAMMonitor(probe_settings=cm.ProbeSettings(transform=to_32px))
    with pytest.raises(ValueError, match="cannot import"):
        cm.CAMMonitor(probes="x/", probe_settings=cm.ProbeSettings(transform="no_such_module_abc:f"))


class NamespaceOutput(DigitClassifier):
    """Returns its logits inside an object, as HuggingFace-style models do."""

    def __init__(self, field: str) -> None:
        super().__init__()
        self.field = field

    def forward(self, x):
        import types

        return types.SimpleNamespace(**{self.field: self.net(x)})

    def training_step(self, batch, batch_idx):
        x, y = self.unpack(batch)
        return torch.nn.functional.cross_entropy(getattr(self(x), self.field), y)

    def validation_step(self, batch, batch_idx):
        return None


def scores_of(output):
    """Target of the output_transform import-path test."""
    return output.scores


def test_an_output_without_logits_is_reported_as_such_before_training(tmp_path) -> None:
    with pytest.raises(cm.OutputError, match="cannot find logits in a model output of type SimpleNamespace.*output_transform"):
        fit(tmp_path, quick_monitor(), epochs=1, model=NamespaceOutput("scores"))
    mon = quick_monitor(on_error="raise", cams=cm.CAMSettings(output_transform="test_wiring:scores_of"))
    fit(tmp_path / "ok", mon, epochs=1, model=NamespaceOutput("scores"))
    logits_attr = quick_monitor(on_error="raise")
    fit(tmp_path / "attr", logits_attr, epochs=1, model=NamespaceOutput("logits"))
    assert len(mon.history) == len(logits_attr.history) == 1


class SharedBlock(DigitClassifier):
    """Runs one conv block twice in the forward (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.net(self.shared(self.shared(x)))


def test_a_layer_that_runs_twice_is_named_in_a_warning_before_training(tmp_path) -> None:
    with pytest.warns(UserWarning, match=r"layer 'shared' runs 2 times in one forward.*last call only"):
        fit(tmp_path, quick_monitor(target_layer="shared",
                                    probe_settings=cm.ProbeSettings(num_probes=10)), epochs=1, model=SharedBlock())


class TinyViT(DigitClassifier):
    """A small torchvision VisionTransformer on the demo's 1-channel digits."""

    def __init__(self, zero_head: bool = True) -> None:
        super().__init__()
        import torchvision

        self.vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                        hidden_dim=32, mlp_dim=64, num_classes=10)
        if not zero_head:
            torch.nn.init.normal_(self.vit.heads.head.weight, std=0.1)

    def forward(self, x):
        return self.vit(x.expand(-1, 3, -1, -1))


@pytest.mark.parametrize("zero_head, layer, cause", [
    (True, None, "torchvision zero-initialises ViT heads"),
    (False, "vit.encoder.ln", "only through a class token"),
])
def test_all_zero_maps_at_fit_start_are_a_warning_that_names_the_cause(tmp_path, zero_head, layer, cause) -> None:
    mon = quick_monitor(target_layer=layer, probe_settings=cm.ProbeSettings(num_probes=10))
    with pytest.warns(UserWarning, match=f"every map of the first probes at layer .* is all zero.*{cause}"):
        fit(tmp_path, mon, epochs=1, model=TinyViT(zero_head), limit_train_batches=1)


def test_automatic_pick_on_a_vit_monitor_is_logged_and_explains(tmp_path) -> None:
    mon = quick_monitor(target_layer=None, on_error="raise", probe_settings=cm.ProbeSettings(num_probes=10))
    fit(tmp_path, mon, epochs=1, model=TinyViT(zero_head=False), limit_train_batches=1)
    assert mon.layer_name == "vit.encoder.layers.encoder_layer_1.ln_1"
    assert mon.history[0]["cam/degenerate"] < 10


def test_a_grid_too_coarse_for_the_spurious_region_is_a_warning_at_fit_start(tmp_path) -> None:
    _, _, data = loaders()
    probes = cm.ProbeSet.from_dataset(data.data.val, num_probes=10)
    band = cm.metrics.border_mask(32, 32, 0.1).expand(len(probes), -1, -1).clone()
    wide = cm.ProbeSet(probes.images, probes.labels, spurious_masks=band, ids=probes.ids)  # the user outlined the band
    # 8x8 grid at 32 px against a 3-px band: no map gets past about 2x chance, threshold 4
    coarse = quick_monitor(probes=wide, target_layer="net.features", probe_settings=cm.ProbeSettings(num_probes=10))
    with pytest.warns(UserWarning, match=r"on the \dx\d grid of layer 'net.features', no map can put more than .* "
                                         r"that alert can never fire"):
        fit(tmp_path / "a", coarse, epochs=1, limit_train_batches=1)
    no_masks = cm.ProbeSet(probes.images, probes.labels, ids=probes.ids)
    for name, monitor in (("b", quick_monitor(probe_settings=cm.ProbeSettings(num_probes=10))), ("c", quick_monitor(probes=no_masks, probe_settings=cm.ProbeSettings(num_probes=10)))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(tmp_path / name, monitor, epochs=1, limit_train_batches=1)  # 4x4 masks resolvable; no masks: no rule
        assert not [w for w in caught if "can never fire" in str(w.message)]


def test_a_2x2_grid_warns_that_pointing_and_enrichment_cannot_move(tmp_path) -> None:
    class Coarse(DigitClassifier):
        def forward(self, x):  # the demo CNN on 8 px inputs: a 2x2 grid at net.features
            return self.net(torch.nn.functional.interpolate(x, size=(8, 8)))

    _, _, data = loaders()
    probes = cm.ProbeSet.from_dataset(data.data.val, num_probes=10)
    probes = cm.ProbeSet(probes.images, probes.labels, ids=probes.ids)
    mon = quick_monitor(probes=probes, probe_settings=cm.ProbeSettings(num_probes=10),
                        discovery=cm.DiscoverySettings(box_cells=2))  # a 2x2-cell window: the whole grid
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, mon, epochs=1, model=Coarse(), limit_train_batches=1)
    texts = [str(w.message) for w in caught if "grid of layer" in str(w.message)]
    assert any("covers 100% of the image: the local paste test cannot tell" in t for t in texts)
    assert any("pointing_spurious is 1.0 whatever the model does" in t for t in texts)
    assert any("detail and texture tests need a grid of at least 4x4" in str(w.message) for w in caught)  # said at fit start
