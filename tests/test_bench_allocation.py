"""benchmarks/bench_allocation.py: replaying how discovery shares its pairs from recorded runs."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_allocation as bench  # noqa: E402
import bench_zoo  # noqa: E402

from cam_monitor.discovery import DiscoverySettings, second_stage_weights  # noqa: E402
from cam_monitor.evidence import EvidenceState  # noqa: E402


def random_pairs(gen: torch.Generator, n: int, win: float) -> torch.Tensor:
    u = torch.rand(n, generator=gen)
    return torch.where(u < win, 1, torch.where(u < win + 0.15, -1, 0)).long()


def test_the_shipped_rule_weighs_the_arms_as_discovery_does() -> None:
    settings, gen = DiscoverySettings(), torch.Generator().manual_seed(0)
    for trial in range(30):
        diffs = {a: random_pairs(gen, int(torch.randint(0, 6, (1,), generator=gen)), 0.6 * float(torch.rand(1, generator=gen)))
                 for a in ("local", "colour", "border", "detail", "texture")}
        evidence = EvidenceState({"colour": 3.0 * float(torch.rand(1, generator=gen)), "all": 1.0}, cap=2 * math.log(1e3))
        assert bench.rule_weights(bench.RULES["shipped"], diffs, evidence, settings) == pytest.approx(
            second_stage_weights(diffs, evidence, settings)), trial


def test_one_stage_and_led_shares_and_the_pairs_a_rule_wants_beyond_the_recording() -> None:
    arms = ("local", "colour")
    assert bench.second_shares(bench.RULES["led_half"], 10, arms, {"local": 1.0, "colour": 0.0}) == {"local": 8, "colour": 2}
    assert bench.second_shares(bench.RULES["shipped"], 10, arms, {}) == {"local": 5, "colour": 5}
    # 64 probes at budget 2.0: 64 pairs, 21 first (11 + 10), then all 43 to the local arm, whose pairs all win
    evaluation = {"local": [1] * 30, "colour": [0] * 30}
    _, short = bench.replay_run([evaluation], bench.RULES["shipped"], record_pairs=30)
    assert short == 54 - 30  # it wanted 11 + 43 local pairs of a recording of 30
    _, short = bench.replay_run([{"local": [1] * 20, "colour": [0] * 30}], bench.RULES["shipped"], record_pairs=30)
    assert short == 0  # the local plan had 20 pairs only: the monitor would have drawn no more
    # the colour plan (5 pairs, shorter than the recording) ran out in the first stage: as in the monitor,
    # the second stage goes to the arm with pairs left, 11 + 43 local pairs wanted of a recording of 30
    _, short = bench.replay_run([{"local": [0] * 30, "colour": [0] * 5}], bench.RULES["equal_fallback"], record_pairs=30)
    assert short == 54 - 30
    some_wins = {"local": [1, 0, 0, 0] * 8, "colour": [0] * 32}
    values, short = bench.replay_run([some_wins] * 2, bench.RULES["one_stage"], record_pairs=32)
    assert short == 0 and values[1] > values[0] > 1  # 32 pairs each, the local wins accumulate


def test_alerts_are_replayed_as_the_rule_raises_and_clears_them() -> None:
    assert bench.alert_epochs([0.5, 2e3, 50.0, 0.9, 2e3], 1e-3) == (1, True)
    assert bench.alert_epochs([0.5, 2e3, 0.9], 1e-3) == (1, False)
    assert bench.alert_epochs([999.0], 1e-3) == (None, False)


def test_only_recordings_of_one_pair_count_are_replayed(tmp_path) -> None:
    def write(name: str, **meta: object) -> str:
        run = {"task": "ruler", "base": "digits", "arch": "cnn", "seed": 1, "pairs": [{"local": "+0-"}],
               "accuracy_gap": [0.0]}
        (tmp_path / name).write_text(json.dumps({"runs": [run], **meta}))
        return str(tmp_path / name)

    runs, count = bench.read_recordings([write("a.json", record_pairs=48)])
    assert count == 48 and runs[0].evaluations == [{"local": [1, 0, -1]}] and runs[0].variant == "control"
    with pytest.raises(SystemExit, match="one recording"):
        bench.read_recordings([write("b.json")])
    with pytest.raises(SystemExit, match="one recording"):
        bench.read_recordings([write("c.json", record_pairs=48), write("d.json", record_pairs=24)])


@pytest.mark.slow
def test_a_recorded_run_replayed_under_the_shipped_rule_is_the_default_monitors_statistic(tmp_path) -> None:
    """The same fit twice (the monitor changes nothing in training), with the default monitor and
    recorded with 48 pairs an arm: the replay of the recording gives the default monitor's
    statistic at every evaluation, and its pairs are a prefix of the recording's."""
    from cam_monitor.demo.zoo import run_task

    fit = dict(cue="corner_patch", variant="shortcut", seed=0, epochs=3, limit_train_batches=10)
    shipped = run_task(root=str(tmp_path / "shipped"), **fit)
    recorded = run_task(root=str(tmp_path / "recorded"), discovery=bench_zoo.recording(48), **fit)
    assert [r["acc_matched"] for r in shipped.rows] == [r["acc_matched"] for r in recorded.rows]
    evaluations = [row["evidence_pairs"] for row in recorded.rows]
    assert max(len(p) for e in evaluations for p in e.values()) == 48
    values, short = bench.replay_run(evaluations, bench.RULES["shipped"], record_pairs=48)
    assert short == 0 and max(values) > 1.0  # the evidence moved: the replay is not of an empty run
    assert values == pytest.approx([r["cam/shortcut_evidence"] for r in shipped.rows], rel=1e-9)
    for staged, full in zip(shipped.rows, recorded.rows):
        for arm, pairs in staged["evidence_pairs"].items():
            assert pairs == full["evidence_pairs"][arm][:len(pairs)], arm


def test_tasks_of_other_bases_and_architectures_are_told_apart() -> None:
    assert bench.label("ruler", "digits", "cnn") == "ruler"
    assert bench.label("background_cast", "digits", "resnet18") == "background_cast (digits, resnet18)"
    assert bench.label("ruler", "shapes", "cnn") == "ruler (shapes, cnn)"


@pytest.mark.parametrize("tasks", [[], [{"task": "ruler", "runs": 3, "on_time": 2, "first_alert_epochs": [1, 2, None]}]])
def test_the_table_has_a_column_per_shortcut_task_and_none_for_controls_alone(tasks) -> None:
    controls = {"alerted": 0, "runs": 28, "highest": 1.1, "median_highest": 0.62, "above_10": 0}
    lines = bench.table({"shipped": {"shortcut_tasks": tasks, "controls": controls, "pairs_beyond_recording": 0}})
    assert {line.count("|") for line in lines} == {8 + len(tasks)}
    assert lines[2].split(" | ")[1:len(tasks) + 3] == [*(["2/3 [1, 2, None]"] if tasks else []), "2" if tasks else "0",
                                                       "0/28"]
