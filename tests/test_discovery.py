"""Mask-free discovery (suspects from the maps) and its paste confirmation, without Lightning."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cam_monitor as cm
from cam_monitor.discovery import (DiscoverySettings, cells_to_pixels, discover, find_suspects, pasted_images,
                                   plan_tests, top_boxes)
from cam_monitor.evaluation import EvalSettings, evaluate

SIZE = 16


def one_cell_maps(n: int, cell: tuple[int, int], grid: int = 4, rest: float = 0.01) -> torch.Tensor:
    maps = torch.full((n, grid, grid), rest)
    maps[:, cell[0], cell[1]] = 1.0
    return maps


class TagModel(nn.Module):
    """Class 1 when the top-left 4x4 corner is bright (the 'tag'), else class 0 by the centre: a
    shortcut model (``use_tag``) or a control that reads only the centre."""

    def __init__(self, use_tag: bool) -> None:
        super().__init__()
        self.use_tag = use_tag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tag = x[:, 0, :4, :4].mean((1, 2)) if self.use_tag else torch.zeros(len(x))
        centre = x[:, 0, 6:10, 6:10].mean((1, 2))
        score1 = 4 * tag + centre
        return torch.stack([torch.full_like(score1, 1.0), score1], 1)


def tag_probes(n: int = 16) -> cm.ProbeSet:
    """Half class 1 (tag in the corner), half class 0 (no tag, dim centre)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.1
    labels = torch.tensor([1, 0] * (n // 2))
    images[labels == 1, 0, :4, :4] = 1.0
    return cm.ProbeSet(images, labels)


def test_top_boxes_is_the_smallest_box_holding_the_share() -> None:
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 2] = 1.0                      # one cell
    maps[1, 0, 0], maps[1, 0, 1] = 1.0, 1.0  # two cells side by side
    maps[2] = 1.0                            # uniform: no small box holds half
    boxes, held = top_boxes(maps, share=0.5, max_cells=2)
    assert boxes[0].tolist() == [1, 2, 2, 3] and held[0] == 1.0
    assert boxes[1].tolist() in ([0, 0, 1, 1], [0, 1, 1, 2]) and held[1] == 0.5  # one cell already holds half
    assert math.isnan(held[2])
    _, zero = top_boxes(torch.zeros(1, 4, 4), 0.5, 4)
    assert math.isnan(zero[0])


def test_boxes_are_converted_to_image_pixels_by_the_stride() -> None:
    assert cells_to_pixels(torch.tensor([1, 2, 2, 3]), (4, 4), (16, 16)) == (4, 8, 8, 12)
    assert cells_to_pixels(torch.tensor([0, 0, 7, 7]), (7, 7), (224, 224)) == (0, 0, 224, 224)


def test_suspects_are_concentrated_maps_of_correct_predictions_only() -> None:
    maps = torch.cat([one_cell_maps(2, (0, 0)), torch.ones(1, 4, 4)])  # third map is diffuse
    targets = torch.tensor([1, 1, 1])
    preds = torch.tensor([1, 0, 1])  # the second probe is misclassified
    suspects = find_suspects(maps, targets, preds, (SIZE, SIZE), DiscoverySettings(max_area=0.1))
    assert [(s.probe, s.cls, s.box) for s in suspects] == [(0, 1, (0, 0, 4, 4))]


def test_a_model_using_the_tag_flips_and_the_control_boxes_do_not() -> None:
    probes = tag_probes()
    maps = one_cell_maps(len(probes), (0, 0))
    maps[probes.labels == 0] = 1.0  # class-0 evidence is diffuse: only the tagged class has suspects
    settings = DiscoverySettings(max_area=0.1)
    for use_tag, expected in ((True, 1.0), (False, 0.0)):
        model = TagModel(use_tag)
        preds = model(probes.images).argmax(1)
        predict = lambda x, m=model: m(x).argmax(1)  # noqa: E731
        found = discover(maps, probes, probes.labels, preds, predict, settings)
        agg = found.aggregates()
        if not use_tag:  # the control model never predicts class 1, so there is no suspect to test
            assert found.suspects == [] and math.isnan(agg["shortcut_flip_excess"])
            continue
        assert len(found.tests) == len(probes) // 2  # the budget: tests + controls = one probe-set forward
        assert agg["shortcut_flip_rate"] == expected and agg["shortcut_flip_control"] == 0.0
        assert agg["shortcut_flip_excess"] == 1.0 and agg["shortcut_suspects"] == 8.0
        (region,) = found.regions(probes.ids)
        assert region["class"] == 1 and region["boxes"][0] == [0, 0, 4, 4] and region["flip_rate"] == 1.0
        masks = found.masks(len(probes), probes.image_size)
        assert masks[probes.labels == 1][:, :4, :4].all() and not masks[probes.labels == 0].any()


def test_a_piece_of_the_object_flips_too_but_so_do_its_control_boxes() -> None:
    """A model reading the mean of the whole image: any bright box of that size flips it, the
    suspect's and the control's alike, so the excess stays near zero."""

    class MeanModel(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.mean((1, 2, 3))
            return torch.stack([torch.full_like(m, 0.3), 10 * m], 1)

    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([1, 0] * 8)
    images = torch.where(labels[:, None, None, None] == 1, torch.ones(16, 1, SIZE, SIZE), torch.zeros(16, 1, SIZE, SIZE))
    images = images + 0.01 * torch.rand(16, 1, SIZE, SIZE, generator=g)
    probes = cm.ProbeSet(images, labels)
    model = MeanModel()
    found = discover(one_cell_maps(16, (1, 1)), probes, labels, model(images).argmax(1), lambda x: model(x).argmax(1),
                     DiscoverySettings(max_area=0.1))
    agg = found.aggregates()
    assert agg["shortcut_flip_rate"] == agg["shortcut_flip_control"]
    assert agg["shortcut_flip_excess"] == 0.0


def test_tests_go_round_robin_over_classes_into_other_class_recipients_with_disjoint_controls() -> None:
    n = 30
    labels = torch.arange(n) % 3
    maps = torch.stack([one_cell_maps(1, (int(c), int(c)))[0] for c in labels])
    suspects = find_suspects(maps, labels, labels, (SIZE, SIZE), DiscoverySettings(max_area=0.1))
    gen = torch.Generator().manual_seed(0)
    tests = plan_tests(suspects, labels, labels, (SIZE, SIZE), 12, gen)
    assert len(tests) == 12
    assert {suspects[t.suspect].cls for t in tests[:3]} == {0, 1, 2}
    for t in tests:
        s = suspects[t.suspect]
        assert labels[t.recipient] != s.cls
        y0, x0, y1, x1 = s.box
        cy0, cx0, cy1, cx1 = t.control_box
        assert (cy1 - cy0, cx1 - cx0) == (y1 - y0, x1 - x0)
        assert cy1 <= y0 or cy0 >= y1 or cx1 <= x0 or cx0 >= x1  # the control never overlaps the suspect box
    again = plan_tests(suspects, labels, labels, (SIZE, SIZE), 12, torch.Generator().manual_seed(0))
    assert [(t.suspect, t.recipient, t.control_box) for t in again] == [(t.suspect, t.recipient, t.control_box)
                                                                         for t in tests]


def test_pasted_images_copy_the_box_from_the_suspect_and_nothing_else() -> None:
    probes = tag_probes(4)
    maps = one_cell_maps(4, (0, 0))
    suspects = find_suspects(maps, probes.labels, probes.labels, (SIZE, SIZE), DiscoverySettings(max_area=0.1))
    tests = plan_tests(suspects, probes.labels, probes.labels, (SIZE, SIZE), 1, torch.Generator().manual_seed(0))
    (test,) = tests
    out = pasted_images(probes.images, suspects, tests)
    src, dst = probes.images[suspects[test.suspect].probe], probes.images[test.recipient]
    assert out.shape == (2, 1, SIZE, SIZE)
    assert torch.equal(out[0, :, :4, :4], src[:, :4, :4]) and torch.equal(out[0, :, 4:], dst[:, 4:])
    cy0, cx0, cy1, cx1 = test.control_box
    assert torch.equal(out[1, :, cy0:cy1, cx0:cx1], src[:, cy0:cy1, cx0:cx1])
    assert torch.equal(out[1, :, :4, :4], dst[:, :4, :4])
    assert not torch.equal(probes.images[test.recipient], out[0])  # the probe itself is untouched


def test_too_few_tests_give_nan_rates_and_cost_no_forward() -> None:
    probes = tag_probes(4)
    model = TagModel(True)
    calls = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return model(x).argmax(1)

    found = discover(one_cell_maps(4, (0, 0)), probes, probes.labels, model(probes.images).argmax(1), predict,
                     DiscoverySettings(max_area=0.1, min_tests=8))
    assert found.tests == [] and math.isnan(found.aggregates()["shortcut_flip_rate"]) and calls == []


@pytest.mark.parametrize("kwargs, text", [(dict(energy_share=1.0), "energy_share"), (dict(max_area=0), "max_area"),
                                          (dict(budget=0), "budget"), (dict(min_tests=0), "min_tests")])
def test_bad_settings_are_refused(kwargs, text) -> None:
    with pytest.raises(ValueError, match=text):
        DiscoverySettings(**kwargs)


def test_evaluate_runs_discovery_with_one_probe_set_of_extra_images_and_can_turn_it_off() -> None:
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
    ev = evaluate(model, probes, EvalSettings(layer="body", faithfulness=False))
    assert {"shortcut_flip_rate", "shortcut_flip_control", "shortcut_flip_excess", "shortcut_suspects"} <= set(ev.aggregates)
    assert ev.discovery is not None and "shortcut_flip" in ev.per_probe
    assert model.calls <= 2 * len(probes)  # the CAM pass plus at most one probe set of pasted images
    off = evaluate(model, probes, EvalSettings(layer="body", discovery=DiscoverySettings(enabled=False)))
    assert off.discovery is None and "shortcut_flip_rate" not in off.aggregates


def test_one_probes_box_is_not_a_shortcut_however_often_it_flips() -> None:
    """A shortcut recurs across probes; one suspect pasted into many recipients (a telling piece
    of one object) gives NaN rates below ``min_suspects``, so it cannot alert, and costs no forward."""
    probes = tag_probes()
    maps = torch.ones(len(probes), 4, 4)
    maps[0] = one_cell_maps(1, (0, 0))[0]  # probe 0 (tagged, class 1) concentrates
    maps[1] = one_cell_maps(1, (0, 0))[0]  # and probe 1 (class 0)
    model = TagModel(True)
    predict = lambda x: model(x).argmax(1)  # noqa: E731
    preds = model(probes.images).argmax(1)
    found = discover(maps, probes, probes.labels, preds, predict, DiscoverySettings(max_area=0.1, min_suspects=3))
    assert len(found.suspects) == 2 and found.tests == []
    assert math.isnan(found.aggregates()["shortcut_flip_excess"])
    two = discover(maps, probes, probes.labels, preds, predict, DiscoverySettings(max_area=0.1, min_suspects=2))
    assert len(two.tests) >= 8 and not math.isnan(two.aggregates()["shortcut_flip_excess"])


def test_discovery_under_inference_mode_matches_grad_mode() -> None:
    """``trainer.validate()`` runs hooks under inference_mode: the paste test must work there too."""
    probes = tag_probes()
    maps = one_cell_maps(len(probes), (0, 0))
    maps[probes.labels == 0] = 1.0
    model = TagModel(True)
    preds = model(probes.images).argmax(1)
    settings = DiscoverySettings(max_area=0.1)
    plain = discover(maps, probes, probes.labels, preds, lambda x: model(x).argmax(1), settings)
    with torch.inference_mode():
        inside = discover(maps, probes, probes.labels, preds, lambda x: model(x).argmax(1), settings)
    assert inside.aggregates() == plain.aggregates() and inside.aggregates()["shortcut_flip_excess"] == 1.0


def test_the_monitor_takes_discovery_settings_and_refuses_other_types() -> None:
    tuned = cm.CAMMonitor(discovery=cm.DiscoverySettings(max_area=0.08, budget=0.5))
    assert tuned.settings.discovery.max_area == 0.08 and tuned.settings.discovery.budget == 0.5
    assert cm.CAMMonitor(discovery=False).settings.discovery.enabled is False
    assert cm.CAMMonitor(probe_seed=3).settings.discovery.seed == 3
    with pytest.raises(TypeError, match="discovery must be True, False or a DiscoverySettings"):
        cm.CAMMonitor(discovery="yes")
