"""benchmarks/bench_zoo.py: merging result files split over processes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_zoo as bench  # noqa: E402


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


@pytest.mark.parametrize("key, value", [("base", "shapes"), ("arch", "resnet18"), ("epochs", 4), ("global_test", True)])
def test_files_of_different_settings_are_refused_rather_than_labelled_as_the_first(tmp_path, key, value) -> None:
    a, b = result_file(tmp_path / "a.json", 0), result_file(tmp_path / "b.json", 1, **{key: value})
    with pytest.raises(SystemExit, match=f"differ in {key}"):
        bench.merge([a, b])
