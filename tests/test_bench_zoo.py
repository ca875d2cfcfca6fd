"""benchmarks/bench_zoo.py: merging result files split over processes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_zoo as bench  # noqa: E402

from cam_monitor.demo.zoo import run_task  # noqa: E402


def result_file(path: Path, seed: int, **setting: object) -> str:
    run = {"task": "corner_patch", "variant": "control", "seed": seed, "epochs": [], "alerts": [],
           "active_at_end": False}
    path.write_text(json.dumps({"arch": "cnn", "base": "digits", "epochs": 6, "runs": [run], **setting}))
    return str(path)


def test_files_of_one_setting_merge_and_older_files_read_as_digits(tmp_path) -> None:
    old = tmp_path / "old.json"
    result_file(old, 0)
    data = json.loads(old.read_text())
    del data["base"]  # written before the shapes base existed
    old.write_text(json.dumps(data))
    runs, results = bench.merge([str(old), result_file(tmp_path / "new.json", 1, global_test=False)])
    assert [r.seed for r in runs] == [0, 1] and len(results) == 2


def test_the_false_alarms_are_counted_over_the_control_runs_the_files_hold(tmp_path, capsys) -> None:
    """A file of shortcut runs only (controls stopped for time) shows 0 of 0 control runs, not 0 of its seeds."""
    path = tmp_path / "shortcuts.json"
    run = {"task": "background_texture", "variant": "shortcut", "seed": 0, "alerts": [], "active_at_end": False,
           "epochs": [{"epoch": 0, "accuracy_gap": 0.7}]}
    path.write_text(json.dumps({"arch": "cnn", "base": "shapes", "epochs": 1, "runs": [run, {**run, "seed": 1}]}))
    runs, _ = bench.merge([str(path)])
    (row,) = bench.summarise(runs)
    assert (row["seeds"], row["controls"], row["false_alarms"]) == (2, 0, 0)
    bench.print_table([row], None)
    assert "| 0/2 | 0/2 | 0/2 | 0/0 |" in capsys.readouterr().out


def test_the_false_alarm_rate_per_evaluation_pools_every_tasks_control_evaluations(tmp_path, capsys) -> None:
    """One alert in 1 of 3 evaluations of one task, none in 9 of another: 1/12, not the tasks' mean rate 1/6."""
    def control(task: str, seed: int, evaluations: int, alerts: int) -> dict:
        return {"task": task, "variant": "control", "seed": seed, "active_at_end": False,
                "alerts": [{"rule": "shortcut_confirmed", "epoch": 0}] * alerts,
                "epochs": [{"epoch": e, "accuracy_gap": 0.0} for e in range(evaluations)]}
    runs = [control("corner_patch", 0, 3, 1)] + [control("border_frame", s, 3, 0) for s in range(3)]
    path = tmp_path / "controls.json"
    path.write_text(json.dumps({"arch": "cnn", "base": "digits", "epochs": 3, "runs": runs}))
    rows = bench.summarise(bench.merge([str(path)])[0])
    assert bench.pooled_false_alarms(rows) == (1, 12)
    bench.print_table(rows, None)
    assert "false alarms per control evaluation: 1/12 = 0.0833" in capsys.readouterr().out


@pytest.mark.parametrize("key, value", [("base", "shapes"), ("arch", "resnet18"), ("epochs", 4), ("global_test", True),
                                        ("masks", True), ("object_masks", True), ("degradation", "jpeg90"),
                                        ("recurring_tolerant", False), ("recurring_turned", True)])
def test_files_of_different_settings_are_refused_rather_than_labelled_as_the_first(tmp_path, key, value) -> None:
    a, b = result_file(tmp_path / "a.json", 0), result_file(tmp_path / "b.json", 1, **{key: value})
    with pytest.raises(SystemExit, match=f"differ in {key}"):
        bench.merge([a, b])


def test_a_file_stopped_before_its_cost_was_measured_merges_with_the_cost_of_another(tmp_path, capsys,
                                                                                       monkeypatch) -> None:
    partial = result_file(tmp_path / "partial.json", 0, cost=None, machine="test")
    cost = {"pasted_images": 128, "probes": 64, "forward_s": 0.01, "discovery_s": 0.04, "ratio": 4.0}
    whole = result_file(tmp_path / "whole.json", 1, cost=cost, machine="test")
    monkeypatch.setattr(sys, "argv", ["bench_zoo.py", "--merge", partial, whole, "--out", str(tmp_path / "all.json")])
    bench.main()
    assert json.loads((tmp_path / "all.json").read_text())["cost"] == cost
    monkeypatch.setattr(sys, "argv", ["bench_zoo.py", "--merge", partial, "--out", str(tmp_path / "one.json")])
    bench.main()
    assert json.loads((tmp_path / "one.json").read_text())["cost"] is None
    assert "not measured" in capsys.readouterr().out


def test_a_campaign_keeps_each_fit_as_it_goes_and_records_every_arms_pairs(tmp_path, monkeypatch) -> None:
    out = tmp_path / "zoo.json"
    monkeypatch.setattr(sys, "argv", ["bench_zoo.py", "--seeds", "1", "--epochs", "1", "--cues", "corner_patch",
                                      "--record-pairs", "8", "--degradation", "noise0.02", "--exact-keys", "--unturned",
                                      "--out", str(out)])
    fitted = []

    def spied(*args: object, **kwargs: object) -> object:
        fitted.append((kwargs["degradation"], kwargs["discovery"].recurring_tolerant, kwargs["discovery"].recurring_turned))
        return run_task(*args, **kwargs)

    monkeypatch.setattr(bench, "run_task", spied)

    def stopped(*args: object) -> dict:
        raise KeyboardInterrupt  # the campaign stopped after its fits, before the cost

    monkeypatch.setattr(bench, "discovery_cost", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["runs"]] == ["shortcut", "control"] and result["cost"] is None
    assert result["record_pairs"] == 8
    assert result["degradation"] == "noise0.02" and result["recurring_tolerant"] is False
    assert result["recurring_turned"] is False
    assert fitted == [("noise0.02", False, False)] * 2  # both fits saw noisy images, exact keys alone, no turns
    for run in result["runs"]:
        (evaluation,) = [e["evidence_pairs"] for e in run["epochs"]]
        assert evaluation and all(len(p) <= 8 for p in evaluation.values())
        assert max(len(p) for p in evaluation.values()) == 8  # one stage, 8 pairs an arm (fewer where a plan ran out)


@pytest.mark.parametrize("how", ["blur", "noise0", "jpeg101"])
def test_a_degradation_it_cannot_read_stops_the_campaign_before_any_fit(how, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_zoo.py", "--degradation", how])
    monkeypatch.setattr(bench, "run_task", lambda *a, **k: pytest.fail("a fit ran"))
    with pytest.raises(SystemExit):
        bench.main()
    assert "degradation must be 'clean', 'noiseS'" in capsys.readouterr().err
