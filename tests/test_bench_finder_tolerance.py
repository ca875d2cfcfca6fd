"""benchmarks/bench_finder_tolerance.py: the finder's finds on the zoo's probes under noise and
JPEG compression, the exact keys alone and without turned partners beside the default."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_finder_tolerance as bench  # noqa: E402


def test_finds_are_scored_on_the_cue_off_it_and_on_objects() -> None:
    cue = torch.zeros(3, 32, 32, dtype=torch.bool)
    cue[0, 2:8, 2:8] = cue[1, 20:26, 20:26] = True
    objects = torch.zeros_like(cue)
    objects[:, 10:18, 10:18] = True
    found = torch.zeros_like(cue)
    found[0, 2:8, 2:6] = True            # two thirds of its cue
    found[1, 20:23, 20:26] = True        # half of its cue ...
    found[1, 12:14, 12:14] = True        # ... and a piece of the object, far from the cue
    found[2, 0:2, 28:32] = True          # no cue in this probe: background
    assert bench.scored(found, cue, objects) == {"cue_probes": 2, "found": 2, "off_cue": 2, "off_on_object": 1}
    assert bench.scored(found, cue, None)["off_on_object"] == 0


def test_the_benchmark_puts_the_finders_side_by_side(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tolerance.json"
    bench.main(["--bases", "digits", "--cues", "text_tag", "--seeds", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {(r["degradation"], r["finder"]): r for r in result["summary"]}
    assert set(rows) == {(how, finder) for how in bench.DEGRADATIONS for finder in bench.FINDERS}
    assert rows["clean", "tolerant"]["found"] == rows["clean", "exact"]["found"] > 50
    assert rows["clean", "tolerant"]["clean_changed"] == 0
    assert rows["noise0.02", "exact"]["found"] < 10 < rows["noise0.02", "tolerant"]["found"]
    assert all(rows[how, "turned"]["found"] >= rows[how, "tolerant"]["found"] for how in bench.DEGRADATIONS)
    assert "| digits | text_tag | noise0.02 | 64 |" in capsys.readouterr().out
