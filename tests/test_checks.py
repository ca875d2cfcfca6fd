"""The check before training: what one CAM pass over the first probes says, as sentences with fixes."""
from __future__ import annotations

import torch

import cam_monitor as cm
from cam_monitor.checks import dry_run_findings
from cam_monitor.discovery import DiscoverySettings
from cam_monitor.engine import CAMResult
from cam_monitor.evaluation import EvalSettings


def rand(*shape: int) -> torch.Tensor:
    """Uniform values from a fixed seed: no test here reads the global RNG, so none depends on the
    order the tests run in."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(0))


def result(maps: torch.Tensor, **kw) -> CAMResult:
    return CAMResult(maps={"gradcam": maps[:, None]}, logits=torch.zeros(len(maps), 3),
                     targets=torch.zeros(len(maps), 1, dtype=torch.long), layer_name="body", squeeze_targets=True, **kw)


def probes(n: int = 2, size: int = 64, masks: bool = False) -> cm.ProbeSet:
    spur = None
    if masks:
        spur = torch.zeros(n, size, size, dtype=torch.bool)
        spur[:, :8, :8] = True
    return cm.ProbeSet(rand(n, 3, size, size), torch.zeros(n, dtype=torch.long), spurious_masks=spur)


def test_a_healthy_pass_says_nothing() -> None:
    found = dry_run_findings(result(rand(12, 8, 8)), probes(12, masks=True), EvalSettings(), 4.0, "cam")
    assert found.warnings == [] and found.notes == []


def test_too_few_marked_probes_for_the_drift_rules_sign_test_are_warned_with_the_fix() -> None:
    """Without object masks the drift rule's sign test over the marked probes needs 10 of them to
    reach 1e-3 (2 ** -10); with 9 it can never fire, and fit start says so; object masks lift it."""
    from cam_monitor.checks import marked_probes_needed

    assert marked_probes_needed() == 10 and marked_probes_needed(0.01) == 7
    few = dry_run_findings(result(rand(9, 8, 8)), probes(9, masks=True), EvalSettings(), 4.0, "cam")
    (warning,) = [w for w in few.warnings if "drift_off_object" in w]
    assert "only 9 probe(s)" in warning and "cam/spurious_rise_p" in warning and "at least 10" in warning
    assert "mark the cue on more probes, or give object masks" in warning
    with_objects = probes(9, masks=True)
    with_objects = cm.ProbeSet(with_objects.images, with_objects.labels, spurious_masks=with_objects.spurious_masks,
                               object_masks=~with_objects.spurious_masks)
    found = dry_run_findings(result(rand(9, 8, 8)), with_objects, EvalSettings(), 4.0, "cam")
    assert not any("drift_off_object" in w for w in found.warnings)
    enough = dry_run_findings(result(rand(10, 8, 8)), probes(10, masks=True), EvalSettings(), 4.0, "cam")
    assert not any("drift_off_object" in w for w in enough.warnings)


def test_zero_maps_name_the_cause() -> None:
    zero = dry_run_findings(result(torch.zeros(12, 8, 8), zero_gradient=True), probes(12, masks=True), EvalSettings(),
                            4.0, "cam/x")
    assert len(zero.warnings) == 1 and "zero-initialises ViT heads" in zero.warnings[0]
    assert "counted in cam/x/degenerate" in zero.warnings[0]
    negative = dry_run_findings(result(torch.zeros(2, 8, 8)), probes(masks=True), EvalSettings(), 4.0, "cam")
    assert "evidence is negative" in negative.warnings[0]


def test_a_coarse_grid_the_band_and_a_shared_layer_are_warned_and_channels_last_noted() -> None:
    from cam_monitor.discovery import DiscoverySettings

    two_cells = EvalSettings(discovery=DiscoverySettings(box_cells=2))
    found = dry_run_findings(result(rand(2, 2, 2), layer_calls=2, layout="nhwc"), probes(), two_cells, 4.0,
                             "cam")
    text = " | ".join(found.warnings)
    assert "pointing_spurious is 1.0" in text and "runs 2 times in one forward" in text
    # mask-free, the band's enrichment does not alert (nothing to warn about), but discovery cannot work
    assert "no map can put more than" not in text
    assert "covers 100% of the image: the local paste test cannot tell" in text
    one_cell = dry_run_findings(result(rand(2, 2, 2), layout="nhwc"), probes(), EvalSettings(), 4.0, "cam")
    assert not any("local paste test" in w for w in one_cell.warnings)  # one cell of 2x2 is a quarter: allowed
    assert found.notes[0] == "layer 'body' outputs channels-last (B, h, w, C); reading it so (pass layout='nchw' to override)"


def test_a_grid_too_coarse_for_the_detail_and_texture_tests_is_warned_with_the_fix() -> None:
    coarse = dry_run_findings(result(rand(2, 3, 3)), probes(), EvalSettings(), 4.0, "cam")
    assert any("detail and texture tests need a grid of at least 4x4" in w and "3x3" in w
               and "detail_test=False, texture_test=False" in w for w in coarse.warnings)
    one = EvalSettings(discovery=DiscoverySettings(detail_test=False))
    alone = dry_run_findings(result(rand(2, 3, 3)), probes(), one, 4.0, "cam").warnings
    assert any("texture test needs a grid" in w and "it does not run" in w and "(texture_test=False)" in w for w in alone)
    assert not any("detail test" in w or "texture test" in w for w in dry_run_findings(
        result(rand(2, 4, 4)), probes(), EvalSettings(), 4.0, "cam").warnings)


def test_a_grid_too_coarse_for_the_users_masks_is_warned() -> None:
    found = dry_run_findings(result(rand(2, 2, 2)), probes(masks=True), EvalSettings(), 4.0, "cam")
    assert any("no map can put more than" in w and "spurious masks" in w for w in found.warnings)


def test_no_masks_and_no_discovery_says_nothing_watches_for_shortcuts() -> None:
    from cam_monitor.discovery import DiscoverySettings

    off = EvalSettings(discovery=DiscoverySettings(enabled=False))
    found = dry_run_findings(result(rand(2, 8, 8)), probes(), off, 4.0, "cam")
    assert any("nothing watches for shortcuts" in w for w in found.warnings)
    assert dry_run_findings(result(rand(2, 8, 8)), probes(), EvalSettings(), 4.0, "cam").warnings == []


def test_images_too_small_for_the_border_test_are_warned_with_the_fix() -> None:
    found = dry_run_findings(result(rand(2, 2, 2)), probes(size=6), EvalSettings(), 4.0, "cam")
    assert any("border test" in w and "6x6 images" in w and "border_test=False" in w for w in found.warnings)
    assert not any("border test needs" in w for w in dry_run_findings(result(rand(2, 2, 2)), probes(size=7),
                                                                 EvalSettings(), 4.0, "cam").warnings)


def test_without_masks_fit_start_says_how_large_a_cue_the_local_test_can_see_and_the_fix() -> None:
    """The local test sees a cue that fits in its window (one cell: 8 x 8 px of 64 px probes on an 8 x 8
    grid); a larger one is missed whatever the model does, so fit start says so, names the tests
    that still run there and the fixes. With spurious masks, or without the local test, nothing."""
    from cam_monitor.discovery import DiscoverySettings

    (note,) = dry_run_findings(result(rand(2, 8, 8)), probes(), EvalSettings(), 4.0, "cam").notes
    assert "fits in one cell of layer 'body' (8x8 px of the 64x64 probes)" in note
    assert "stamp, tag or ruler larger than that is missed" in note
    assert "(the colour, border, detail and texture tests still run)" in note
    assert "give spurious masks" in note and "target a layer whose cells are at least as large as the cue" in note
    coarse = dry_run_findings(result(rand(2, 2, 2)), probes(), EvalSettings(), 4.0, "cam").notes
    assert "fits in one cell of layer 'body' (32x32 px" in coarse[0] and "(the colour and border tests still run)" in coarse[0]
    two = EvalSettings(discovery=DiscoverySettings(box_cells=2, colour_test=False, border_test=False,
                                                   detail_test=False, texture_test=False))
    (alone,) = dry_run_findings(result(rand(2, 8, 8)), probes(), two, 4.0, "cam").notes
    assert "fits in 2x2 cells of layer 'body' (16x16 px" in alone and "still run" not in alone
    assert dry_run_findings(result(rand(2, 8, 8)), probes(masks=True), EvalSettings(), 4.0, "cam").notes == []
    assert "nothing recurs across the probes, so the recurring test" in note
    off = EvalSettings(discovery=DiscoverySettings(enabled=False))
    assert dry_run_findings(result(rand(2, 8, 8)), probes(), off, 4.0, "cam").notes == []


def seeded_maps(n: int) -> torch.Tensor:
    """(n, 8, 8) maps from their own seeded generator (the notes below do not read their values)."""
    return torch.rand(n, 8, 8, generator=torch.Generator().manual_seed(1))


def drawn_probes(side: int, places: list[tuple[int, int]]) -> cm.ProbeSet:
    """Six 64 x 64 probes of one flat colour each, the first ``len(places)`` with the same random
    ``side`` x ``side`` pattern drawn at their place."""
    gen = torch.Generator().manual_seed(0)
    images = 0.1 * torch.rand(6, 3, 1, 1, generator=gen).expand(6, 3, 64, 64).clone()
    pattern = (torch.rand(side, side, generator=gen) < 0.5).float()
    for i, (y, x) in enumerate(places):
        images[i, :, y:y + side, x:x + side] = pattern
    return cm.ProbeSet(images, torch.zeros(6, dtype=torch.long))


def test_fit_start_says_in_how_many_probes_the_recurring_test_found_content_drawn_the_same() -> None:
    """Four of six probes carry the same 8 x 8 stamp at their own places: the note counts them, and says
    the recurring test tests it whole; with the test off it says nothing of it."""
    from cam_monitor.discovery import DiscoverySettings

    stamped = drawn_probes(8, [(3, 5), (40, 12), (20, 50), (50, 50)])
    (note,) = dry_run_findings(result(seeded_maps(6)), stamped, EvalSettings(), 4.0, "cam").notes
    assert "the recurring test found content drawn the same in 4 of 6 probes and tests it whole" in note
    off = EvalSettings(discovery=DiscoverySettings(recurring_test=False))
    (quiet,) = dry_run_findings(result(seeded_maps(6)), stamped, off, 4.0, "cam").notes
    assert "recurring" not in quiet and "is missed by it" in quiet


def test_fit_start_says_when_only_copies_under_noise_recur_and_the_tolerant_keys_are_off() -> None:
    """The stamp under sensor noise is no longer the same pixels: with the tolerant keys (the
    default) the note counts its probes; without them it says nothing recurs pixel for pixel and
    names the setting that finds it."""
    from cam_monitor.discovery import DiscoverySettings

    stamped = drawn_probes(12, [(3, 5), (40, 12), (20, 40), (44, 44)])
    gen = torch.Generator().manual_seed(1)
    noisy = cm.ProbeSet((stamped.images + 0.03 * torch.randn(stamped.images.shape, generator=gen)).clamp(0, 1),
                        stamped.labels)
    (note,) = dry_run_findings(result(seeded_maps(6)), noisy, EvalSettings(), 4.0, "cam").notes
    assert "the recurring test found content drawn the same in 4 of 6 probes" in note
    exact = EvalSettings(discovery=DiscoverySettings(recurring_tolerant=False))
    (blind,) = dry_run_findings(result(seeded_maps(6)), noisy, exact, 4.0, "cam").notes
    assert "nothing recurs pixel for pixel across the probes" in blind
    assert "DiscoverySettings(recurring_tolerant=True)" in blind


def test_fit_start_counts_a_stamp_drawn_turned_and_without_turns_says_nothing_recurs() -> None:
    """Four probes carry one stamp, each turned a different way (a quarter, a half, mirrored): only
    the other probes turned are its partners. The note counts them; with
    ``recurring_turned=False`` the recurring test does not run and the note says nothing recurs."""
    from cam_monitor.discovery import DiscoverySettings
    from cam_monitor.probes.recurrence import turn

    stamped = drawn_probes(8, [(3, 5), (40, 12), (20, 50), (50, 50)])
    for i, way in enumerate((0, 1, 2, 4)):
        y, x = [(3, 5), (40, 12), (20, 50), (50, 50)][i]
        stamped.images[i, :, y:y + 8, x:x + 8] = turn(stamped.images[0, :, 3:11, 5:13], way)
    (note,) = dry_run_findings(result(seeded_maps(6)), stamped, EvalSettings(), 4.0, "cam").notes
    assert "the recurring test found content drawn the same in 4 of 6 probes and tests it whole" in note
    upright = EvalSettings(discovery=DiscoverySettings(recurring_turned=False))
    (blind,) = dry_run_findings(result(seeded_maps(6)), stamped, upright, 4.0, "cam").notes
    assert "nothing recurs across the probes, so the recurring test" in blind
    (alone,) = dry_run_findings(result(seeded_maps(6)), drawn_probes(8, [(3, 5)]), EvalSettings(), 4.0, "cam").notes
    assert "turned by quarter turns or mirrored" not in blind and "turned by quarter turns or mirrored" in alone


def test_fit_start_says_when_what_recurs_is_background_and_the_recurring_test_does_not_run() -> None:
    """The same pattern over a quarter of four of six probes, at their own places, recurs but is
    background: the note says so, with the count, instead of saying that nothing recurs."""
    textured = drawn_probes(32, [(0, 0), (30, 10), (12, 30), (32, 32)])
    (note,) = dry_run_findings(result(seeded_maps(6)), textured, EvalSettings(), 4.0, "cam").notes
    assert "what recurs across the probes is background (it covers more than 12.5% of 4 of 6" in note
    assert "the recurring test, which tests a mark against a box elsewhere in its probe, does not run" in note
    assert "nothing recurs" not in note
