"""History: rows under the logged names, per-probe series, filmstrip ring buffer, reference, state."""
from __future__ import annotations

import pytest
import torch

from cam_monitor.evaluation import Evaluation
from cam_monitor.history import History


def ev(step: int, n: int = 3) -> Evaluation:
    g = torch.Generator().manual_seed(step)
    per = {"spurious_energy": torch.rand(n, generator=g), "drift_ref": torch.rand(n, generator=g)}
    return Evaluation(step // 10, step, torch.rand(n, 2, 2, generator=g), torch.zeros(n, dtype=torch.long),
                      torch.ones(n), per, {"spurious_energy": float(per["spurious_energy"].mean()), "quality": 0.5})


def test_rows_use_the_prefix_and_the_first_evaluation_becomes_the_reference() -> None:
    h = History("cam/l3", filmstrip_probes=2)
    row = h.record(ev(10), "fit", {"alerts": 1.0})
    assert row == {"epoch": 1, "global_step": 10, "stage": "fit", "cam/l3/spurious_energy": pytest.approx(row["cam/l3/spurious_energy"]),
                   "cam/l3/quality": 0.5, "cam/l3/alerts": 1.0}
    h.record(ev(20), "fit", {})
    assert h.reference.global_step == 10 and torch.equal(h.previous_maps, ev(20).maps)
    assert h.per_probe["spurious_energy"].shape == (2, 3) and h.steps == [10, 20]
    assert h.latest_metrics() == {"cam/l3/spurious_energy": h.rows[-1]["cam/l3/spurious_energy"], "cam/l3/quality": 0.5}


def test_filmstrip_keeps_the_last_frames_of_the_first_probes() -> None:
    h = History(filmstrip_probes=2, frames=3)
    for step in range(5):
        h.record(ev(step), "fit", {})
    assert h.filmstrip_maps.shape == (3, 2, 2, 2) and h.filmstrip_steps == [2, 3, 4]
    assert torch.equal(h.filmstrip_maps[-1], ev(4).maps[:2])


def test_start_from_and_pin_reference() -> None:
    h = History()
    h.start_from(ev(0))
    h.record(ev(10), "fit", {})
    assert h.reference.global_step == 0 and not [r for r in h.rows if r["global_step"] == 0]
    h.pin_reference()
    assert h.reference.global_step == 10
    with pytest.raises(RuntimeError, match="at least one evaluation"):
        History().pin_reference()


def test_last_epoch_by_stage() -> None:
    h = History()
    h.record(ev(10), "fit", {})
    h.record(ev(30), "validate", {})
    assert h.last_epoch("fit") == 1 and h.last_epoch("validate") == 3 and h.last_epoch("test") is None


def test_state_roundtrip_through_a_weights_only_file(tmp_path) -> None:
    h = History("cam/x")
    for step in (10, 20):
        h.record(ev(step), "fit", {"alerts": 0.0})
    torch.save(h.state_dict(), tmp_path / "h.pt")
    other = History("cam/x")
    other.load_state_dict(torch.load(tmp_path / "h.pt", weights_only=True))
    assert other.rows == h.rows and other.steps == h.steps
    assert torch.equal(other.reference.maps, h.reference.maps) and other.reference.aggregates == h.reference.aggregates
    with pytest.raises(ValueError, match="give the monitor the name it had"):
        History("cam").load_state_dict(h.state_dict())
