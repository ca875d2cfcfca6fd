"""Evaluation: settings checked once, equal-length shards, metrics against the reference."""
from __future__ import annotations

import math

import pytest
import torch

import cam_monitor as cm
from cam_monitor.discovery import DiscoverySettings
from cam_monitor.evaluation import EvalSettings, Placement, compute_shard, evaluate, shard_indices, unshard
from cam_monitor.probes import ProbeSet


@pytest.mark.parametrize("n, world", [(15, 2), (1, 2), (7, 4), (8, 4), (5, 1)])
def test_every_rank_gets_the_same_number_of_probes_and_unshard_restores_order(n, world) -> None:
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of forwards
    restored = unshard(torch.stack(shards), n)
    assert restored.tolist() == list(range(n))


def test_sharded_evaluation_equals_the_single_process_one(small_cnn, images) -> None:
    probes = cm.ProbeSet(images[:5], torch.arange(5))
    # the CAM pass's shards only: discovery's sharded forwards gather too, across real processes in test_ddp.py
    settings = EvalSettings("features", batch_size=2, discovery=DiscoverySettings(enabled=False))
    single = evaluate(small_cnn, probes, settings)
    world = 2
    parts = [compute_shard(small_cnn, probes, shard_indices(5, r, world), settings, Placement()) for r in range(world)]
    for rank in range(world):
        # what an all-gather returns: every rank's shard, stacked, one tensor per key in order
        gathered = iter([torch.stack([parts[q][k] for q in range(world)]) for k in parts[0]])
        sharded = evaluate(small_cnn, probes, settings, Placement(rank=rank, world=world, gather=lambda t: next(gathered)))
        assert torch.allclose(sharded.maps, single.maps, atol=1e-6)
        assert sharded.aggregates == pytest.approx(single.aggregates, nan_ok=True)


def test_rise_and_drift_are_zero_without_a_reference_and_measured_against_one(small_cnn, images) -> None:
    probes = cm.ProbeSet(images, torch.arange(6) % 5)
    first = evaluate(small_cnn, probes, EvalSettings("features"))
    assert float(first.per_probe["spurious_energy_rise"].abs().sum()) == 0.0
    assert float(first.per_probe["drift_ref"].abs().sum()) == 0.0
    ref = first.as_reference()
    ref.per_probe["spurious_energy"] = ref.per_probe["spurious_energy"] - 0.25
    again = evaluate(small_cnn, probes, EvalSettings("features"), reference=ref)
    rise, degenerate = again.per_probe["spurious_energy_rise"], torch.isnan(again.per_probe["spurious_energy"])
    assert torch.equal(torch.isnan(rise), degenerate)  # an all-zero map has no rise either
    assert torch.allclose(rise[~degenerate], torch.full((int((~degenerate).sum()),), 0.25), atol=1e-6)
    assert again.aggregates["spurious_energy_rise"] == pytest.approx(0.25, abs=1e-6)


def test_placement_prepares_inputs_and_wraps_only_model_calls(small_cnn, images) -> None:
    probes = cm.ProbeSet(images.double(), torch.arange(6) % 5)
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(torch.is_grad_enabled())

        def __exit__(self, *exc):
            return False

    place = Placement(prepare=lambda x: x.float(), forward_context=Ctx)
    ev = evaluate(small_cnn, probes, EvalSettings("features", batch_size=4), place)
    tested = ev.discovery is not None and ev.discovery.pasted > 0  # discovery's forward is a model call too
    assert len(entered) == 2 + tested and ev.maps.dtype == torch.float32


@pytest.mark.parametrize("kwargs, text", [(dict(targets="x"), "targets"), (dict(batch_size=0), "batch_size"),
                                          (dict(border_fraction=0.6), "border_fraction"),
                                          (dict(methods=("nope",)), "unknown CAM method")])
def test_settings_are_checked_once(kwargs, text) -> None:
    with pytest.raises(ValueError, match=text):
        EvalSettings(**kwargs)


def test_a_probe_with_an_empty_spurious_mask_uses_the_border_band_and_is_not_degenerate(small_cnn, images) -> None:
    from cam_monitor import metrics as M
    from cam_monitor.maps import upsample

    masks = torch.zeros(6, 16, 16, dtype=torch.bool)
    masks[:3, :4, :4] = True  # probes 3..5 have no spurious mask (e.g. no .spurious.png in a folder)
    probes = cm.ProbeSet(images, torch.arange(6) % 5, spurious_masks=masks)
    ev = evaluate(small_cnn, probes, EvalSettings("features"))
    alive = ev.maps.flatten(1).amax(1) > 0
    up = upsample(ev.maps, (16, 16))
    border = M.border_mask(16, 16, 0.1).expand(6, -1, -1)
    expected = torch.where(torch.arange(6)[:, None, None] < 3, masks, border)
    torch.testing.assert_close(ev.per_probe["spurious_energy"], M.energy_fraction(up, expected), equal_nan=True)
    assert not torch.isnan(ev.per_probe["spurious_energy"][alive]).any()
    assert ev.aggregates["degenerate"] == float((~alive).sum())


def test_degenerate_counts_all_zero_maps_only() -> None:
    from cam_monitor.evaluation import aggregate

    maps = torch.zeros(3, 2, 2)
    maps[1, 0, 0] = 1.0
    per = {"spurious_energy": torch.tensor([float("nan"), float("nan"), 0.5])}  # NaN for probe 1: an empty mask
    probes = ProbeSet(torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 0]))
    assert aggregate(per, maps, probes)["degenerate"] == 2.0  # probes 0 and 2 have all-zero maps


def test_the_rise_sign_test_counts_only_probes_with_a_mask_of_their_own() -> None:
    """``spurious_rise_p`` is the one-sided sign test of the probes whose own mask's energy rose
    against those whose fell; a probe on the border band stand-in, no change and NaN do not count,
    and without any mask of the user's there is no such test."""
    from cam_monitor.evaluation import aggregate
    from cam_monitor.evidence import sign_test_p

    n = 16
    masks = torch.zeros(n, 8, 8, dtype=torch.bool)
    masks[:12, :2, :2] = True  # probes 12..15 are measured on the border band
    rise = torch.tensor([0.1] * 9 + [-0.1, 0.0, float("nan")] + [-0.3] * 4)
    maps = torch.ones(n, 2, 2)
    per = {"spurious_energy": torch.full((n,), 0.5), "spurious_energy_rise": rise}
    agg = aggregate(per, maps, ProbeSet(torch.rand(n, 1, 8, 8), torch.arange(n) % 2, spurious_masks=masks))
    assert agg["spurious_masked"] == 12.0 and agg["spurious_rise_p"] == sign_test_p(9, 1) == pytest.approx(11 / 1024)
    assert "spurious_rise_p" not in aggregate(per, maps, ProbeSet(torch.rand(n, 1, 8, 8), torch.arange(n) % 2))
    first = aggregate({"spurious_energy": torch.full((n,), 0.5), "spurious_energy_rise": torch.zeros(n)}, maps,
                      ProbeSet(torch.rand(n, 1, 8, 8), torch.arange(n) % 2, spurious_masks=masks))
    assert first["spurious_rise_p"] == 1.0  # before a reference nothing has changed


def test_quality_is_nan_when_every_map_is_all_zero() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    torch.nn.init.zeros_(model[4].weight)  # a zero head: every map is all zero, as a fresh torchvision ViT's
    probes = cm.ProbeSet(torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0]))
    ev = evaluate(model, probes, EvalSettings("0"))
    assert ev.aggregates["degenerate"] == 4.0
    assert math.isnan(ev.aggregates["quality"]) and math.isnan(ev.aggregates["average_drop"])
    from cam_monitor.checkpoint import failing_gates

    assert failing_gates({"quality": (">=", 0.5)}, {"quality": ev.aggregates["quality"]})
