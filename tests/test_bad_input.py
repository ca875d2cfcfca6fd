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
    (dict(images_every_n_evals=-1), r"PictureSettings: every_n_evals must be an int >= 0"),
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
    ("mask of another aspect ratio", dict(spurious_masks=torch.zeros(2, 8, 4, dtype=torch.bool)),
     r"mask shape \(8, 4\) .* image shape \(8, 8\) and differs in aspect ratio"),
]


@pytest.mark.parametrize("name, override, pattern", PROBE_CASES, ids=[c[0] for c in PROBE_CASES])
def test_bad_probe_sets_name_the_probe(name, override, pattern) -> None:
    args = dict(images=torch.rand(2, 1, 8, 8), labels=torch.tensor([0, 1]))
    args.update(override)
    with pytest.raises(cm.InputError, match=pattern):
        cm.ProbeSet(**args)


def test_masks_of_the_same_aspect_ratio_are_resized_to_their_image() -> None:
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[:, :8, :8] = True
    probes = cm.ProbeSet(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), spurious_masks=masks)
    assert probes.spurious_masks.shape == (2, 8, 8) and int(probes.spurious_masks[0].sum()) == 16


def write_folder(root, files: dict[str, tuple[int, int]]) -> str:
    """A probe folder with one class sub-folder: ``files`` maps names to (H, W) of grey PNGs."""
    from torchvision.io import write_png

    (root / "cls0").mkdir(parents=True)
    for name, (h, w) in files.items():
        write_png(torch.full((1, h, w), 255, dtype=torch.uint8), str(root / "cls0" / name))
    return str(root)


FOLDER_CASES = [
    ("mask of another aspect ratio", {"a.png": (8, 8), "a.spurious.png": (8, 4)},
     r"mask '.*cls0/a.spurious.png': mask shape \(8, 4\) .* image shape \(8, 8\)"),
    ("mask file without its image", {"a.png": (8, 8), "b.spurious.png": (8, 8), "c.object.png": (8, 8)},
     r"2 mask file\(s\) have no image of the same name .*cls0/b.spurious.png, cls0/c.object.png"),
]


@pytest.mark.parametrize("name, files, pattern", FOLDER_CASES, ids=[c[0] for c in FOLDER_CASES])
def test_bad_probe_folders_name_the_file(tmp_path, name, files, pattern) -> None:
    with pytest.raises(cm.InputError, match=pattern):
        cm.ProbeSet.from_folder(write_folder(tmp_path / "probes", files))


def test_a_folder_mask_drawn_at_another_resolution_is_resized(tmp_path) -> None:
    probes = cm.ProbeSet.from_folder(write_folder(tmp_path / "probes", {"a.png": (8, 8), "a.spurious.png": (16, 16)}))
    assert probes.spurious_masks.shape == (1, 8, 8) and bool(probes.spurious_masks.all())


def random_digits(size: int, n: int = 4) -> cm.ProbeSet:
    """Probes the demo CNN takes (1 channel) at ``size`` px, without masks."""
    return cm.ProbeSet(torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0)), torch.arange(n))


#: Settings and schedules that cannot act in a fit: (name, monitor arguments, trainer arguments, the warning's words).
INERT_CASES = [
    ("mask rule threshold without masks", dict(probes=random_digits(32), spurious_enrichment=5.0), {},
     r"spurious_enrichment=5.0 can never alert: its rule judges spurious masks .* give spurious_masks"),
    ("object floor without object masks", dict(probes=random_digits(32), object_enrichment_floor=0.3), {},
     r"object_enrichment_floor=0.3 can never alert: .* give object_masks"),
    ("drift threshold without any mask", dict(probes=random_digits(32), drift_threshold=0.4), {},
     r"drift_threshold=0.4 can never alert: drift_off_object judges whether the maps left the object"),
    ("discovery threshold with discovery off", dict(probes=random_digits(32), shortcut_flip_excess=0.2,
                                                    discovery=False), {},
     r"DiscoverySettings: min_effect=0.2 can never alert: .*\(enabled=False\)"),
    ("grid too coarse for the border-band metrics", dict(probes=random_digits(8)), {},
     r"2x2 grid of layer 'net.features'.* cam/spurious_energy, cam/spurious_enrichment, cam/spurious_energy_rise are "
     r"the same number whatever the model does"),
    ("max_steps before the first validation", {}, dict(max_steps=3),
     r"Trainer\(max_steps=3\) ends the fit before the monitor's first evaluation \(the first validation, after 8 "
     r"optimizer steps\)"),
    ("a fit that never evaluated says so at its end", {}, dict(max_steps=3),
     r"this fit ended without a single evaluation \(the fit ended at step 3, before any validation"),
]
INERT_WORDS = r"can never alert|the same number whatever|ends the fit before|without a single evaluation"


def fit_warnings(tmp_path, monitor_kwargs: dict, trainer_kwargs: dict) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, quick_monitor(**monitor_kwargs), epochs=1, **trainer_kwargs)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("name, monitor_kwargs, trainer_kwargs, pattern", INERT_CASES, ids=[c[0] for c in INERT_CASES])
def test_a_setting_that_cannot_act_is_named_with_its_fix(tmp_path, name, monitor_kwargs, trainer_kwargs, pattern) -> None:
    import re

    said = fit_warnings(tmp_path, monitor_kwargs, trainer_kwargs)
    assert any(re.search(pattern, m) for m in said), said


def test_a_run_whose_settings_all_act_hears_none_of_those_warnings(tmp_path) -> None:
    import re

    said = fit_warnings(tmp_path, {}, {})
    assert not [m for m in said if re.search(INERT_WORDS, m)]


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
