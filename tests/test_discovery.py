"""Mask-free discovery (candidates from the maps) and its paste, spectrum, colour and band confirmations, without Lightning."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cam_monitor as cm
from cam_monitor.discovery import (DiscoverySettings, arms_run, cells_to_pixels, discover, find_suspects, fit_box,
                                   pastes, plan_tests)
from cam_monitor.evaluation import EvalSettings, evaluate
from cam_monitor.evidence import EvidenceState, log_evalue
from cam_monitor.interventions import MAX_BORDER_BAND, pasted_images

SIZE = 16
ONE_CELL = DiscoverySettings(box_cells=1)
LOCAL_ONLY = DiscoverySettings(colour_test=False, border_test=False, detail_test=False, texture_test=False)


def one_cell_maps(n: int, cell: tuple[int, int], grid: int = 4, rest: float = 0.01) -> torch.Tensor:
    maps = torch.full((n, grid, grid), rest)
    maps[:, cell[0], cell[1]] = 1.0
    return maps


class TagModel(nn.Module):
    """Class 1 when a bright 4x4 tag sits anywhere (a stamp works wherever it is), else class 0 by
    the centre: a shortcut model (``use_tag``) or a control that reads only the centre."""

    def __init__(self, use_tag: bool, tag_weight: float = 4.0, centre_weight: float = 1.0) -> None:
        super().__init__()
        self.use_tag, self.tag_weight, self.centre_weight = use_tag, tag_weight, centre_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tag = F.avg_pool2d(x[:, :1], 4, stride=1).flatten(1).amax(1) if self.use_tag else torch.zeros(len(x))
        centre = x[:, 0, 6:10, 6:10].mean((1, 2))
        score1 = self.tag_weight * (tag > 0.9).float() + self.centre_weight * centre
        return torch.stack([torch.full_like(score1, 1.0), score1], 1)


class BrightnessModel(nn.Module):
    """A global cue: the class is the image's mean brightness (a cast over the whole image)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))
        return torch.stack([0.3 - m, m - 0.3], 1)


def tag_probes(n: int = 16) -> cm.ProbeSet:
    """Half class 1 (tag in the corner), half class 0 (no tag, dim centre)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.1
    labels = torch.tensor([1, 0] * (n // 2))
    images[labels == 1, 0, :4, :4] = 1.0
    return cm.ProbeSet(images, labels)


def test_boxes_are_converted_to_image_pixels_by_the_stride() -> None:
    assert cells_to_pixels(torch.tensor([1, 2, 2, 3]), (4, 4), (16, 16)) == (4, 8, 8, 12)
    assert cells_to_pixels(torch.tensor([0, 0, 7, 7]), (7, 7), (224, 224)) == (0, 0, 224, 224)


def test_a_box_moved_to_another_size_keeps_its_corner_and_stays_inside_the_image() -> None:
    assert fit_box((4, 8, 8, 12), (4, 4), (16, 16)) == (4, 8, 8, 12)
    assert fit_box((12, 12, 16, 16), (6, 8), (16, 16)) == (10, 8, 16, 16)  # pushed back from the far edges


def test_candidates_are_every_correct_prediction_with_its_best_window_in_cells() -> None:
    maps = torch.cat([one_cell_maps(2, (0, 0)), torch.ones(1, 4, 4), torch.zeros(1, 4, 4)])
    targets = torch.tensor([1, 1, 1, 1])
    preds = torch.tensor([1, 0, 1, 1])  # the second probe is misclassified; the fourth map is all zero
    suspects = find_suspects(maps, targets, preds, (SIZE, SIZE), ONE_CELL)
    assert [(s.probe, s.cls, s.box) for s in suspects] == [(0, 1, (0, 0, 4, 4)), (2, 1, (0, 0, 4, 4))]
    assert suspects[0].share > suspects[1].share  # most concentrated first, no energy gate
    (two,) = find_suspects(maps[:1], targets[:1], preds[:1], (SIZE, SIZE), DiscoverySettings(box_cells=2))
    assert two.box == (0, 0, 8, 8)  # the window is sized in cells of the grid
    (clipped,) = find_suspects(maps[:1, :2, :2], targets[:1], preds[:1], (SIZE, SIZE), DiscoverySettings(box_cells=3))
    assert clipped.box == (0, 0, SIZE, SIZE)  # never larger than the grid


def test_a_model_using_the_tag_flips_wherever_it_is_pasted_and_the_control_windows_do_not() -> None:
    probes = tag_probes()
    maps = one_cell_maps(len(probes), (0, 0))
    maps[probes.labels == 0] = 1.0
    maps[probes.labels == 0, 3, 3] = 0.0  # class 0's maps give no credit to the bottom-right cell
    for use_tag in (True, False):
        model = TagModel(use_tag)
        preds = model(probes.images).argmax(1)
        predict = lambda x, m=model: m(x)  # noqa: E731
        found = discover(maps, probes, probes.labels, preds, predict,
                         replace_settings(ONE_CELL, global_test=False, colour_test=False, border_test=False, detail_test=False,
                                          texture_test=False, recurring_test=False))
        if not use_tag:  # the control model predicts class 0 for all: no recipient can flip, no evidence
            assert not found.flips.any() and found.p_value() == 1.0
            continue
        assert 2 * len(found.tests) == 2 * (int(ONE_CELL.budget * len(probes)) // 2)  # tests + controls: budget x probes
        tagged = [t for t in found.tests if found.suspects[t.suspect].cls == 1]
        assert tagged and all(t.place == (0, 0, 4, 4) for t in tagged)  # the recipient's most-credited window
        mine = [found.suspects[t.suspect].cls == 1 for t in found.tests]
        assert found.flips[mine].all() and not found.control_flips[mine].any()
        others = [not m for m in mine]  # class 0's windows pasted over a tag: both take it away, no evidence either way
        assert torch.equal(found.flips[others], found.control_flips[others])
        region = next(r for r in found.regions(probes.ids) if r["class"] == 1)
        assert region["boxes"][0] == [0, 0, 4, 4] and region["flip_rate"] == 1.0
        masks = found.masks(len(probes), probes.image_size)
        assert masks[probes.labels == 1][:, :4, :4].all() and not masks[probes.labels == 0].any()
        # only the classes the evidence backs: the tag's pairs back class 1; pairs against a cue back none
        backed = found.backed_classes(EvidenceState().update(found.diffs(by_class=True), 0.7, 0.05))
        assert backed == (0, 1) and [r["class"] for r in found.regions(probes.ids, classes=(0,))] == [0]
        assert not found.masks(len(probes), probes.image_size, classes=(0,)).any()
        assert found.backed_classes(EvidenceState({"local": -2.0, "local/1": 3.0})) == (1,)
        assert found.backed_classes(None) == () and found.regions(probes.ids, classes=()) == []
        assert found.p_value() < 0.05
        by_class = found.diffs(by_class=True)
        assert torch.equal(by_class["local/1"], found.diffs()["local"][[found.suspects[t.suspect].cls == 1
                                                                        for t in found.tests]])


def test_one_discovery_builds_the_maps_windows_once(monkeypatch) -> None:
    """Candidates and the paste plan read the same windows: built once per evaluation."""
    from cam_monitor import discovery as D

    built = []
    real = D.Windows.of.__func__
    monkeypatch.setattr(D.Windows, "of", classmethod(lambda cls, *a: built.append(1) or real(cls, *a)))
    probes = tag_probes()
    model = TagModel(True)
    preds = model(probes.images).argmax(1)
    found = discover(one_cell_maps(len(probes), (0, 0)), probes, probes.labels, preds, lambda x: model(x),
                     ONE_CELL)
    assert found.tests and len(built) == 1


def replace_settings(settings: DiscoverySettings, **changes) -> DiscoverySettings:
    from dataclasses import replace
    return replace(settings, **changes)


def test_a_model_reading_the_whole_image_flips_for_the_candidate_and_the_control_alike() -> None:
    """A model reading the mean of the whole image: any bright window of that size flips it, the
    candidate's and the control's alike, so the local arm sees no excess."""

    class MeanModel(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.mean((1, 2, 3))
            return torch.stack([torch.full_like(m, 0.05), m], 1)

    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([1, 0] * 8)
    images = torch.where(labels[:, None, None, None] == 1, torch.ones(16, 1, SIZE, SIZE), torch.zeros(16, 1, SIZE, SIZE))
    images = images + 0.01 * torch.rand(16, 1, SIZE, SIZE, generator=g)
    probes = cm.ProbeSet(images, labels)
    model = MeanModel()
    maps = one_cell_maps(16, (1, 1)) + 0.5 * torch.rand(16, 4, 4, generator=g)
    found = discover(maps, probes, labels, model(images).argmax(1), lambda x: model(x), LOCAL_ONLY)
    agg = found.aggregates()
    assert agg["shortcut_flip_rate"] == agg["shortcut_flip_control"] and agg["shortcut_flip_rate"] > 0
    assert agg["shortcut_flip_excess"] == 0.0


def test_a_brightness_cast_flips_with_the_colour_statistics_and_not_with_the_structure() -> None:
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([1, 0] * 8)
    images = 0.2 * torch.rand(16, 1, SIZE, SIZE, generator=g) + 0.3 * labels[:, None, None, None]  # bright = class 1
    probes = cm.ProbeSet(images, labels)
    model = BrightnessModel()
    maps = torch.ones(16, 4, 4)  # evenly spread: nothing local to find
    found = discover(maps, probes, labels, model(images).argmax(1), lambda x: model(x),
                     DiscoverySettings(border_test=False, global_test=False, detail_test=False,
                                       texture_test=False))
    agg = found.aggregates()
    colour = len(found.paired["colour"].pairs)  # budget 2 x 16 probes: 16 pairs, 5 shared equally, 11 by what they found
    assert colour + len(found.tests) == 16 and colour >= 2 + 11 // 2
    assert agg["colour_flip_rate"] == 1.0 and agg["colour_flip_control"] == 0.0
    assert found.p_value() < 0.01


def _grating_probes(n: int = 48) -> tuple[cm.ProbeSet, torch.Tensor]:
    """Class 1 carries a faint vertical grating over the whole image, class 0 none; every probe has
    a bright 4x4 object at a random cell, where its map (returned) lies."""
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([1, 0] * (n // 2))
    xs = torch.arange(SIZE, dtype=torch.float32)
    grating = 0.15 * (1 + torch.cos(2 * math.pi * xs / 4))[None, :].expand(SIZE, SIZE)
    images = 0.05 * torch.rand(n, 1, SIZE, SIZE, generator=g) + labels[:, None, None, None] * grating
    maps = torch.full((n, 4, 4), 0.01)
    for i, cell in enumerate(torch.randint(0, 4, (n, 2), generator=g).tolist()):
        images[i, 0, 4 * cell[0]:4 * cell[0] + 4, 4 * cell[1]:4 * cell[1] + 4] = 1.0
        maps[i, cell[0], cell[1]] = 1.0
    return cm.ProbeSet(images, labels), maps


class GratingModel(nn.Module):
    """A texture shortcut: class 1 when the image's spectrum holds the grating (period 4 pixels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        power = torch.fft.fft2(x[:, 0]).abs()[:, 0, SIZE // 4] / (SIZE * SIZE)
        return torch.stack([torch.full_like(power, 0.035), power], 1)  # half the grating's own


class BarModel(nn.Module):
    """An honest model whose class is in the object's spectrum: class 1 for a horizontal bar,
    class 0 for a vertical one (the energy along each frequency axis tells them apart)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.fft.fft2(x[:, 0] - x[:, 0].mean((1, 2), keepdim=True)).abs()
        horizontal, vertical = f[:, 1:, 0].sum(1), f[:, 0, 1:].sum(1)
        return torch.stack([vertical, horizontal], 1)


def test_a_texture_flips_with_the_background_spectrum_and_not_with_the_objects() -> None:
    probes, maps = _grating_probes()
    model = GratingModel()
    preds = model(probes.images).argmax(1)
    assert torch.equal(preds, probes.labels)
    found = discover(maps, probes, probes.labels, preds, lambda x: model(x),
                     DiscoverySettings(global_test=True, colour_test=False, border_test=False, detail_test=False,
                                       texture_test=False))
    arm = found.paired["global"]
    textured = torch.tensor([found.suspects[p.suspect].cls == 1 for p in arm.pairs])
    # a grating source's background carries its class, its object's share does not
    assert textured.any() and bool(arm.flips[textured].all()) and not arm.control_flips[textured].any()
    assert found.aggregates()["global_flip_excess"] > 0.3 and found.p_value() < 0.01


def test_an_object_told_by_its_spectrum_is_no_global_cue() -> None:
    """A bar's orientation is in the whole image's amplitude; the object's share, not the
    background's, carries it, so the spectrum arm finds nothing (its old whole-image swap did)."""
    g = torch.Generator().manual_seed(4)
    n = 24
    labels = torch.tensor([1, 0] * (n // 2))
    images = 0.2 * torch.rand(n, 1, SIZE, SIZE, generator=g)
    maps = torch.full((n, 4, 4), 0.01)
    for i, cell in enumerate(torch.randint(0, 3, (n, 2), generator=g).tolist()):
        y, x = 4 * cell[0], 4 * cell[1]
        if labels[i]:
            images[i, 0, y + 1:y + 3, x:x + 8] = 1.0
            maps[i, cell[0], cell[1]:cell[1] + 2] = 1.0
        else:
            images[i, 0, y:y + 8, x + 1:x + 3] = 1.0
            maps[i, cell[0]:cell[0] + 2, cell[1]] = 1.0
    probes, model = cm.ProbeSet(images, labels), BarModel()
    preds = model(images).argmax(1)
    assert torch.equal(preds, labels)
    found = discover(maps, probes, labels, preds, lambda x: model(x),
                     DiscoverySettings(global_test=True, colour_test=False, border_test=False, detail_test=False,
                                       texture_test=False))
    agg = found.aggregates()
    assert agg["global_flip_control"] == 1.0 and agg["global_flip_excess"] < -0.2


class FrameModel(nn.Module):
    """Class 1 when the image's one-pixel frame is bright: a shortcut along the border."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ring = torch.ones(x.shape[-2:], dtype=torch.bool)
        ring[1:-1, 1:-1] = False
        frame = x[:, 0, ring].mean(1)
        return torch.stack([torch.full_like(frame, 0.5), frame], 1)


class CentreModel(nn.Module):
    """Class 1 when the middle half of the image is bright: the object, well inside the frame."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, 0, 4:12, 4:12].mean((1, 2))
        return torch.stack([torch.full_like(centre, 0.3), centre], 1)


def framed_probes(n: int = 16) -> cm.ProbeSet:
    """Class 1 has a bright frame and a bright centre, class 0 neither: both models read them right."""
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([1, 0] * (n // 2))
    images = 0.1 * torch.rand(n, 1, SIZE, SIZE, generator=g)
    images[labels == 1, :, 4:12, 4:12] = 0.6
    framed = images[labels == 1]
    framed[:, :, [0, -1], :] = 1.0
    framed[:, :, :, [0, -1]] = 1.0
    images[labels == 1] = framed
    return cm.ProbeSet(images, labels)


def test_a_model_reading_the_frame_follows_the_border_band_and_not_the_band_inside() -> None:
    probes = framed_probes()
    maps = torch.ones(len(probes), 4, 4)
    frame, centre = FrameModel(), CentreModel()
    for model in (frame, centre):
        assert torch.equal(model(probes.images).argmax(1), probes.labels)
    three_arms = DiscoverySettings(detail_test=False, texture_test=False)  # 16 pairs: 5 over three arms, then 11
    found = discover(maps, probes, probes.labels, probes.labels, lambda x: frame(x), three_arms)
    border = found.paired["border"]  # the only arm whose first pairs won: it takes the second stage
    assert len(border.pairs) > 16 // 2 and bool(border.flips.all()) and not bool(border.control_flips.any())
    assert found.aggregates()["border_flip_excess"] == 1.0 and found.p_value() < 0.1
    # the object sits inside the frame: the inner band carries it, the border band does not
    honest = discover(maps, probes, probes.labels, probes.labels, lambda x: centre(x), three_arms)
    assert honest.aggregates()["border_flip_excess"] <= 0 and not bool(honest.paired["border"].flips.any())
    off = discover(maps, probes, probes.labels, probes.labels, lambda x: frame(x),
                   DiscoverySettings(border_test=False))
    assert "border" not in off.paired and "border" not in off.diffs()


def test_one_stage_draws_every_arms_pairs_equally_in_one_batch_and_two_stages_draw_a_prefix_of_them() -> None:
    """What replaying a recorded run rests on (``benchmarks/bench_allocation.py``): each arm takes its
    pairs in plan order, so the pairs of two stages are the first ones of a one-stage run's."""
    probes, frame = framed_probes(), FrameModel()
    maps = torch.ones(len(probes), 4, 4)
    batches: list[int] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        batches.append(len(x))
        return frame(x)

    three_arms = dict(detail_test=False, texture_test=False)
    staged = discover(maps, probes, probes.labels, probes.labels, predict, DiscoverySettings(**three_arms))
    assert len(batches) == 2
    batches.clear()
    recorded = discover(maps, probes, probes.labels, probes.labels, predict,
                        DiscoverySettings(first_stage=1.0, budget=6.0, **three_arms))  # 48 pairs: 16 an arm
    assert len(batches) == 1 and {a: len(d) for a, d in recorded.diffs().items()} == {"local": 16, "colour": 16, "border": 16}
    for arm, d in staged.diffs().items():
        assert torch.equal(d, recorded.diffs()[arm][:len(d)]), arm


def test_tests_go_round_robin_into_other_class_recipients_over_their_most_credited_window() -> None:
    n = 30
    labels = torch.arange(n) % 3
    maps = torch.stack([one_cell_maps(1, (int(c), int(c)))[0] for c in labels])
    suspects = find_suspects(maps, labels, labels, (SIZE, SIZE), ONE_CELL)
    gen = torch.Generator().manual_seed(0)
    tests = plan_tests(suspects, maps, labels, labels, (SIZE, SIZE), 12, 1, gen)
    assert len(tests) == 12
    assert {suspects[t.suspect].cls for t in tests[:3]} == {0, 1, 2}
    for t in tests:
        s = suspects[t.suspect]
        assert labels[t.recipient] != s.cls
        y0, x0, y1, x1 = s.box
        cy0, cx0, cy1, cx1 = t.control_box
        assert (cy1 - cy0, cx1 - cx0) == (y1 - y0, x1 - x0) == (t.place[2] - t.place[0], t.place[3] - t.place[1])
        assert cy1 <= y0 or cy0 >= y1 or cx1 <= x0 or cx0 >= x1  # the control never overlaps the candidate
        hot = int(labels[t.recipient])
        assert t.place == cells_to_pixels(torch.tensor([hot, hot, hot + 1, hot + 1]), (4, 4), (SIZE, SIZE))
    again = plan_tests(suspects, maps, labels, labels, (SIZE, SIZE), 12, 1, torch.Generator().manual_seed(0))
    assert [(t.suspect, t.recipient, t.control_box, t.place) for t in again] == [
        (t.suspect, t.recipient, t.control_box, t.place) for t in tests]


def test_the_control_window_is_the_sources_next_most_credited_window() -> None:
    labels = torch.tensor([1, 0] * 8)
    maps = torch.full((16, 4, 4), 0.01)
    maps[:, 0, 0], maps[:, 3, 3], maps[:, 1, 2] = 1.0, 0.5, 0.3  # the candidate, the next credited cell, a third
    suspects = find_suspects(maps, labels, labels, (SIZE, SIZE), ONE_CELL)
    tests = plan_tests(suspects, maps, labels, labels, (SIZE, SIZE), 8, 1, torch.Generator().manual_seed(0))
    assert {t.control_box for t in tests} == {(12, 12, 16, 16)}
    maps[:, 0, 1] = 0.9  # a neighbour of the candidate is next: adjacent windows may be the control, overlapping ones not
    suspects = find_suspects(maps, labels, labels, (SIZE, SIZE), ONE_CELL)
    tests = plan_tests(suspects, maps, labels, labels, (SIZE, SIZE), 8, 1, torch.Generator().manual_seed(0))
    assert {t.control_box for t in tests} == {(0, 4, 4, 8)}
    two = DiscoverySettings(box_cells=2)
    suspects = find_suspects(maps, labels, labels, (SIZE, SIZE), two)
    tests = plan_tests(suspects, maps, labels, labels, (SIZE, SIZE), 8, 2, torch.Generator().manual_seed(0))
    assert {suspects[t.suspect].box for t in tests} == {(0, 0, 8, 8)}
    assert {t.control_box for t in tests} == {(8, 8, 16, 16)}  # the best 2x2 window clear of the candidate


def test_each_local_test_pastes_its_candidate_then_its_control_at_the_recipients_place() -> None:
    probes = tag_probes(4)
    maps = one_cell_maps(4, (0, 0))
    suspects = find_suspects(maps, probes.labels, probes.labels, (SIZE, SIZE), ONE_CELL)
    tests = plan_tests(suspects, maps, probes.labels, probes.labels, (SIZE, SIZE), 1, 1, torch.Generator().manual_seed(0))
    (test,) = tests
    out = pasted_images(probes.images, pastes(suspects, tests))
    src, dst = probes.images[suspects[test.suspect].probe], probes.images[test.recipient]
    p0, q0, p1, q1 = test.place
    assert out.shape == (2, 1, SIZE, SIZE)
    assert torch.equal(out[0, :, p0:p1, q0:q1], src[:, :4, :4])
    cy0, cx0, cy1, cx1 = test.control_box
    assert torch.equal(out[1, :, p0:p1, q0:q1], src[:, cy0:cy1, cx0:cx1])
    outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
    outside[p0:p1, q0:q1] = False
    assert torch.equal(out[0, :, outside], dst[:, outside]) and torch.equal(out[1, :, outside], dst[:, outside])
    assert not torch.equal(probes.images[test.recipient], out[0])  # the probe itself is untouched


def test_nothing_to_test_gives_nan_rates_and_costs_no_forward() -> None:
    probes = tag_probes(4)
    calls = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x.new_zeros(len(x), 2)

    wrong = 1 - probes.labels  # every probe misclassified: no candidate
    found = discover(one_cell_maps(4, (0, 0)), probes, probes.labels, wrong, predict, DiscoverySettings())
    agg = found.aggregates()
    assert found.tests == [] and found.pasted == 0 and calls == []
    assert all(math.isnan(agg[f"{arm}_flip_rate"]) for arm in ("shortcut", "colour", "border"))
    assert "global_flip_rate" not in agg  # the spectrum arm is opt-in
    assert agg["shortcut_p"] == 1.0


@pytest.mark.parametrize("kwargs, text", [(dict(box_cells=0), "box_cells"), (dict(budget=0), "budget"),
                                          (dict(alpha=0), "alpha"), (dict(alpha=1), "alpha"),
                                          (dict(min_effect=1.0), "min_effect"), (dict(bet=0.99), "bet"),
                                          (dict(detail_min_effect=-0.1), "detail_min_effect"),
                                          (dict(bet=0.84), r"1 / \(1 \+ detail_min_effect\)"),
                                          (dict(bet=0), "bet"), (dict(detail_bet=0), "detail_bet"),
                                          (dict(detail_bet=0.84), r"detail_bet must be in \(0, 1 / \(1 \+ detail_min_effect\)\)"),
                                          (dict(border_band=0), "border_band"),
                                          (dict(border_band=MAX_BORDER_BAND + 0.01), "border_band"),
                                          (dict(marked_min_effect=-0.1), "marked_min_effect"),
                                          (dict(marked_min_effect=0.5), r"1 / \(1 \+ marked_min_effect\)"),
                                          (dict(first_stage=0), "first_stage"), (dict(first_stage=1.5), "first_stage"),
                                          (dict(recurring_gain_scale=0), "recurring_gain_scale"),
                                          (dict(recurring_gain_scale=1.5), "recurring_gain_scale")])
def test_bad_settings_are_refused(kwargs, text) -> None:
    with pytest.raises(ValueError, match=text):
        DiscoverySettings(**kwargs)


def test_the_detail_and_marked_arms_have_their_own_margins_and_every_other_arm_the_common_one() -> None:
    """The recurring arm runs the marked arm's test on found boxes, whose edge may hold a sliver of
    the object beside the cue, so it takes the common margin."""
    margins = DiscoverySettings(min_effect=0.1, detail_min_effect=0.25, marked_min_effect=0.02).margins
    assert margins == {"local": 0.1, "global": 0.1, "colour": 0.1, "border": 0.1, "detail": 0.25, "texture": 0.1,
                       "recurring": 0.1, "marked": 0.02}
    defaults = DiscoverySettings()
    assert defaults.margins["detail"] > defaults.min_effect > defaults.margins["marked"] == 0.0
    assert defaults.margins["recurring"] == defaults.min_effect


def test_the_marked_arms_ties_cost_it_nothing_and_its_wins_count_in_full() -> None:
    """At the default margins a tie (test and control alike) costs every margined arm a factor
    1 - bet * margin and the marked arm none; a win against no loss grows it by 1 + bet."""
    s = DiscoverySettings()
    ties = {"local": torch.zeros(20), "marked": torch.zeros(20)}
    state = EvidenceState().update(ties, s.bets, s.margins)
    assert state.detector("marked") == 1.0 and state.detector("local") < 1.0
    wins = EvidenceState().update({"marked": torch.tensor([1.0, 0.0, 0.0])}, s.bets, s.margins)
    assert wins.detector("marked") == pytest.approx(1 + s.bet)


def test_the_detail_arm_has_its_own_stake_and_every_other_arm_the_common_one() -> None:
    bets = DiscoverySettings(bet=0.6, detail_bet=0.25).bets
    assert bets == {"local": 0.6, "global": 0.6, "colour": 0.6, "border": 0.6, "detail": 0.25, "texture": 0.6,
                    "recurring": 0.6, "marked": 0.6}
    assert DiscoverySettings().bets["detail"] < DiscoverySettings().bet  # the least exact null stakes less


def test_evaluate_runs_every_arm_within_two_probe_sets_of_extra_images_and_accumulates_evidence() -> None:
    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Conv2d(1, 8, 4, stride=4)
            self.head = nn.Linear(8, 2)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += len(x)
            return self.head(self.body(x).relu().mean((2, 3)))

    probes = tag_probes()
    model = Conv()
    untrained = DiscoverySettings(skill_level=1.0)  # an untrained model: at chance, tested all the same
    ev = evaluate(model, probes, EvalSettings(layer="body", faithfulness=False, discovery=untrained))
    assert {"shortcut_flip_rate", "shortcut_flip_control", "shortcut_flip_excess", "shortcut_suspects", "shortcut_p",
            "colour_flip_rate", "colour_flip_control", "colour_flip_excess", "shortcut_evidence"} <= set(ev.aggregates)
    assert "global_flip_rate" not in ev.aggregates  # opt-in: DiscoverySettings(global_test=True)
    assert ev.discovery is not None and "shortcut_flip" in ev.per_probe and ev.evidence is not None
    assert model.calls <= 3 * len(probes)  # the CAM pass plus at most two probe sets of pasted images
    assert {"border_flip_rate", "border_flip_control", "border_flip_excess"} <= set(ev.aggregates)
    assert {"detail_flip_rate", "detail_flip_control", "detail_flip_excess"} <= set(ev.aggregates)
    assert {"texture_flip_rate", "texture_flip_control", "texture_flip_excess"} <= set(ev.aggregates)
    defaults, detail = DiscoverySettings(), ev.discovery.diffs()["detail"]
    assert detail.numel() and ev.evidence.log_detector["detail"] == pytest.approx(
        log_evalue(detail, defaults.detail_bet, defaults.detail_min_effect))  # the detail arm at its own stake
    again = evaluate(model, probes, EvalSettings(layer="body", faithfulness=False, discovery=untrained),
                     evidence=ev.evidence, global_step=1)
    tested = {arm for found in (ev.discovery, again.discovery) for arm, d in found.diffs().items() if d.numel()}
    assert set(again.evidence.log_detector) == tested | {"all"}
    off = evaluate(model, probes, EvalSettings(layer="body", discovery=DiscoverySettings(enabled=False)))
    assert off.discovery is None and off.evidence is None and "shortcut_flip_rate" not in off.aggregates
    assert not any("/" in name for name in again.evidence.log_detector)  # pooled streams only, by default
    per_class = DiscoverySettings(per_class=True, skill_level=1.0)
    first = evaluate(model, probes, EvalSettings(layer="body", faithfulness=False, discovery=per_class))
    later = evaluate(model, probes, EvalSettings(layer="body", faithfulness=False, discovery=per_class),
                     evidence=first.evidence, global_step=1)
    classes = {f"local/{found.suspects[t.suspect].cls}" for found in (first.discovery, later.discovery)
               for t in found.tests}
    assert classes <= set(later.evidence.log_detector) and not any(
        k.startswith(("colour/", "border/", "detail/", "texture/")) for k in later.evidence.log_detector)  # pooled
    arms = arms_run(per_class, tuple(later.maps.shape[-2:]), probes)
    arms_mean = sum(later.evidence.detector(a) for a in arms) / len(arms)
    pooled = 0.5 * arms_mean + 0.5 * later.evidence.detector("all")
    mean_class = sum(later.evidence.detector(f"local/{k}") for k in (0, 1)) / 2
    assert later.aggregates["shortcut_evidence"] == pytest.approx(0.5 * pooled + 0.5 * mean_class)


def test_discovery_under_inference_mode_matches_grad_mode() -> None:
    """``trainer.validate()`` runs hooks under inference_mode: the paste test must work there too."""
    probes = tag_probes()
    maps = one_cell_maps(len(probes), (0, 0))
    model = TagModel(True)
    preds = model(probes.images).argmax(1)
    plain = discover(maps, probes, probes.labels, preds, lambda x: model(x), ONE_CELL)
    with torch.inference_mode():
        inside = discover(maps, probes, probes.labels, preds, lambda x: model(x), ONE_CELL)
    both = inside.aggregates(), plain.aggregates()
    assert both[0].keys() == both[1].keys() and inside.aggregates()["shortcut_flip_excess"] > 0
    assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(*(d.values() for d in both)))


def test_the_monitor_takes_discovery_settings_and_refuses_other_types() -> None:
    tuned = cm.CAMMonitor(discovery=cm.DiscoverySettings(box_cells=3, budget=0.5, alpha=1e-4))
    assert tuned.settings.discovery.box_cells == 3 and tuned.settings.discovery.budget == 0.5
    (rule,) = [r for r in tuned.rules if r.name == "shortcut_confirmed"]
    assert rule.threshold == pytest.approx(1e4)  # the alert's threshold is 1 / alpha
    assert cm.CAMMonitor(discovery=cm.DiscoverySettings(min_effect=0.2)).settings.discovery.min_effect == 0.2
    assert cm.CAMMonitor(discovery=False).settings.discovery.enabled is False
    assert cm.CAMMonitor(probe_settings=cm.ProbeSettings(seed=3)).settings.discovery.seed == 3
    with pytest.raises(TypeError, match="discovery must be True, False or a DiscoverySettings"):
        cm.CAMMonitor(discovery="yes")


def test_half_the_local_pairs_follow_the_evidence_of_each_class() -> None:
    """With each class's evidence so far, half the pairs go round-robin and half to the classes in
    proportion to it; no suspect meets a recipient twice, and without evidence nothing changes."""
    from cam_monitor.discovery import Suspect, recipients_of

    labels = torch.arange(40) % 10
    suspects = [Suspect(i, int(labels[i]), (0, 0, 4, 4), 0.5) for i in range(40)]
    plain = recipients_of(suspects, labels, labels, 32, torch.Generator().manual_seed(0))
    assert recipients_of(suspects, labels, labels, 32, torch.Generator().manual_seed(0), None) == plain
    led = recipients_of(suspects, labels, labels, 32, torch.Generator().manual_seed(0),
                        {0: 1e3, **{k: 1.0 for k in range(1, 10)}})
    per_class = torch.bincount(torch.tensor([suspects[s].cls for s, _ in led]), minlength=10)
    assert len(led) == 32 == len(set(led)) and int(per_class[0]) >= 16 + 1 and int(per_class[1:].max()) <= 2
    assert all(int(labels[r]) != suspects[s].cls for s, r in led)


DETAIL_ONLY = DiscoverySettings(colour_test=False, border_test=False, texture_test=False)


class StripeModel(nn.Module):
    """Class 1 when neighbouring columns differ: a texture finer than a cell."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        detail = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))
        return torch.stack([torch.full_like(detail, 0.15), detail], 1)


def test_a_model_reading_texture_keeps_its_class_on_the_cell_shuffle_and_not_on_the_blur() -> None:
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([1, 0] * 8)
    images = 0.1 * torch.rand(16, 1, SIZE, SIZE, generator=g)
    images[labels == 1] += 0.4 * (torch.arange(SIZE) % 2).float()
    probes, maps, model = cm.ProbeSet(images, labels), torch.ones(16, 4, 4), StripeModel()
    assert torch.equal(model(images).argmax(1), labels)
    found = discover(maps, probes, labels, labels, lambda x: model(x), DETAIL_ONLY)
    detail = found.paired["detail"]
    assert len(detail.pairs) >= 16 // 2 and {p.recipient for p in detail.pairs} == {found.suspects[p.suspect].probe
                                                                               for p in detail.pairs}
    assert bool(detail.flips.all()) and not bool(detail.control_flips[labels[[p.recipient for p in detail.pairs]] == 1]
                                                  .any())
    assert found.aggregates()["detail_flip_excess"] > 0.4 and found.diffs()["detail"].sum() >= 4


def test_a_model_reading_a_shape_of_several_cells_keeps_its_class_on_the_blur_and_not_on_the_shuffle() -> None:
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([1, 0] * 8)
    images = 0.1 * torch.rand(16, 1, SIZE, SIZE, generator=g)
    images[labels == 1, :, 4:12, 4:12] = 0.6  # a bright square of 2 x 2 cells
    probes, model = cm.ProbeSet(images, labels), CentreModel()
    found = discover(torch.ones(len(probes), 4, 4), probes, probes.labels, probes.labels,
                     lambda x: model(x), DETAIL_ONLY)
    ones = torch.tensor([found.suspects[p.suspect].cls == 1 for p in found.paired["detail"].pairs])
    assert ones.any() and bool(found.paired["detail"].control_flips[ones].all())  # the blurred centre is still bright
    assert found.diffs()["detail"].sum() < 0 and found.aggregates()["detail_flip_excess"] < 0
    assert "detail" not in discover(torch.ones(len(probes), 4, 4), probes, probes.labels, probes.labels,
                                    lambda x: model(x), DiscoverySettings(detail_test=False)).paired


def test_the_detail_test_does_not_run_on_a_grid_whose_cells_hold_whole_objects() -> None:
    """On a 1 x 1 grid the shuffle is the image itself: every model would keep its class and win."""
    g = torch.Generator().manual_seed(6)
    labels = torch.tensor([1, 0] * 8)
    images = 0.1 * torch.rand(16, 1, SIZE, SIZE, generator=g)
    images[labels == 1, :, 4:12, 4:12] = 0.6
    probes, model = cm.ProbeSet(images, labels), CentreModel()
    for side in (1, 3):
        found = discover(torch.ones(16, side, side), probes, labels, labels, lambda x: model(x), DETAIL_ONLY)
        assert "detail" not in found.paired
    assert "detail" in discover(torch.ones(16, 4, 4), probes, labels, labels, lambda x: model(x),
                                DETAIL_ONLY).paired


TEXTURE_ONLY = DiscoverySettings(colour_test=False, border_test=False, detail_test=False)


def object_and_stripes(striped: str, seed: int) -> tuple[cm.ProbeSet, torch.Tensor]:
    """Sixteen probes with a square object in the middle (2 x 2 cells of a 4 x 4 grid) and maps that
    credit it; class 1's fine stripes lie in the ``"background"`` or on the ``"object"``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([1, 0] * 8)
    images = 0.1 * torch.rand(16, 1, SIZE, SIZE, generator=g)
    stripes = (torch.arange(SIZE) % 2).float()
    if striped == "background":
        images[labels == 1] += 0.4 * stripes
    images[:, :, 4:12, 4:12] = 0.6
    if striped == "object":
        images[labels == 1, :, 4:12, 4:12] = 0.6 * stripes[4:12]
    maps = torch.full((16, 4, 4), 0.05)
    maps[:, 1:3, 1:3] = 1.0
    return cm.ProbeSet(images, labels), maps


def texture_arm_on_stripes(striped: str, seed: int, settings: DiscoverySettings = TEXTURE_ONLY):
    """The texture arm on :func:`object_and_stripes` with a model that reads the stripes: the
    probes, the discovery, its texture pairs and which of them have a striped (class 1) source."""
    probes, maps = object_and_stripes(striped, seed)
    model = StripeModel()
    assert torch.equal(model(probes.images).argmax(1), probes.labels)
    found = discover(maps, probes, probes.labels, probes.labels, lambda x: model(x), settings)
    texture = found.paired.get("texture")
    sources = torch.tensor([found.suspects[p.suspect].cls == 1 for p in texture.pairs]) if texture is not None else None
    return probes, found, texture, sources


def test_a_model_reading_a_background_texture_takes_its_class_from_the_background_detail_not_the_objects() -> None:
    probes, found, texture, striped = texture_arm_on_stripes("background", 7)
    assert len(texture.pairs) > 16 // 2 and striped.any()  # its first pairs won: most of the second stage
    assert all(int(probes.labels[p.recipient]) != found.suspects[p.suspect].cls for p in texture.pairs)
    assert bool(texture.flips[striped].all()) and not bool(texture.control_flips[striped].any())
    assert found.diffs()["texture"].sum() == striped.sum() and found.aggregates()["texture_flip_excess"] > 0.3


def test_a_model_reading_the_objects_own_detail_is_not_a_texture_shortcut() -> None:
    """The same model, but the stripes are the object: its detail carries the class, the background's does not."""
    _, found, texture, striped = texture_arm_on_stripes("object", 8)
    assert striped.any() and bool(texture.control_flips[striped].all()) and not bool(texture.flips[striped].any())
    assert found.diffs()["texture"].sum() < 0 and found.aggregates()["texture_flip_excess"] < 0
    _, off, _, _ = texture_arm_on_stripes("object", 8, replace_settings(TEXTURE_ONLY, texture_test=False))
    assert "texture" not in off.paired


def test_the_arms_that_run_are_those_the_grid_and_the_image_size_allow() -> None:
    settings = DiscoverySettings()
    assert settings.arms_on((8, 8), (32, 32)) == ("local", "colour", "border", "detail", "texture")
    assert settings.arms_on((3, 8), (32, 32)) == ("local", "colour", "border")  # a cell holds a whole object
    assert settings.arms_on((4, 4), (6, 6)) == ("local", "colour", "detail", "texture")  # no inner band that large
    assert DiscoverySettings(detail_test=False, global_test=True).arms_on((8, 8), (32, 32)) == (
        "local", "global", "colour", "border", "texture")
    assert "texture" not in DiscoverySettings(texture_test=False).arms_on((8, 8), (32, 32))


def test_the_evidence_is_the_mean_of_the_arms_that_run_not_diluted_by_those_that_cannot() -> None:
    """On a 3 x 3 grid of 6 px images neither the detail nor the border arm runs: the statistic is
    the mean of the local and colour arms' detectors, not a mean that counts the other two at 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 2, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    images = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    probes = cm.ProbeSet(images, torch.tensor([0, 1] * 4))
    ev = evaluate(model, probes, EvalSettings(layer="0", faithfulness=False),
                  evidence=EvidenceState({"local": 5.0, "detail": 3.0}))
    assert ev.maps.shape[-2:] == (3, 3) and set(ev.discovery.paired) <= {"colour"}
    arms_mean = (ev.evidence.detector("local") + ev.evidence.detector("colour")) / 2
    expected = 0.5 * arms_mean + 0.5 * ev.evidence.detector("all")
    assert ev.evidence.detector("local") > 1 and ev.aggregates["shortcut_evidence"] == pytest.approx(expected)


def test_an_arm_whose_plan_ran_out_leaves_its_second_stage_share_to_the_others() -> None:
    from cam_monitor.discovery import arm_shares, open_shares

    weights = {"local": 3.0, "colour": 1.0, "detail": 1.0}
    assert open_shares(43, {"local": 20, "colour": 30, "detail": 30}, weights) == arm_shares(43, tuple(weights), weights)
    spent = open_shares(43, {"local": 0, "colour": 30, "detail": 30}, weights)
    assert spent == {"local": 0, "colour": 22, "detail": 21} and sum(spent.values()) == 43
    assert open_shares(43, {"local": 0, "colour": 0}, {}) == {"local": 0, "colour": 0}


def striped_probes() -> tuple[cm.ProbeSet, StripeModel]:
    """16 probes of two classes, class 1 carrying a column grating, and a model that reads it."""
    g = torch.Generator().manual_seed(4)
    labels = torch.tensor([1, 0] * 8)
    images = 0.1 * torch.rand(16, 1, SIZE, SIZE, generator=g)
    images[labels == 1] += 0.4 * (torch.arange(SIZE) % 2).float()
    return cm.ProbeSet(images, labels), StripeModel()


def test_the_pairs_an_exhausted_arm_cannot_use_go_to_the_arms_with_pairs_left() -> None:
    """Two probes classified right: the detail arm's plan is those two (one pair a suspect), the
    local arm's every recipient of theirs; the second stage's pairs all go to the local arm, so the
    evaluation still pastes ``budget`` x N images."""
    probes, model = striped_probes()
    labels = probes.labels
    preds = labels.clone()
    preds[2:] = 2  # wrong, and of neither class: every other probe can receive either suspect's region
    at_chance = DiscoverySettings(colour_test=False, border_test=False, texture_test=False, skill_level=1.0)
    found = discover(torch.ones(16, 4, 4), probes, labels, preds, lambda x: model(x), at_chance)
    total = int(at_chance.budget * 16) // 2
    assert len(found.paired["detail"].pairs) == 2 and len(found.tests) == total - 2


def test_skill_p_is_the_binomial_tail_of_the_correct_count_at_the_most_common_share() -> None:
    from cam_monitor.discovery import skill_p

    targets = torch.arange(20) % 10  # 2 a class: always predicting one class scores 0.1
    preds = targets.clone()
    preds[7:] = (preds[7:] + 1) % 10  # 7 right
    tail = sum(math.comb(20, k) * 0.1 ** k * 0.9 ** (20 - k) for k in range(7, 21))
    assert skill_p(targets, preds) == pytest.approx(tail, rel=1e-9)
    assert skill_p(targets, (targets + 1) % 10) == pytest.approx(1.0)  # none right: the whole tail
    assert skill_p(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)) == 1.0  # one class: nothing to beat
    assert skill_p(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)) == 1.0


def test_beats_chance_is_an_exact_binomial_test_against_the_most_common_class() -> None:
    from cam_monitor.discovery import beats_chance

    targets = torch.arange(64) % 10  # the most common class: 7 of 64

    def right(count: int) -> torch.Tensor:
        preds = targets.clone()
        preds[count:] = (preds[count:] + 1) % 10
        return preds

    # P(Binomial(64, 7/64) >= 12) = 0.043, >= 13 = 0.020, >= 14 = 0.0084
    assert [beats_chance(targets, right(c), 0.01) for c in (7, 12, 13, 14, 40)] == [False, False, False, True, True]
    assert beats_chance(targets, right(13), 0.03) and not beats_chance(targets, right(12), 0.03)
    assert beats_chance(targets, right(0), 1.0)  # 1.0: always
    assert not beats_chance(torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long), 0.01)  # one class
    skewed = torch.tensor([0] * 48 + [1] * 16)  # always predicting class 0 scores 0.75: no skill
    assert not beats_chance(skewed, torch.zeros(64, dtype=torch.long), 0.01)
    with pytest.raises(ValueError, match="skill_level"):
        DiscoverySettings(skill_level=0.0)


def test_a_model_at_chance_on_the_probes_is_not_tested() -> None:
    """The first steps of a run: a model that gets no more probes right than predicting the most
    common class would has no candidates, so no pairs and no evidence, whatever it reads."""
    probes, model = striped_probes()
    labels = probes.labels
    preds = labels.clone()
    preds[8:] = 1 - preds[8:]  # 8 of 16 right, what always predicting one class scores
    guessing = discover(torch.ones(16, 4, 4), probes, labels, preds, lambda x: model(x), DETAIL_ONLY)
    assert not guessing.suspects and not guessing.tests and not guessing.paired["detail"].pairs
    assert all(d.numel() == 0 for d in guessing.diffs().values())
    learned = discover(torch.ones(16, 4, 4), probes, labels, labels, lambda x: model(x), DETAIL_ONLY)
    assert learned.suspects and learned.paired["detail"].pairs  # 16 of 16: p = 2 ** -16


def floating_tag_probes(n: int = 16, seed: int = 0) -> cm.ProbeSet:
    """Half class 1 with a bright 4 x 4 tag at a random place and a bright centre, half class 0
    (dim noise); every tag marked in the spurious masks."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.1
    labels = torch.tensor([1, 0] * (n // 2))
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    for i in (labels == 1).nonzero()[:, 0].tolist():
        images[i, 0, 6:10, 6:10] = 0.5
        y, x = [int(v) for v in torch.randint(0, SIZE - 4, (2,), generator=g)]
        while 2 < y < 10 and 2 < x < 10:  # clear of the centre
            y, x = [int(v) for v in torch.randint(0, SIZE - 4, (2,), generator=g)]
        images[i, 0, y:y + 4, x:x + 4] = 1.0
        masks[i, y:y + 4, x:x + 4] = True
    return cm.ProbeSet(images, labels, spurious_masks=masks)


MARKED_ONLY = DiscoverySettings(colour_test=False, border_test=False, detail_test=False, texture_test=False)


def test_the_marked_arm_runs_where_the_probes_carry_marks_it_can_move() -> None:
    from cam_monitor.discovery import arms_run, marks_testable

    probes = floating_tag_probes()
    assert marks_testable(probes.spurious_masks) and not marks_testable(None)
    assert arms_run(DiscoverySettings(), (8, 8), probes)[-1] == "marked"
    assert "marked" not in arms_run(DiscoverySettings(marked_test=False), (8, 8), probes)
    assert "marked" not in DiscoverySettings().arms  # the mask-free arms
    empty = cm.ProbeSet(probes.images, probes.labels, spurious_masks=torch.zeros_like(probes.spurious_masks))
    assert "marked" not in arms_run(DiscoverySettings(), (8, 8), empty)
    assert "marked" not in arms_run(DiscoverySettings(), (8, 8), cm.ProbeSet(probes.images, probes.labels))


def test_a_model_that_follows_a_floating_tag_follows_the_marked_region_and_one_that_reads_the_centre_does_not() -> None:
    """The tag sits anywhere and the maps credit the centre (where no local test looks for a tag):
    the marked arm pastes what the masks mark. A model told by the tag flips on every test and on no
    control; a model told by the centre flips on neither (no evidence either way). Without masks the
    arm does not run."""
    probes = floating_tag_probes()
    maps = one_cell_maps(len(probes), (1, 1))  # the centre cells, never the tag
    for use_tag, expected in ((True, 1.0), (False, 0.0)):
        model = TagModel(use_tag) if use_tag else CentreOnly()
        preds = model(probes.images).argmax(1)
        assert torch.equal(preds, probes.labels)
        found = discover(maps, probes, probes.labels, preds, lambda x, m=model: m(x), MARKED_ONLY)
        marked = found.paired["marked"]
        assert marked.pairs and all(found.suspects[p.suspect].cls == 1 for p in marked.pairs)  # only class 1 is marked
        assert float(marked.flips.float().mean()) == expected and not marked.control_flips.any()
        agg = found.aggregates()
        assert agg["marked_flip_rate"] == expected and agg["marked_flip_control"] == 0.0
    plain = cm.ProbeSet(probes.images, probes.labels)
    model = TagModel(True)
    found = discover(maps, plain, plain.labels, model(plain.images).argmax(1), lambda x: model(x), MARKED_ONLY)
    assert "marked" not in found.paired and "marked_flip_rate" not in found.aggregates()


class CentreOnly(nn.Module):
    """Class 1 by a bright centre alone (the object), whatever else the image holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, 0, 6:10, 6:10].mean((1, 2))
        return torch.stack([torch.full_like(centre, 0.3), centre], 1)


def test_the_marked_arm_leaves_the_other_arms_draws_as_they_are_without_masks() -> None:
    """Its places come from its own generator and its pairs are planned after the others': the
    local arm's first-stage tests are the same with and without masks."""
    probes = floating_tag_probes()
    plain = cm.ProbeSet(probes.images, probes.labels)
    maps = one_cell_maps(len(probes), (1, 1))
    model = TagModel(True)
    one_stage = replace_settings(LOCAL_ONLY, first_stage=1.0)
    with_marks = discover(maps, probes, probes.labels, probes.labels, lambda x: model(x), one_stage)
    without = discover(maps, plain, plain.labels, plain.labels, lambda x: model(x), one_stage)
    n = len(with_marks.tests)
    assert n and with_marks.tests == without.tests[:n]


def test_with_marks_the_evidence_is_the_mean_over_the_mask_free_arms_and_the_marked_one() -> None:
    """A model told by the floating tag, its tags marked: the marked arm's detector grows, and the
    logged evidence pools it with the mask-free arms that run (half their mean, half every pair)."""
    from cam_monitor.discovery import arms_run

    probes = floating_tag_probes(32)

    class Tagged(nn.Module):  # the tag model behind a layer that gives maps
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(1, 1, 4, stride=4)  # a 4 x 4 grid that passes the image's cell means on
            nn.init.constant_(self.body.weight, 1 / 16)
            nn.init.zeros_(self.body.bias)
            self.tag = TagModel(True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lift = 0.01 * self.body(x).mean((1, 2, 3))  # a little credit everywhere: non-zero maps
            return self.tag(x) + torch.stack([-lift, lift], 1)

    settings = EvalSettings(layer="body", faithfulness=False, discovery=DiscoverySettings(skill_level=1.0))
    ev = evaluate(Tagged(), probes, settings)
    arms = arms_run(settings.discovery, tuple(ev.maps.shape[-2:]), probes)
    assert arms[-1] == "marked" and ev.discovery.diffs()["marked"].numel()
    assert ev.evidence.detector("marked") > 1 and ev.aggregates["marked_flip_excess"] > 0.5
    mean = sum(ev.evidence.detector(a) for a in arms) / len(arms)
    assert ev.aggregates["shortcut_evidence"] == pytest.approx(0.5 * mean + 0.5 * ev.evidence.detector("all"))


def unmarked_tag_probes(n: int = 16, seed: int = 0) -> cm.ProbeSet:
    """32 x 32 px. Half class 1: a bright 8 x 8 tag at a random place clear of the centre
    (``TagModel`` reads it anywhere, :data:`~cam_monitor.probes.recurrence.MIN_PIXELS` keyed pixels
    and more at its edge), and a centre of its own brightness (objects differ from image to
    image); half class 0 (dim noise). No masks."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 2 * SIZE, 2 * SIZE, generator=g) * 0.1
    labels = torch.tensor([1, 0] * (n // 2))
    for i in (labels == 1).nonzero()[:, 0].tolist():
        images[i, 0, 6:10, 6:10] = 0.4 + 0.3 * torch.rand(1, generator=g)
        y, x = (int(v) for v in torch.randint(12, 2 * SIZE - 8, (2,), generator=g))
        images[i, 0, y:y + 8, x:x + 8] = 1.0
    return cm.ProbeSet(images, labels)


def test_without_masks_the_recurring_arm_tests_a_tag_drawn_the_same_in_several_probes() -> None:
    """The tag is the same pixels wherever it sits, so the recurrence finder marks it and the
    recurring arm pastes it whole, with no masks and with maps on the centre: a model told by the
    tag flips on its tests and not on their controls; a model told by the centre flips on neither."""
    from cam_monitor.discovery import arms_run

    probes = unmarked_tag_probes()
    assert "recurring" in arms_run(DiscoverySettings(), (4, 4), probes)
    assert "recurring" not in arms_run(DiscoverySettings(recurring_test=False), (4, 4), probes)
    noisy = cm.ProbeSet((probes.images + 0.03 * torch.randn(probes.images.shape,
                                                            generator=torch.Generator().manual_seed(2))).clamp(0, 1),
                        probes.labels)
    # the tag under noise: the tolerant keys'. Turned partners find the whole 2 px ring of keyed pixels
    # around this flat square too, and its box (12 x 12 of 32 x 32) is over MAX_SHARE: background
    upright = DiscoverySettings(recurring_turned=False)
    assert "recurring" in arms_run(upright, (4, 4), noisy)
    exact = DiscoverySettings(recurring_tolerant=False, recurring_turned=False)
    assert "recurring" not in arms_run(exact, (4, 4), noisy)
    maps = one_cell_maps(len(probes), (1, 1))
    for model, expected in ((TagModel(True), 1.0), (CentreOnly(), 0.0)):
        preds = model(probes.images).argmax(1)
        assert torch.equal(preds, probes.labels)
        found = discover(maps, probes, probes.labels, preds, lambda x, m=model: m(x), MARKED_ONLY)
        recurring = found.paired["recurring"]
        assert recurring.pairs and all(found.suspects[p.suspect].cls == 1 for p in recurring.pairs)
        assert float(recurring.flips.float().mean()) == expected and not recurring.control_flips.any()


def test_the_recurring_arms_regions_are_the_found_tags_where_its_evidence_backs_them() -> None:
    """Where the recurring arm's pairs are for a cue, its regions (class, box around what it carried,
    flips against controls) and masks are the found regions beside the local test's; where they are
    not (a model told by the centre), it has none."""
    from cam_monitor.probes.recurrence import recurring_of

    probes = unmarked_tag_probes()
    maps = one_cell_maps(len(probes), (1, 1))
    tagged = probes.images[:, 0] == 1.0
    for model in (TagModel(True), CentreOnly()):
        preds = model(probes.images).argmax(1)
        found = discover(maps, probes, probes.labels, preds, lambda x, m=model: m(x), MARKED_ONLY)
        assert found.marks["recurring"] is recurring_of(probes.images)
        evidence = EvidenceState().update(found.diffs(), 0.7, 0.05)
        masks = found.found_masks(evidence, len(probes), probes.image_size)
        recurring = [r for r in found.found_regions(evidence, probes.ids) if r["test"] == "recurring"]
        if isinstance(model, CentreOnly):
            assert found.backed_marks(evidence) == () and not recurring
            assert not (masks & tagged).any()
            continue
        assert found.backed_marks(evidence) == ("recurring",) and found.backs_regions(evidence)
        (region,) = recurring
        assert region["class"] == 1 and region["flip_rate"] == 1.0 and region["control_rate"] == 0.0
        for pid, (y0, x0, y1, x1) in zip(region["probe_ids"], region["boxes"]):
            tag = tagged[probes.ids.index(pid)]
            assert tag[y0:y1, x0:x1].sum() == tag.sum() == 64 and (y1 - y0) * (x1 - x0) <= 12 * 12
        sources = {probes.ids.index(pid) for pid in region["probe_ids"]}
        assert all(bool((masks[i] & tagged[i]).sum() == 64) for i in sources)
        assert not masks[probes.labels == 0].any() and found.backed_marks(None) == ()
        assert not found.found_masks(EvidenceState(), len(probes), probes.image_size)[list(sources)].any()


def test_the_recurring_arm_scores_the_gain_in_the_cues_class_where_flips_see_nothing() -> None:
    """A model that leans on the tag (class 1 by the centre; the tag adds to class 1's logit, too
    little to turn a dim-centred image) raises class 1's probability on every recipient given it
    (from about 0.29 to 0.40) and turns none: the graded pairs are wins, its evidence grows, its
    regions are the tags; a model told by the centre alone gains nothing from them."""
    probes = unmarked_tag_probes()
    maps = one_cell_maps(len(probes), (1, 1))
    tagged = probes.images[:, 0] == 1.0
    for model in (TagModel(True, tag_weight=0.5, centre_weight=2.0), CentreOnly()):
        preds = model(probes.images).argmax(1)
        assert torch.equal(preds, probes.labels)
        found = discover(maps, probes, probes.labels, preds, lambda x, m=model: m(x), MARKED_ONLY)
        recurring = found.paired["recurring"]
        assert recurring.pairs and not recurring.flips.any() and not recurring.control_flips.any()
        evidence = EvidenceState().update(found.diffs(), DiscoverySettings().bets, DiscoverySettings().margins)
        agg = found.aggregates()
        if isinstance(model, CentreOnly):
            assert recurring.gains.abs().max() < 1e-6 and evidence.detector("recurring") < 1.0  # ties cost the margin
            assert agg["recurring_gain"] == pytest.approx(0.0, abs=1e-6) and not found.backed_marks(evidence)
            continue
        assert recurring.gains.min() > 0.1 and torch.equal(found.diffs()["recurring"], recurring.outcomes)
        assert recurring.outcomes.min() == 1.0  # a gain above the scale (0.1) counts as a turned prediction
        assert agg["recurring_flip_excess"] == 0.0 and 0.1 < agg["recurring_gain"] < 0.12
        assert evidence.detector("recurring") == pytest.approx((1 + 0.7 * 0.95) ** len(recurring.pairs))
        (region,) = found.found_regions(evidence, probes.ids)
        assert region["test"] == "recurring" and region["flip_rate"] == 0.0 and region["outcome"] == 1.0
        masks = found.found_masks(evidence, len(probes), probes.image_size)
        assert masks.any() and bool(((masks & tagged).sum((1, 2)) == masks.any((1, 2)).long() * 64).all())


def test_graded_outcomes_are_the_gain_over_the_scale_clipped_and_the_flips_where_no_scale() -> None:
    from cam_monitor.discovery import PairedArm, graded

    gains = torch.tensor([-0.5, -0.05, 0.0, 0.02, 0.3])
    assert torch.allclose(graded(gains, 0.1), torch.tensor([-1.0, -0.5, 0.0, 0.2, 1.0], dtype=torch.float64))
    flips, controls = torch.tensor([True, False, True, False, False]), torch.tensor([False, True, True, False, False])
    assert torch.equal(PairedArm([], flips, controls, gains).outcomes, torch.tensor([1, -1, 0, 0, 0]))
    assert torch.equal(PairedArm([], flips, controls, gains, 0.1).outcomes, graded(gains, 0.1))
    assert DiscoverySettings(recurring_gain_scale=0.2).gain_scales == {"recurring": 0.2}  # the marked arm counts flips


def test_the_recurring_arm_does_not_run_where_nothing_recurs() -> None:
    """Dim noise and centres of their own brightness: nothing is drawn the same twice."""
    from cam_monitor.discovery import arms_run

    probes = unmarked_tag_probes()
    images = probes.images.clone()
    images[:, :, :, :] = torch.where(images == 1.0, torch.rand(images.shape, generator=torch.Generator().manual_seed(1))
                                     * 0.1, images)
    assert "recurring" not in arms_run(DiscoverySettings(), (4, 4), cm.ProbeSet(images, probes.labels))
