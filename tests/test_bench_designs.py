"""The design benchmarks' measures: recurrence, the local test's blurred control, the background-detail test."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_local_test  # noqa: E402
import bench_recurrence as bench  # noqa: E402

import cam_monitor as cm  # noqa: E402


def test_a_window_cut_from_an_image_correlates_fully_with_it_and_less_with_others() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 16, 16, generator=gen)
    stamp = images[0, :, 4:8, 9:13].clone()
    images[2, :, 10:14, 1:5] = 2 * stamp + 1  # a copy elsewhere, brighter: correlation ignores gain and offset
    best = bench.best_correlation(stamp, images)
    assert best[0] == pytest.approx(1.0, abs=1e-4) and best[2] == pytest.approx(1.0, abs=1e-4)
    assert best[1] < 0.99
    assert torch.equal(bench.best_correlation(torch.ones(1, 4, 4), images), torch.zeros(3))  # nothing to match


def test_the_window_is_centred_on_the_peak_cell_and_kept_inside_the_grid() -> None:
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 2] = 1.0
    maps[1, 3, 3] = 1.0  # a corner peak: the window moves inside
    assert bench.peak_windows(maps, 2, (32, 32)) == [(0, 8, 16, 24), (16, 16, 32, 32)]


def test_pairs_are_split_by_predicted_class_without_the_diagonal() -> None:
    same, other = bench.same_and_other(torch.tensor([0, 0, 1]))
    assert same.tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert other.tolist() == [[False, False, True], [False, False, True], [True, True, False]]


class _FinePattern(torch.nn.Module):
    """Class 1 by the fine detail it sees (pixel-to-pixel changes, summed over a 4 x 4 grid of 8 px
    cells, the monitored layer ``grid``), class 0 by a constant: a cue told by its fine pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.grid = torch.nn.AvgPool2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        change = torch.nn.functional.pad((x[..., 1:] - x[..., :-1]).abs(), (0, 1))
        detail = self.grid(change).flatten(1).sum(1)
        return torch.stack([torch.full_like(detail, 0.1), detail], 1)


def test_the_blurred_control_is_the_candidates_own_window_without_its_detail() -> None:
    """A model told by a fine pattern follows the candidate's window and not the same window blurred:
    every pair wins (the candidates are the class-1 probes, whose maps credit their checkerboard;
    class 0's maps are zero, so none of them is a candidate)."""
    images = torch.zeros(8, 1, 32, 32)
    images[4:, 0, :8, :8] = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2).float()
    probes = cm.ProbeSet(images, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    model = _FinePattern().eval()
    (row,) = bench_local_test.score(model, probes, 8, [(2, "blurred", "own", "cell", "probe")], 0,
                                    torch.zeros(8, 32, 32, dtype=torch.bool), layer="grid")
    assert row["accuracy"] == 1.0 and row["pairs"] == 8
    assert row["wins"] == 8 and row["losses"] == 0 and row["candidate_on_cue"] == 0


def test_background_detail_pairs_join_correct_probes_of_different_classes_and_count_discordant_outcomes() -> None:
    import bench_background_detail as bd

    labels = torch.tensor([0, 0, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 2])  # probe 1 is wrong: never a candidate or a recipient
    sources, recipients = bd.draw_pairs(preds, labels, 50, torch.Generator().manual_seed(0))
    assert len(sources) == 50 and 1 not in sources + recipients
    assert all(preds[s] != preds[r] for s, r in zip(sources, recipients))
    assert bd.draw_pairs(preds, torch.tensor([9, 9, 9, 9, 9]), 5, torch.Generator()) == ([], [])
    row = bd.outcome(torch.tensor([True, True, False, False]), torch.tensor([False, True, True, False]))
    assert (row["wins"], row["losses"], row["pairs"]) == (1, 1, 4) and row["p"] == 0.75



def test_a_decoy_is_a_probe_of_another_class_and_cancels_a_default_class() -> None:
    """A model that sends every shuffled image to class 0 and every blurred one to class 1 wins its
    class-0 pairs and loses its class-1 pairs against the plain blur; with decoys of another class
    every pair ties. A shuffle that keeps each probe's own class wins every pair against decoys
    (the blur's keeps on class 1 are its default answer, cancelled by the decoys)."""
    import bench_detail_test as bd

    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    other = bd.decoys(labels, torch.Generator().manual_seed(0))
    assert all(labels[o] != labels[i] for i, o in enumerate(other.tolist()))
    assert bd.decoys(torch.tensor([4, 4]), torch.Generator()).tolist() == [0, 1]  # no other class: itself

    shuffled, blurred = torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    assert bd.wins_losses(labels, shuffled, blurred) == (2, 3)
    assert bd.wins_losses(labels, shuffled, blurred, other) == (0, 0)
    assert bd.wins_losses(labels, labels.clone(), blurred, other) == (6, 0)  # the shuffle reads each class
    assert bd.top_share(shuffled) == 1.0 and bd.top_share(labels) == 0.5
    row = {"pairs": 6, "wins": 3, "losses": 1}
    assert bd.above_margin(row) and not bd.above_margin({**row, "wins": 2})


def test_the_colour_designs_move_the_background_statistics_between_probes() -> None:
    """``background`` gives each image's background (outside its object region) the other's mean and
    spread per channel, ``level`` only the other's mean; tests come first, then controls."""
    import bench_colour_test as bc

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=gen)
    images[1] = 3 * images[1] + 2
    objects = torch.zeros(2, 8, 8, dtype=torch.bool)
    objects[0, :4, :4] = True
    objects[1, 4:, 4:] = True
    mean, std = bc.region_statistics(images, ~objects)
    plain = images[1][:, ~objects[1]]
    assert torch.allclose(mean[1].flatten(), plain.mean(1)) and torch.allclose(std[1].flatten(), plain.std(1, unbiased=False))

    out = bc.DESIGNS["background"](images, objects, [0], [1])  # source 0 into recipient 1
    test, control = out[:1], out[1:]
    m_test, s_test = bc.region_statistics(test, ~objects[1:])
    m_ctrl, s_ctrl = bc.region_statistics(control, ~objects[:1])
    assert torch.allclose(m_test, mean[:1], atol=1e-5) and torch.allclose(s_test, std[:1], atol=1e-5)
    assert torch.allclose(m_ctrl, mean[1:], atol=1e-5) and torch.allclose(s_ctrl, std[1:], atol=1e-5)

    shifted = bc.DESIGNS["level"](images, objects, [0], [1])
    assert torch.allclose(shifted[0] - images[1], (mean[0] - mean[1]).expand(3, 8, 8), atol=1e-5)
    assert bc.DESIGNS["whole"](images, objects, [], []).shape == (0, 3, 8, 8)


def test_the_robust_colour_designs_move_the_majority_of_pixels_and_ignore_the_object_size() -> None:
    """``median`` moves each image's per-channel median to the other's; ``median_iqr`` also its
    interquartile spread; an object on less than a quarter of the image moves neither, so two images
    whose only difference is the object's size are left as they were by them and by the monitor's
    ``robust`` design (the whole image's mean and spread move)."""
    import bench_colour_test as bc

    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 8, 8, generator=gen)
    images[1] = 0.5 * images[1] + 2
    objects = torch.zeros(2, 8, 8, dtype=torch.bool)
    out = bc.DESIGNS["median_iqr"](images, objects, [0], [1])
    (m_test, s_test), (m_src, s_src) = bc.colour_statistics(out[:1], 0.25), bc.colour_statistics(images[:1], 0.25)
    assert torch.allclose(m_test, m_src, atol=1e-5) and torch.allclose(s_test, s_src, atol=1e-5)
    (m_ctrl, _), (m_dst, _) = bc.colour_statistics(out[1:]), bc.colour_statistics(images[1:])
    assert torch.allclose(m_ctrl, m_dst, atol=1e-5)
    shifted = bc.DESIGNS["median"](images, objects, [0], [1])
    assert torch.allclose(shifted[0] - images[1], (m_src - m_dst)[0].expand(3, 8, 8), atol=1e-5)

    background = 0.1 + 0.2 * ((torch.arange(8)[:, None] + torch.arange(8)) % 2).float()  # a two-level pattern
    small, large = background.clone()[None, None], background.clone()[None, None]
    small[..., 3:5, 3:5], large[..., 2:5, 2:6] = 1.0, 1.0  # 4 and 12 of 64 pixels: a ring and a disc
    pair = torch.cat([small, large])
    for design in ("median", "median_iqr", "robust"):  # same median (0.3), quartiles (0.1, 0.3), 1-99 % range
        assert torch.allclose(bc.DESIGNS[design](pair, objects, [0], [1]), pair.flip(0), atol=1e-6)
    assert not torch.allclose(bc.DESIGNS["whole"](pair, objects, [0], [1]), pair.flip(0))


def test_the_colour_summary_judges_only_evaluations_that_beat_chance() -> None:
    import bench_colour_test as bc

    row = {"design": "whole", "model": "m", "epoch": 0, "pairs": 100}
    records = [{**row, "variant": "control", "beats_chance": False, "wins": 90, "losses": 0, "excess": 0.9, "p": 1e-9},
               {**row, "variant": "control", "beats_chance": True, "wins": 10, "losses": 1, "excess": 0.09, "p": 0.006},
               {**row, "variant": "control", "beats_chance": True, "wins": 1, "losses": 30, "excess": -0.29, "p": 1.0},
               {**row, "variant": "shortcut", "beats_chance": True, "wins": 50, "losses": 2, "excess": 0.48, "p": 1e-12}]
    (summary,) = bc.summary(records, margin=0.05)
    assert summary["control_evaluations"] == 2 and summary["control_broken"] == 1
    assert summary["worst_control"].startswith("10:1") and summary["shortcut_median_wins"] == 50
    (strict,) = bc.summary(records, margin=0.1)
    assert strict["control_broken"] == 0


class _Brightness(torch.nn.Module):
    """Class 1 by the whole image's brightness (an object spanning every window), read through a
    4 x 4 grid of 8 px cells (the monitored layer ``grid``); class 0 a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.grid = torch.nn.AvgPool2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.grid(x).flatten(1).mean(1)
        return torch.stack([torch.full_like(mean, 0.5), mean], 1)


def _swap_score(model: torch.nn.Module, images: torch.Tensor) -> dict:
    probes = cm.ProbeSet(images, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    (row,) = bench_local_test.score(model, probes, 8, [(2, "swap", "credited", "cell", "probe")], 0,
                                    torch.zeros(8, 32, 32, dtype=torch.bool), layer="grid")
    return row


def test_the_swap_control_wins_where_the_class_follows_the_window_and_loses_where_it_stays_with_the_image() -> None:
    """A model told by a checkerboard stamp takes the class wherever the stamp's window goes: the
    recipient flips and the source, given the recipient's flat window, loses it (every pair a win).
    A model told by the whole image's brightness keeps the class with the rest of the image: the
    recipient stays dark, the source stays bright (every pair a loss)."""
    stamp = torch.zeros(8, 1, 32, 32)
    stamp[4:, 0, :8, :8] = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2).float()
    row = _swap_score(_FinePattern().eval(), stamp)
    assert row["pairs"] == 8 and (row["wins"], row["losses"]) == (8, 0)

    bright = torch.full((8, 1, 32, 32), 0.2)
    bright[4:] = 0.8
    row = _swap_score(_Brightness().eval(), bright)
    assert row["pairs"] == 8 and (row["wins"], row["losses"]) == (0, 8)


def test_cue_transplant_pairs_join_correct_probes_of_other_classes_whose_cues_have_one_size() -> None:
    import bench_cue_transplant as bt

    masks = torch.zeros(5, 16, 16, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True
    masks[1, 8:10, 0:4] = True
    masks[2, 4:6, 4:8] = True
    masks[3, 0:4, 0:2] = True  # another size
    boxes = bt.cue_boxes(masks)  # probe 4 has no cue
    assert boxes == [(1, 2, 3, 6), (8, 0, 10, 4), (4, 4, 6, 8), (0, 0, 4, 2), None]
    labels, preds = torch.tensor([0, 1, 1, 2, 3]), torch.tensor([0, 1, 0, 2, 3])  # probe 2 is wrong
    pairs = bt.transplant_pairs(labels, preds, boxes, 10, torch.Generator().manual_seed(0))
    assert sorted(pairs) == [(0, 1), (1, 0)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        y0, x0, y1, x1 = bt.elsewhere((4, 4, 8, 8), (16, 16), gen)
        assert (y1 - y0, x1 - x0) == (4, 4) and (y0 >= 8 or y1 <= 4 or x0 >= 8 or x1 <= 4)
    assert bt.elsewhere((0, 0, 16, 16), (16, 16), gen) is None  # no room


class _StampClass(torch.nn.Module):
    """Class k by which of two stamps (a bright or a mid-grey 4 x 4 square) the image holds: a model
    that reads nothing but the cue."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.flatten(1).max(1).values
        return torch.stack([(peak < 0.75).float(), (peak >= 0.75).float()], 1)


def test_a_cue_moved_whole_carries_its_class_on_a_model_that_reads_it_and_not_on_one_that_does_not() -> None:
    import bench_cue_transplant as bt

    gen = torch.Generator().manual_seed(0)
    images = 0.1 * torch.rand(8, 1, 16, 16, generator=gen)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    masks = torch.zeros(8, 16, 16, dtype=torch.bool)
    for i in range(8):
        y, x = 2 * (i % 4), 3 + (i % 3)
        masks[i, y:y + 4, x:x + 4] = True
        images[i, :, y:y + 4, x:x + 4] = 0.5 if labels[i] == 0 else 1.0
    row = bt.measure(_StampClass(), images, labels, masks, 50, 0)
    assert row["accuracy"] == 1.0 and row["pairs"] == 32
    assert row["recipient_follows"] == 1.0 and row["source_follows"] == 1.0 and row["recipient_keeps"] == 0.0
    assert row["oracle_wins"] > 0 and row["oracle_losses"] == 0 and row["oracle_p"] < 0.01

    class _Dim(torch.nn.Module):  # class 1 by a background brighter than the stamps' surroundings elsewhere
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rest = x[..., 12:, :].mean((1, 2, 3))
            return torch.stack([0.06 - rest, rest - 0.06], 1)

    images[4:, :, 12:, :] += 0.1  # the "object" of class 1, away from every cue
    row = bt.measure(_Dim(), images, labels, masks, 50, 0)
    assert row["accuracy"] == 1.0 and row["recipient_follows"] == 0.0 and row["recipient_keeps"] == 1.0
    assert row["oracle_wins"] == 0


def test_the_cached_models_parser_reads_the_specs_and_the_shared_defaults() -> None:
    args = bench_local_test.cached_models_parser("A benchmark.\n\nMore.", "local_test").parse_args(
        ["--specs", "digits:text_tag:shortcut:0,shapes:ruler:control:2:resnet18"])
    Spec = bench_local_test.Spec
    assert args.specs == [Spec("digits", "text_tag", "shortcut", 0), Spec("shapes", "ruler", "control", 2, "resnet18")]
    assert args.epochs == 6 and args.cache == bench_local_test.CACHE
    assert Path(args.out).name == "local_test_cpu.json"


@pytest.mark.parametrize("name", ["bench_local_test", "bench_cue_transplant", "bench_colour_test", "bench_detail_test",
                                  "bench_background_detail", "bench_recurrence"])
def test_every_benchmark_on_cached_models_takes_the_shared_arguments(name, monkeypatch, capsys) -> None:
    import importlib
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--specs", "--epochs", "--cache", "--out"))


@pytest.mark.parametrize(("name", "extra"), [
    ("bench_local_test", ["--pairs", "4", "--boxes", "1"]), ("bench_cue_transplant", ["--pairs", "4"]),
    ("bench_colour_test", ["--pairs", "4"]), ("bench_detail_test", ["--tiles", "1", "--blurs", "0.5"]),
    ("bench_background_detail", ["--pairs", "4"]), ("bench_recurrence", [])])
def test_every_benchmark_on_cached_models_runs_to_its_result_file(name, extra, tmp_path, monkeypatch) -> None:
    """Each benchmark runs end to end on one cached model (its untrained weights stand for one
    epoch, so nothing is trained) and writes the specs as they were given."""
    import importlib
    import json
    spec = bench_local_test.Spec.parse("digits:corner_patch:control:0")
    probes = bench.truth_probes(spec.cue, spec.seed, 64, spec.base)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save([spec.model(probes).state_dict()], tmp_path / f"{spec.name}_1.pt")
    out = tmp_path / "result.json"
    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--specs", spec.text, "--epochs", "1", "--cache", str(tmp_path),
                                      "--out", str(out), *extra])
    module.main()
    assert json.loads(out.read_text())["specs"] == ["digits:corner_patch:control:0"]
