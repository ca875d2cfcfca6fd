"""Bad input anywhere a user can give it: a clear error naming the problem and the fix, and
nothing written half-way (no log folder, no checkpoint, no temporary file left behind)."""
from __future__ import annotations

import pytest
import torch

import cam_monitor as cm
from lightning_helpers import fit, quick_monitor


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def write_probe_file(tmp_path, kind: str) -> str:
    path = tmp_path / f"{kind}.pt"
    if kind == "corrupt":
        path.write_bytes(b"\x00\x01 definitely not a torch file")
    elif kind == "pickled":
        torch.save({"format": "cam_monitor.ProbeSet/1", "images": Evil()}, path)
    return str(path)


FIT_CASES = [
    ("layer typo", dict(target_layer="net.featurs"), cm.LayerNotFoundError, r"Did you mean: 'net.features'"),
    ("non-spatial layer", dict(target_layer="net.head"), cm.LayerNotSpatialError, r"2-D tensor"),
    ("pooled 1x1 layer", dict(target_layer="net.pool"), cm.LayerNotSpatialError, r"1x1 grid"),
    ("probes with 3 channels", dict(probes=cm.ProbeSet(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))),
     cm.InputError, r"probe of shape \(3, 32, 32\)"),
    ("probe label beyond the model's classes", dict(probes=cm.ProbeSet(torch.rand(2, 1, 32, 32), torch.tensor([0, 12]))),
     cm.TargetError, r"\[12\] are out of range .* 10 classes"),
    ("corrupt probe file", dict(probes="corrupt"), cm.InputError, r"corrupt"),
    ("probe file holding pickled objects", dict(probes="pickled"), cm.InputError, r"weights_only"),
    ("missing probe folder", dict(probes="missing/"), FileNotFoundError, r"missing"),
]


@pytest.mark.parametrize("name, kwargs, error, pattern", FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_fit_fails_before_training_and_writes_nothing(tmp_path, name, kwargs, error, pattern) -> None:
    if isinstance(kwargs.get("probes"), str):
        kind = kwargs["probes"]
        kwargs = dict(probes=str(tmp_path / "missing.pt") if kind == "missing/" else write_probe_file(tmp_path, kind))
    with pytest.raises(error, match=pattern):
        fit(tmp_path / "run", quick_monitor(**kwargs), epochs=1, enable_checkpointing=True)
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()] if (tmp_path / "run").exists() else []
    assert written == []


CONSTRUCTOR_CASES = [
    (dict(every_n_epochs=0), "every_n_epochs must be an int >= 1"),
    (dict(num_probes=0), "num_probes"),
    (dict(batch_size=-1), "batch_size"),
    (dict(images_every_n_evals=-1), "images_every_n_evals"),
    (dict(tile_size=2), "tile_size"),
    (dict(targets="logits"), "targets must be 'label' or 'pred'"),
    (dict(on_error="ignore"), "on_error"),
    (dict(border_fraction=0.7), "border_fraction"),
    (dict(methods=("gradcam", "scorecam")), "unknown CAM method 'scorecam'"),
    (dict(spurious_enrichment=0.0), "spurious_enrichment"),
    (dict(spurious_energy_rise=2.0), "spurious_energy_rise"),
    (dict(object_energy_floor=-0.1), "object_energy_floor"),
    (dict(drift_threshold=3.0), r"drift_threshold=3.0 \(threshold of alert rule drift_off_object\) must be in \(0, 2\]"),
    (dict(patience=0), "patience"),
    (dict(hysteresis=1.0), "hysteresis"),
    (dict(alert_action="explode"), "neither one of"),
    (dict(alert_action="no_such_module_xyz:fn"), "cannot import"),
    (dict(target_layer=""), "target_layer"),
    (dict(reference="pretrained"), "reference must be 'first' or 'fit_start'"),
    (dict(filmstrip_probes=-1), "filmstrip_probes"),
]


@pytest.mark.parametrize("kwargs, pattern", CONSTRUCTOR_CASES, ids=[next(iter(c[0])) + "-" + str(i) for i, c in enumerate(CONSTRUCTOR_CASES)])
def test_bad_monitor_arguments_raise_in_init(kwargs, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        cm.CAMMonitor(**kwargs)


PROBE_CASES = [
    ("masks for another number of probes", dict(spurious_masks=torch.zeros(3, 8, 8, dtype=torch.bool)), r"N = 2"),
    ("non-binary mask", dict(object_masks=torch.full((2, 8, 8), 0.5)), r"probe 'probe_000' .* not binary"),
    ("mask with 2 channels", dict(object_masks=torch.zeros(2, 2, 8, 8)), r"\(N, H, W\)"),
    ("box outside the image", dict(spurious_masks=[[(0, 0, 20, 4)], None]), r"outside the 8x8 image"),
    ("duplicate ids", dict(ids=["x", "x"]), r"duplicate probe id 'x'"),
    ("label out of range", dict(labels=torch.tensor([0, 7]), num_classes=5), r"'probe_001' \(index 1\) has label 7"),
    ("float labels", dict(labels=torch.tensor([0.0, 1.0])), r"integer class indices"),
    ("NaN pixels", dict(images=torch.full((2, 1, 8, 8), float("nan"))), r"NaN or inf pixels"),
    ("empty probe set", dict(images=torch.rand(0, 1, 8, 8), labels=torch.zeros(0, dtype=torch.long)), r"empty"),
    ("wrong std length", dict(std=(0.5, 0.5)), r"2 values but the images have 1 channels"),
]


@pytest.mark.parametrize("name, override, pattern", PROBE_CASES, ids=[c[0] for c in PROBE_CASES])
def test_bad_probe_sets_name_the_probe(name, override, pattern) -> None:
    args = dict(images=torch.rand(2, 1, 8, 8), labels=torch.tensor([0, 1]))
    args.update(override)
    with pytest.raises(cm.InputError, match=pattern):
        cm.ProbeSet(**args)


def test_failed_save_leaves_no_temporary_file(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        cm.ProbeSet(torch.rand(1, 1, 4, 4), torch.tensor([0])).save(blocker / "probes.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_gate_and_engine_inputs() -> None:
    with pytest.raises(ValueError, match="must look like '<= 1.5'"):
        cm.GatedModelCheckpoint(gate={"cam/quality": "== 1"})
    with pytest.raises(ValueError, match="needs gate"):
        cm.GatedModelCheckpoint(gate={})
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 3))
    with pytest.raises(cm.InputError, match=r"unsqueeze\(0\)"):
        cm.compute_cams(model, torch.rand(1, 8, 8), "0")
    with pytest.raises(cm.TargetError, match=r"\[3\] are out of range"):
        cm.compute_cams(model, torch.rand(2, 1, 8, 8), "0", targets=torch.tensor([0, 3]))


def test_logger_that_cannot_take_images_gets_png_files_instead(tmp_path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    fit(tmp_path, quick_monitor(), epochs=1, logger=CSVLogger(str(tmp_path), name="csv"))
    assert list((tmp_path / "csv" / "version_0" / "cam_monitor").glob("probe_grid_*.png"))
