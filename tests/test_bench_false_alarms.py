"""benchmarks/bench_false_alarms.py: the exact bound it states and the table it keeps."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_false_alarms as bench  # noqa: E402

from cam_monitor.demo.zoo import run_task  # noqa: E402


def test_the_upper_bound_is_the_exact_one_sided_clopper_pearson_limit() -> None:
    assert bench.upper_bound(0, 500) == pytest.approx(1 - 0.05 ** (1 / 500))  # the rule of three: about 3 / 500
    assert bench.upper_bound(1, 10) == pytest.approx(0.3942, abs=1e-4)  # the binomial tail P(X <= 1) = 0.05 there
    assert bench.upper_bound(0, 0) == 1.0 and bench.upper_bound(3, 3) == 1.0
    assert bench.upper_bound(2, 100) > bench.upper_bound(1, 100) > bench.upper_bound(0, 100)


def _run(task: str, alerts: list[str], evidence: list[float]) -> dict:
    return {"task": task, "base": "digits", "arch": "cnn", "seed": 0, "evaluations": len(evidence),
            "alerts": [{"epoch": 1, "rule": r} for r in alerts], "evidence": evidence, "accuracy_gap": [0.0] * 6}


def test_the_summary_counts_alerts_per_run_and_sets_the_bound_beside_the_stated_rate() -> None:
    quiet = [_run("corner_patch", [], [0.5] * 6)] * 600
    drift = _run("ruler", ["drift_off_object"], [0.7] * 6)  # a drift rule states no rate: not counted against alpha
    summary = bench.summarise(quiet + [drift, _run("text_tag", ["shortcut_confirmed"], [2e3] * 6)], alpha=1e-3)
    total = summary["total"]
    assert (total["runs"], total["evaluations"], total["runs_with_any_alert"]) == (602, 3612, 2)
    assert total["runs_with_shortcut_confirmed"] == 1 and total["highest_evidence"] == 2e3
    assert total["stated_per_run"] == pytest.approx(6e-3)  # six evaluations at 1e-3 each
    assert total["upper_bound_per_run"] == pytest.approx(bench.upper_bound(1, 602))
    assert total["upper_bound_any_alert_per_run"] == pytest.approx(bench.upper_bound(2, 602))
    assert not total["bound_at_or_below_stated"]  # one alarm in 602 runs does not show 6e-3 at 95 %
    assert bench.summarise(quiet + [drift], alpha=1e-3)["total"]["bound_at_or_below_stated"]  # none in 601 does
    assert [(g["task"], g["runs"]) for g in summary["groups"]] == [("corner_patch", 600), ("ruler", 1), ("text_tag", 1)]


def test_a_pair_string_spells_each_paired_difference() -> None:
    assert bench.pair_string([1, 0, -1, 1]) == "+0-+" and bench.pair_string([]) == ""
    assert bench.pair_string([1.0, 0.0, -1.0]) == "+0-"  # a graded stream at the clip reads as flips
    assert bench.pair_string([1.0, 0.123456, -0.5]) == [1.0, 0.1235, -0.5]  # graded values in between are kept
    assert bench.pair_diffs("+0-+") == [1, 0, -1, 1] and bench.pair_diffs("") == []


def test_a_campaign_writes_each_control_run_and_merges(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "fa.json"
    monkeypatch.setattr(sys, "argv", ["bench_false_alarms.py", "--seeds", "1", "--epochs", "1",
                                      "--cues", "corner_patch", "--degradation", "jpeg90", "--out", str(out)])
    fitted = []

    def spied(*args: object, **kwargs: object) -> object:
        fitted.append(kwargs["degradation"])
        return run_task(*args, **kwargs)

    monkeypatch.setattr(bench, "run_task", spied)
    bench.main()
    result = json.loads(out.read_text())
    assert result["degradation"] == "jpeg90" and fitted == ["jpeg90"]
    (run,) = result["runs"]
    assert (run["task"], run["base"], run["arch"], run["evaluations"]) == ("corner_patch", "digits", "cnn", 1)
    assert result["total"]["runs"] == 1 and math.isfinite(run["evidence"][0])
    assert {"shortcut_flip_excess", "detail_flip_excess"} <= set(run["excess"][0])  # each arm's, for attribution
    pairs = run["pairs"][0]  # each stream's pairs in their order: a replay under other margins needs them
    assert {"local", "detail"} <= set(pairs) and all(set(s) <= set("+-0") for s in pairs.values())
    assert sum(len(s) for a, s in pairs.items() if "/" not in a) == 64  # budget 2 x 64 probes: 128 images, 64 pairs
    merged = tmp_path / "merged.json"
    monkeypatch.setattr(sys, "argv", ["bench_false_alarms.py", "--merge", str(out), str(out), "--out", str(merged)])
    bench.main()
    assert json.loads(merged.read_text())["total"]["runs"] == 2
    assert json.loads(merged.read_text())["degradation"] == "jpeg90"
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps({**result, "degradation": "clean"}))
    monkeypatch.setattr(sys, "argv", ["bench_false_alarms.py", "--merge", str(out), str(clean), "--out", str(merged)])
    with pytest.raises(SystemExit, match="differ in degradation"):
        bench.main()
    assert "control runs" in capsys.readouterr().out


def test_a_recording_and_a_default_campaign_are_not_merged(tmp_path, monkeypatch) -> None:
    files = []
    for name, recorded in (("a.json", None), ("b.json", 48)):
        (tmp_path / name).write_text(json.dumps({"machine": "test", "epochs": 6, "record_pairs": recorded, "runs": []}))
        files.append(str(tmp_path / name))
    monkeypatch.setattr(sys, "argv", ["bench_false_alarms.py", "--merge", *files, "--out", str(tmp_path / "m.json")])
    with pytest.raises(SystemExit, match="differ in record_pairs"):
        bench.main()


@pytest.mark.parametrize("key", ["masks", "object_masks"])
def test_a_campaign_with_masks_and_one_without_are_not_merged(tmp_path, monkeypatch, key) -> None:
    files = []
    for name, masks in (("a.json", False), ("b.json", True)):
        (tmp_path / name).write_text(json.dumps({"machine": "test", "epochs": 6, "record_pairs": None, key: masks,
                                                 "runs": []}))
        files.append(str(tmp_path / name))
    monkeypatch.setattr(sys, "argv", ["bench_false_alarms.py", "--merge", *files, "--out", str(tmp_path / "m.json")])
    with pytest.raises(SystemExit, match=f"differ in {key}"):
        bench.main()
    monkeypatch.setattr(sys, "argv", ["bench_false_alarms.py", "--merge", files[1], files[1], "--out", str(tmp_path / "m.json")])
    bench.main()
    assert json.loads((tmp_path / "m.json").read_text())[key] is True
