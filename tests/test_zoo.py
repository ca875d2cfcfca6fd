"""The shortcut zoo: its data, and reduced monitored fits with NO masks (controls must stay quiet)."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from cam_monitor.alerts import describe_alert
from cam_monitor.demo.data import (BASES, CUES, PATCH, check_degradation, class_rulers, class_tags, degraded,
                                   make_decoy_digits)
from cam_monitor.demo.model import DecoyDigitsDataModule
from cam_monitor.demo.zoo import ZooRecord, mask_free_probes, run_task, truth_probes
from cam_monitor.discovery import DiscoverySettings


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("cue", CUES)
def test_each_cue_is_class_coded_in_the_shortcut_split_and_random_in_the_control(cue, base) -> None:
    data = make_decoy_digits(0, cue=cue, base=base)
    size = data.val.images.shape[-1]
    assert data.val.images.shape[1:] == ((1, 32, 32) if base == "digits" else (3, 64, 64))
    assert torch.equal(data.train_shortcut.decoy_class, data.train_shortcut.labels)
    agree = (data.train_control.decoy_class == data.train_control.labels).float().mean()
    assert 0.05 < agree < 0.2  # chance is 0.1
    masks = data.val.spurious_masks
    assert masks.flatten(1).any(1).all()
    assert (data.test_none.decoy_class == -1).all() and not data.test_none.spurious_masks.any()
    unit, margin = size // 32, size // 8
    if cue == "interior_patch":  # off the border: inside the object's region, never in the margin
        assert not masks[:, :margin].any() and not masks[:, -margin:].any() and not masks[:, :, :margin].any()
        assert (masks.flatten(1).sum(1) == (2 * unit * PATCH) ** 2).all()
    if cue == "corner_patch":  # the patch scales with the canvas: 4 x 4 px at 32, 8 x 8 at 64
        assert (masks.flatten(1).sum(1) == (unit * PATCH) ** 2).all()
    differs = (data.test_matched.images != data.test_none.images).flatten(2).any(2)
    assert differs.any(1).all()  # every matched image carries its cue
    if cue == "background_cast":  # on colour images a tint of every channel
        assert differs.all(1).all()


@pytest.mark.parametrize("base", BASES)
def test_the_text_tag_is_a_class_coded_string_in_a_corner_one_font_pixel_in(base) -> None:
    tags = class_tags()
    assert tags.shape == (10, 5, 11)
    assert len({t.flatten().tolist().__str__() for t in tags}) == 10  # every class writes its own string
    data = make_decoy_digits(0, cue="text_tag", base=base)
    size = data.val.images.shape[-1]
    unit = size // 32
    for mask in data.val.spurious_masks[:40]:
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        assert (len(rows), len(cols)) == (5 * unit, 11 * unit)
        assert int(rows.min()) in (unit, size - unit - 5 * unit) and int(cols.min()) in (unit, size - unit - 11 * unit)
    corners = {(int(m.any(1).nonzero()[0]), int(m.any(0).nonzero()[0])) for m in data.val.spurious_masks}
    assert len(corners) == 4  # the corner is random


@pytest.mark.parametrize("base", BASES)
def test_the_ruler_lies_beside_the_object_its_ticks_coding_the_class(base) -> None:
    rulers = class_rulers()
    assert rulers.shape == (10, 4, 16) and rulers[:, 3].all()  # a bar, and ticks above it
    assert len({r.flatten().tolist().__str__() for r in rulers}) == 10
    data = make_decoy_digits(0, cue="ruler", base=base)
    unit = data.val.images.shape[-1] // 32
    masks, objects = data.val.spurious_masks, data.val.object_masks
    assert (masks.flatten(1).sum(1) == 4 * 16 * unit * unit).all()
    overlap = (masks & objects).flatten(1).sum(1).float() / masks.flatten(1).sum(1)
    assert overlap.median() == 0 and overlap.max() < 0.5  # beside the object, at most partly over it near an edge
    grown = torch.nn.functional.max_pool2d(objects[:, None].float(), 2 * 4 * unit + 1, 1, 4 * unit)[:, 0] > 0
    near = (masks & grown).flatten(1).any(1).float().mean()
    assert near > 0.95  # within a ruler's depth of the object
    upright = masks.any(2).sum(1) > masks.any(1).sum(1)  # taller than wide
    assert 0.3 < upright.float().mean() < 0.7  # the side is random: upright left and right, flat above and below


def test_drawn_shapes_are_ten_balanced_classes_on_varied_backgrounds_built_from_a_private_generator() -> None:
    from cam_monitor.demo.shapes import SHAPES, shapes_dataset

    before = torch.random.get_rng_state()
    images, labels, objects = shapes_dataset()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert images.shape == (1800, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(labels.bincount(), torch.full((len(SHAPES),), 180))
    area = objects.flatten(1).sum(1)
    assert (area > 40).all() and not objects[:, :2].any() and not objects[:, :, -2:].any()  # 2 px off the border
    background = torch.stack([img[:, ~mask].mean(1) for img, mask in zip(images[:50], objects[:50])])
    assert background.std(0).min() > 0.03 and background.max() <= 0.45  # varied, dark: the objects stand out
    with pytest.raises(ValueError, match="base must be one of"):
        make_decoy_digits(0, base="cifar")


def test_the_demo_cnn_ends_on_an_8x8_grid_at_32_and_at_64_px() -> None:
    from cam_monitor.demo.model import SmallCNN

    for size, blocks in ((32, 3), (64, 4)):
        net = SmallCNN(3, image_size=size)
        assert net.features(torch.rand(2, 3, size, size)).shape[-2:] == (8, 8)
        assert sum(isinstance(m, torch.nn.Conv2d) for m in net.features) == blocks
    assert "features.6.weight" in SmallCNN().state_dict() and "features.9.weight" not in SmallCNN().state_dict()


def test_the_zoo_also_trains_a_resnet18_whose_layer4_is_a_4x4_grid() -> None:
    from cam_monitor.demo.model import ARCHS, DigitClassifier
    from cam_monitor.layers import resolve_layer

    model = DigitClassifier(arch="resnet18")
    _, layer = resolve_layer(model, ARCHS["resnet18"])
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    finally:
        handle.remove()
    assert seen == [(2, 512, 4, 4)]
    with pytest.raises(ValueError, match="arch must be one of"):
        DigitClassifier(arch="vit")


def test_only_shortcut_confirmed_counts_as_a_detection() -> None:
    """A drift rule fires on maps that move (a model learning anything); the detector is shortcut_confirmed."""
    alerts = [{"epoch": 1, "rule": "drift_off_object"}, {"epoch": 3, "rule": "shortcut_confirmed"}]
    record = ZooRecord("interior_patch", "shortcut", 0, [{"epoch": e, "accuracy_gap": 0.3} for e in range(4)], alerts)
    assert record.first_alert_epoch == 1 and record.confirmed_epoch == 3 and record.gap_epoch == 0
    assert ZooRecord("corner_patch", "shortcut", 0, [], alerts[:1]).confirmed_epoch is None


def test_the_monitor_sees_the_truth_probes_without_their_masks() -> None:
    truth, blind = truth_probes("text_tag", 1, 32), mask_free_probes("text_tag", 1, 32)
    assert torch.equal(truth.images, blind.images) and truth.ids == blind.ids
    assert blind.spurious_masks is None and blind.object_masks is None
    assert truth.spurious_masks.flatten(1).any(1).all()  # every validation probe carries its tag


def test_an_unknown_cue_is_refused() -> None:
    with pytest.raises(ValueError, match="cue must be one of"):
        make_decoy_digits(0, cue="watermark")


def test_each_degradation_keeps_the_value_range_and_is_deterministic() -> None:
    images = 0.2 + 0.6 * torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seeded = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(degraded(images, "clean", seeded()), images)
    for how in ("noise0.02", "jpeg75"):
        out = degraded(images, how, seeded())
        assert out.shape == images.shape and out.dtype == images.dtype and not torch.equal(out, images)
        assert float(out.min()) >= float(images.min()) - 1e-6 and float(out.max()) <= float(images.max()) + 1e-6
        assert torch.equal(out, degraded(images, how, seeded()))
    assert (degraded(images, "noise0.02", seeded()) - images).std() == pytest.approx(0.02 * 0.6, rel=0.3)
    grey = images[:, :1]  # JPEG encodes one channel as well as three
    assert (degraded(grey, "jpeg75", seeded()) - grey).abs().amax() > 0


@pytest.mark.parametrize("how", ["blur", "noise", "noise0", "noise1.5", "noise-0.1", "jpeg0", "jpeg101", "jpeg9.5",
                                 "jpegx", "Clean"])
def test_a_degradation_it_cannot_read_is_refused_with_the_forms_it_takes(how) -> None:
    with pytest.raises(ValueError, match=r"degradation must be 'clean', 'noiseS'.*'jpegQ'.*got"):
        check_degradation(how)
    with pytest.raises(ValueError, match="degradation must be"):
        make_decoy_digits(0, degradation=how)
    with pytest.raises(ValueError, match="degradation must be"):
        DecoyDigitsDataModule(degradation=how)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("how", ["noise0.02", "jpeg90"])
def test_a_degraded_build_is_the_clean_build_through_noise_or_jpeg(base, how) -> None:
    """Every split's images change, a little; the labels, cues and masks are the clean build's, so
    the shortcut and its control differ only in what the cue codes, as they do clean."""
    clean, noisy = make_decoy_digits(4, cue="text_tag", base=base), make_decoy_digits(4, cue="text_tag", base=base,
                                                                                      degradation=how)
    for name in ("train_shortcut", "train_control", "val", "test_matched", "test_random", "test_none"):
        a, b = getattr(clean, name), getattr(noisy, name)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.decoy_class, b.decoy_class)
        assert torch.equal(a.spurious_masks, b.spurious_masks) and torch.equal(a.object_masks, b.object_masks)
        change = (b.images - a.images).abs()
        assert 0 < float(change.mean()) < 0.03 and float(b.images.min()) >= 0 and float(b.images.max()) <= 1
    assert torch.equal(noisy.val.images, make_decoy_digits(4, cue="text_tag", base=base, degradation=how).val.images)
    probes = truth_probes("text_tag", 4, 16, base, how)
    assert torch.equal(probes.images, mask_free_probes("text_tag", 4, 16, base, how).images)
    assert not torch.equal(probes.images, truth_probes("text_tag", 4, 16, base).images)


@pytest.mark.parametrize("cue", CUES)
def test_no_alert_on_any_control_of_the_zoo(cue, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_task(cue, "control", 0, 3, str(tmp_path))
    assert run.alerts == [], run.alerts
    assert max(abs(r["accuracy_gap"]) for r in run.rows) < 0.1  # the ground truth agrees: no shortcut


@pytest.mark.parametrize("cue", ["interior_patch", "text_tag", "ruler"])
def test_with_the_cues_marked_no_alert_on_a_floating_cue_control(cue, tmp_path) -> None:
    """The probes carry the true cue masks, as a user who marked the cue gives them: the marked arm
    tests them at every evaluation (with the mask rules), and a control, whose cue is random, stays quiet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_task(cue, "control", 0, 3, str(tmp_path), spurious_masks=True)
    assert run.monitor.probes.spurious_masks is not None and run.monitor.probes.object_masks is None
    assert any(r["evidence_pairs"].get("marked") for r in run.rows)
    assert run.alerts == [], run.alerts


def test_with_the_objects_outlined_the_object_rules_judge_and_a_control_stays_quiet(tmp_path) -> None:
    """The probes carry the true object masks, as a user who outlined the objects gives them: the
    object metrics are logged, and a control model, which reads the digit, raises no alert."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_task("corner_patch", "control", 0, 3, str(tmp_path), object_masks=True)
    assert run.monitor.probes.object_masks is not None and run.monitor.probes.spurious_masks is None
    assert all(r["cam/object_enrichment"] > 1 for r in run.rows[1:])  # past the first epoch: on the digit
    assert run.alerts == [], run.alerts


@pytest.mark.slow
def test_with_the_tag_marked_the_tag_shortcut_is_confirmed_by_the_marked_arm(tmp_path) -> None:
    """The text tag, which the local test misses (wider than a cell), marked: confirmed, the
    marked arm the strongest test (digits, seed 2: at epoch 2 of 4, the gap past 0.2 from epoch 0).
    The recurring arm, which finds the same tag without masks, is off here: this is the marked arm's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_task("text_tag", "shortcut", 2, 4, str(tmp_path), spurious_masks=True,
                       discovery=DiscoverySettings(recurring_test=False))
    confirmed = [a for a in run.alerts if a["rule"] == "shortcut_confirmed"]
    assert confirmed, run.alerts
    tests = confirmed[0]["evidence_by_test"]
    assert max((a for a in tests if a != "all"), key=tests.get) == "marked"


@pytest.mark.slow
def test_without_masks_the_tag_shortcut_is_confirmed_by_the_recurring_arm_and_its_control_is_not(tmp_path) -> None:
    """The text tag is drawn the same in every probe that carries it, at one of four corners: the
    recurrence finder boxes it from the probes alone and the recurring arm confirms the shortcut
    (digits, seed 2: at epoch 2, the gap past 0.2 from epoch 0; the zoo's run); the control, whose
    model never learnt the tag, raises nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shortcut = run_task("text_tag", "shortcut", 2, 3, str(tmp_path / "s"))
        control = run_task("text_tag", "control", 2, 3, str(tmp_path / "c"))
    confirmed = [a for a in shortcut.alerts if a["rule"] == "shortcut_confirmed"]
    assert confirmed and confirmed[0]["epoch"] <= 2, shortcut.alerts
    tests = confirmed[0]["evidence_by_test"]
    assert max((a for a in tests if a != "all"), key=tests.get) == "recurring"
    assert control.alerts == [] and any(r["evidence_pairs"].get("recurring") for r in control.rows)
    # the alert names the tags it found, and the export marks them, though nobody marked them
    truth = truth_probes("text_tag", 2).spurious_masks
    ids = {pid: i for i, pid in enumerate(shortcut.monitor.probes.ids)}
    found = [r for r in confirmed[0]["regions"] if r["test"] == "recurring" and r["outcome"] > 0]
    boxes = [(ids[pid], box) for r in found for pid, box in zip(r["probe_ids"], r["boxes"])]
    assert boxes and all(truth[i, y0:y1, x0:x1].any() for i, (y0, x0, y1, x1) in boxes)
    exported = shortcut.monitor.inferred_probes().spurious_masks
    assert exported.any() and (exported & truth).sum() >= 0.5 * exported.sum()


@pytest.mark.slow
def test_under_sensor_noise_the_tag_shortcut_is_confirmed_by_the_tolerant_keys_and_its_control_is_not(tmp_path) -> None:
    """Every image under Gaussian noise of 2 % of the range: no two copies of the tag are the same
    pixels. The recurring arm still finds and confirms it (digits, seed 0: at epoch 1, the gap past
    0.2 from epoch 1; the noisy zoo's run); with the exact keys alone it never runs, and nothing
    confirms the shortcut; the noisy control raises nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shortcut = run_task("text_tag", "shortcut", 0, 2, str(tmp_path / "s"), degradation="noise0.02")
        exact = run_task("text_tag", "shortcut", 0, 2, str(tmp_path / "e"), degradation="noise0.02",
                         discovery=DiscoverySettings(recurring_tolerant=False))
        control = run_task("text_tag", "control", 0, 2, str(tmp_path / "c"), degradation="noise0.02")
    assert max(r["accuracy_gap"] for r in exact.rows) > 0.2  # the exact-keys model uses the tag too
    confirmed = [a for a in shortcut.alerts if a["rule"] == "shortcut_confirmed"]
    assert confirmed and confirmed[0]["epoch"] <= 1, shortcut.alerts
    tests = confirmed[0]["evidence_by_test"]
    assert max((a for a in tests if a != "all"), key=tests.get) == "recurring"
    assert not any(r["evidence_pairs"].get("recurring") for r in exact.rows)
    assert not any(a["rule"] == "shortcut_confirmed" for a in exact.alerts), exact.alerts
    assert control.alerts == [] and any(r["evidence_pairs"].get("recurring") for r in control.rows)


@pytest.mark.slow
@pytest.mark.parametrize("cue", ["background_cast", "interior_patch"])
def test_no_alert_on_the_drawn_shapes_controls_whose_objects_fit_a_window(cue, tmp_path) -> None:
    """Drawn Shapes' objects (20-32 px) fit a 2x2-cell window; with that window these two controls
    alerted from the local test (seed 0). One-cell windows and the next-best control keep them quiet."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_task(cue, "control", 0, 6, str(tmp_path), base="shapes")
    assert run.alerts == [], run.alerts
    assert max(r["cam/shortcut_evidence"] for r in run.rows) < 100


def test_the_corner_shortcut_is_found_without_masks_held_and_its_region_named_and_exported(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_task("corner_patch", "shortcut", 0, 3, str(tmp_path))
    # four arms share the first evaluation's pairs: seed 0 is confirmed at the third evaluation
    assert run.gap_epoch == 0 and run.first_alert_epoch is not None and run.first_alert_epoch <= 2
    (alert,) = run.alerts
    assert alert["rule"] == "shortcut_confirmed" and alert["metric"] == "cam/shortcut_evidence"
    assert alert["value"] >= alert["threshold"] == 1000.0  # 1 / alpha
    assert "shortcut_confirmed" in run.monitor.active_alerts  # still active at the last epoch: the model still cheats
    # the last evaluation alone, its pairs led by the evidence (0 to 0.016 measured at two kernel levels
    # and two thread counts, whose training numerics differ)
    assert run.rows[-1]["cam/shortcut_p"] < 0.05
    truth = make_decoy_digits(0, cue="corner_patch").val
    probes = run.monitor.probes
    ids = {pid: i for i, pid in enumerate(probes.ids)}
    assert [-r["outcome"] for r in alert["regions"]] == sorted(-r["outcome"] for r in alert["regions"])  # strongest first
    assert all(r["outcome"] == pytest.approx(r["flip_rate"] - r["control_rate"]) for r in alert["regions"]
               if r["test"] == "local")
    # The regions named while the alert is active: at the evaluation it fired and the last one. Which
    # of them flipped depends on the CPU's kernels: where the border arm carries the first alert, that
    # evaluation's few local pairs may all tie (measured on an Intel Xeon; on AMD EPYC they flipped).
    last = run.monitor.monitor.last_evaluation
    named_regions = alert["regions"] + last.discovery.regions(probes.ids, probes.class_names,
                                                              last.discovery.backed_classes(last.evidence))
    assert any(r["flip_rate"] > r["control_rate"] for r in named_regions)
    # the boxes of the regions that flipped cover their probe's decoy, which nobody marked
    picked = mask_free_probes("corner_patch", 0)
    assert torch.equal(picked.images, probes.images)
    covered, named = 0, 0
    for region in named_regions:
        if region["flip_rate"] <= region["control_rate"]:
            continue
        for pid, (y0, x0, y1, x1) in zip(region["probe_ids"], region["boxes"]):
            decoy = _truth_mask(truth, probes.images[ids[pid]])
            covered += bool(decoy[y0:y1, x0:x1].any())
            named += 1
            assert (y1 - y0) * (x1 - x0) == PATCH * PATCH  # one cell of the 8x8 grid (box_cells=1)
    assert named and covered >= 0.75 * named, (covered, named)
    logged = [json.loads(line) for line in (tmp_path / "cam_monitor" / "alerts.jsonl").read_text().splitlines()]
    assert logged[0]["regions"] == alert["regions"]
    exported = run.monitor.inferred_probes()
    assert exported.spurious_masks is not None and exported.spurious_masks.flatten(1).any(1).sum() >= 1
    shown = run.monitor.monitor.shown_regions  # the active alert's boxes are drawn
    assert shown is not None and shown.flatten(1).any(1).sum() >= 1
    assert exported.images is probes.images or torch.equal(exported.images, probes.images)


def test_a_brightness_cast_is_confirmed_by_the_colour_statistics_swap(tmp_path) -> None:
    """Nothing local to paste: the maps spread over the cast, the colour arm finds it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_task("background_cast", "shortcut", 0, 2, str(tmp_path))
    assert run.gap_epoch == 0 and [a["rule"] for a in run.alerts] == ["shortcut_confirmed"]
    last = run.rows[-1]
    assert last["cam/colour_flip_excess"] > 0.2 and last["cam/shortcut_evidence"] >= 1000
    by_test = {arm: e for arm, e in run.alerts[0]["evidence_by_test"].items() if arm != "all"}
    assert max(by_test, key=by_test.get) == "colour"  # the alert says what kind of cue it is
    assert "strongest test: colour statistics" in describe_alert(run.alerts[0])


@pytest.fixture(scope="module")
def border_frame_run(tmp_path_factory):
    """A two-epoch fit of the border-frame shortcut (shared: it costs a fit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_task("border_frame", "shortcut", 0, 2, str(tmp_path_factory.mktemp("border_frame")))


def test_a_border_frame_is_confirmed_by_the_border_band_and_the_alert_says_so(border_frame_run) -> None:
    """A one-pixel frame: neither one window nor an image statistic; the band swap finds it."""
    run = border_frame_run
    # by the second evaluation, the epoch after the gap passes 0.2 (the first has 16 border pairs)
    assert run.gap_epoch == 0 and run.first_alert_epoch <= 1 and "shortcut_confirmed" in run.monitor.active_alerts
    assert run.rows[-1]["cam/shortcut_evidence"] > 1000
    assert all(r["cam/border_flip_excess"] > 0.8 for r in run.rows)
    by_test = run.alerts[0]["evidence_by_test"]
    assert set(by_test) == {"local", "colour", "border", "detail", "texture", "all"}
    by_test.pop("all")
    assert max(by_test, key=by_test.get) == "border" and by_test["border"] >= 1000 > by_test["local"]
    assert "strongest test: the border band (band swap)" in describe_alert(run.alerts[0])
    # the paste test's pairs are against a cue: no box is offered as the frame, none drawn or exported
    assert by_test["local"] <= 1 and run.alerts[0]["regions"] == [] and "regions:" not in describe_alert(run.alerts[0])
    assert run.monitor.monitor.shown_regions is None
    assert not run.monitor.inferred_probes().spurious_masks.any()


def _truth_mask(split, image: torch.Tensor) -> torch.Tensor:
    """The decoy mask of the validation image equal to ``image``."""
    (i,) = (split.images.flatten(1) == image.flatten()).all(1).nonzero()[:, 0].tolist()[:1]
    return split.spurious_masks[i]


def test_the_zoo_records_the_evidence_streams_and_replays_the_alert_from_them(border_frame_run) -> None:
    """Each row keeps the monitor's evidence streams; the monitor's own statistic of them is the
    logged evidence, and replaying the alert under it gives the run's alert and its end state."""
    from cam_monitor.demo.zoo import replayed
    from cam_monitor.discovery import DiscoverySettings
    from cam_monitor.evidence import EvidenceState

    run = border_frame_run
    arms = DiscoverySettings().arms_on((8, 8), (32, 32))
    own = lambda row: EvidenceState(dict(row["evidence_streams"])).value(arms)  # noqa: E731
    replay = EvidenceState(cap=2 * math.log(1e3))
    for row in run.rows:
        assert set(row["evidence_streams"]) == {*arms, "all"} and set(row["evidence_pairs"]) == set(arms)
        assert own(row) == pytest.approx(row["cam/shortcut_evidence"])
        replay = replay.update({a: torch.tensor(d) for a, d in row["evidence_pairs"].items()}, DiscoverySettings().bets,
                               DiscoverySettings().margins, pool=arms)
        assert replay.log_detector == pytest.approx(row["evidence_streams"])  # the pairs are the evidence's
    assert replayed(run.rows, own) == (run.confirmed_epoch, run.active_at_end) and run.confirmed_epoch is not None
    assert replayed(run.rows, lambda row: 1.0) == (None, False)
    cleared = [{**row, "evidence_streams": {"all": v}} for row, v in zip(run.rows, (math.log(2e3), 0.0))]
    assert replayed(cleared, lambda row: math.exp(row["evidence_streams"]["all"])) == (0, False)  # fired, cleared at 1
