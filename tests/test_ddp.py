"""DDP on 2 CPU processes: sharded probes give the single-process metrics; stop never hangs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cam_monitor.demo.model import DigitClassifier
from cam_monitor.discovery import DiscoverySettings
from cam_monitor.evaluation import EvalSettings, Reference, evaluate
from cam_monitor.evidence import EvidenceState
from cam_monitor.probes import ProbeSet
from lightning_helpers import LAYER

SCRIPT = Path(__file__).with_name("ddp_script.py")


def run_ddp(out: Path, action: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), action], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_metrics_equal_single_process_and_every_rank_agrees(tmp_path) -> None:
    ranks = run_ddp(tmp_path, "log")
    assert ranks[0]["world"] == 2 and ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) == 3
    assert ranks[0]["alerts"] == ranks[1]["alerts"] and ranks[0]["alerts"]
    # only rank 0 wrote files
    assert len((tmp_path / "cam_monitor" / "alerts.jsonl").read_text().splitlines()) == len(ranks[0]["alerts"])

    saved = torch.load(tmp_path / "final.pt", weights_only=True)
    model = DigitClassifier()
    model.load_state_dict(saved["model"])
    state = saved["monitor"]
    probes = ProbeSet.from_state(state["probes"])
    assert len(probes) == 15  # not divisible by the world size
    hist = state["history"]
    r = hist["reference"]
    ref = Reference(r["epoch"], r["global_step"], r["maps"], r["per_probe"], r["aggregates"])
    prev_hist = hist["rows"][-2]
    settings = EvalSettings(LAYER, batch_size=4, discovery=DiscoverySettings(box_cells=1))
    before = saved["evidence_before_last"]  # the arms' shares of the tests follow the evidence so far
    single = evaluate(model, probes, settings, epoch=2, global_step=ranks[0]["global_step"], previous=None,
                      reference=ref, evidence=None if before is None else EvidenceState.from_state(before))
    last = hist["rows"][-1]
    for key in ("spurious_energy", "spurious_enrichment", "object_energy", "pointing_spurious", "drift_ref",
                "spurious_energy_rise", "average_drop", "quality"):
        assert single.aggregates[key] == pytest.approx(last[f"cam/{key}"], rel=1e-5, abs=1e-6), key
    # the paste tests ran sharded over the 2 ranks (7 or 8 images each) and agree with one process
    assert single.aggregates["shortcut_suspects"] == last["cam/shortcut_suspects"]
    for key in ("shortcut_flip_rate", "shortcut_flip_control", "colour_flip_rate", "colour_flip_control",
                "border_flip_rate", "border_flip_control", "detail_flip_rate", "detail_flip_control"):
        assert single.aggregates[key] == pytest.approx(last[f"cam/{key}"], nan_ok=True), key
    assert len(single.discovery.tests) > 0 and not math.isnan(last["cam/shortcut_flip_rate"])
    assert torch.allclose(single.maps, hist["previous_maps"], atol=1e-6)
    assert prev_hist["epoch"] == 1


def test_ddp_stop_action_stops_every_rank_at_the_same_step(tmp_path) -> None:
    ranks = run_ddp(tmp_path, "stop")
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 12  # stopped after the third epoch of four
    assert ranks[0]["epoch"] == ranks[1]["epoch"] == 3
