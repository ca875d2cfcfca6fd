"""benchmarks/bench_recurring_margin.py: the recurring arm's recorded graded pairs replayed under
other margins and dead zones."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_recurring_margin as bench  # noqa: E402

from cam_monitor.discovery import DiscoverySettings  # noqa: E402


def write_recordings(tmp_path: Path) -> list[str]:
    """A campaign file with a control whose test carries a sliver of its object (every pair a gain
    of half a point: graded 0.05) and one whose arm never ran, and a zoo file with a shortcut whose
    cue carries its class (every pair at the clip, kept as a ``+`` string as the campaign keeps it)."""
    sliver = {"task": "ruler", "base": "digits", "seed": 7, "pairs": [{"recurring": [0.05] * 40}] * 6}
    idle = {"task": "border_frame", "base": "digits", "seed": 7, "pairs": [{"local": "+0"}] * 6}
    cue = {"task": "text_tag", "variant": "shortcut", "seed": 1,
           "epochs": [{"evidence_pairs": {"recurring": []}}] + [{"evidence_pairs": {"recurring": "+" * 20}}] * 5}
    campaign, zoo = tmp_path / "fa.json", tmp_path / "zoo.json"
    campaign.write_text(json.dumps({"runs": [sliver, idle]}))
    zoo.write_text(json.dumps({"base": "shapes", "runs": [cue]}))
    return [str(campaign), str(zoo)]


def test_a_sliver_of_the_object_grows_the_detector_without_a_margin_and_not_with_the_common_one(tmp_path) -> None:
    streams = bench.read_streams(write_recordings(tmp_path))
    assert [(s.name, s.variant) for s in streams] == [("digits ruler 7", "control"), ("shapes text_tag 1", "shortcut")]
    assert streams[1].evaluations[1] == [1.0] * 20  # a "+" string reads as pairs at the clip
    settings = DiscoverySettings()
    drift = bench.replay(streams[0], 0.0, 0.0, settings)
    assert drift[-1] == pytest.approx(6 * 40 * math.log1p(0.7 * 0.05)) and drift[-1] > math.log(1 / settings.alpha)
    assert bench.replay(streams[0], 0.05, 0.0, settings)[-1] == pytest.approx(0.0)  # every pair exactly at the margin
    assert bench.replay(streams[0], 0.0, 0.01, settings)[-1] == 0.0  # gains below the dead zone are ties
    plain, margined = (bench.summarise(streams, m, 0.0, settings) for m in (0.0, 0.05))
    assert plain["highest_controls"][0] == {"run": "digits ruler 7", "log_detector": pytest.approx(drift[-1], abs=1e-3)}
    assert plain["shortcut_passed"] == margined["shortcut_passed"] == {"shapes text_tag 1": 1}


def test_a_dead_zone_moves_graded_gains_down_and_keeps_their_sign() -> None:
    d = bench.rescored([1.0, 0.5, -0.5, 0.05, 0.0], scale=0.1, dead_zone=0.02)
    assert d.tolist() == pytest.approx([0.8, 0.3, -0.3, 0.0, 0.0])
