"""benchmarks/bench_finder_cost.py: the recurrence finder's cost by probe size and content."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_finder_cost as bench  # noqa: E402


def test_the_probes_carry_the_mark_in_every_other_one_and_are_deterministic() -> None:
    for kind in bench.KINDS:
        images = bench.probes(kind, 48, 6)
        assert images.shape == (6, 3, 48, 48) and 0 <= float(images.min()) and float(images.max()) == 1.0
        assert torch.equal(images, bench.probes(kind, 48, 6))
        white = (images == 1.0).all(1).flatten(1).sum(1)
        assert (white[0::2] > 0).all() and (white[1::2] == 0).all()
    with pytest.raises(ValueError, match="kind must be one of"):
        bench.probes("photo", 48, 6)


def test_the_benchmark_writes_every_case_with_its_finds_and_times(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cost.json"
    bench.main(["--sizes", "64", "--probes", "8", "--repeats", "1", "--threads", "1", "--no-memory", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["size"], r["kind"]) for r in rows] == [(64, kind) for kind in bench.KINDS]
    for r in rows:
        assert r["found"] == r["marked"] == 4 and r["found_unmarked"] == 0
        assert r["find_s"] > 0 and r["unturned_s"] > 0 and r["exact_s"] > 0 and r["forward_s"] > 0
        assert r["peak_memory_mb"] is None
    assert "| 64 | noise | 4 of 4 | 0 |" in capsys.readouterr().out


@pytest.mark.slow
def test_the_peak_memory_is_measured_in_a_fresh_process(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    bench.main(["--sizes", "64", "--kinds", "noise", "--probes", "8", "--repeats", "1", "--threads", "1",
                "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["peak_memory_mb"] is not None and row["peak_memory_mb"] > 0


def test_an_unknown_kind_is_refused_with_the_kinds() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--kinds", "photo", "--no-memory"])
