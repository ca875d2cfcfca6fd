"""Report: the panel of one evaluation, built from the probes, the evaluation and the history."""
from __future__ import annotations

import pytest
import torch

import cam_monitor as cm
from cam_monitor.evaluation import EvalSettings, evaluate
from cam_monitor.history import History
from cam_monitor.report import ReportSettings, build_panel


def test_panel_holds_grid_tiles_trends_and_filmstrip(small_cnn, images) -> None:
    probes = cm.ProbeSet(images, torch.arange(6) % 5)
    history = History(filmstrip_probes=2)
    for step in (1, 2):
        ev = evaluate(small_cnn, probes, EvalSettings("features"), global_step=step, previous=history.previous_maps,
                      reference=history.reference)
        history.record(ev, "fit", {})
    panel = build_panel(probes, ev, history, ReportSettings(max_grid_probes=4, tile_size=32))
    assert panel.tiles.shape[0] == 4 and list(panel.ids) == probes.ids[:4]
    assert panel.grid.shape[0] == 3 and 0 <= float(panel.grid.min()) and float(panel.grid.max()) <= 1
    assert set(panel.extra_images()) == {"trends", "filmstrip"}
    # two filmstrip probes stacked, two evaluations side by side
    assert panel.filmstrip.shape[1] > panel.filmstrip.shape[2] / 2
    # the numbers behind the trends, per tiled probe, for dashboards that plot them themselves
    assert set(panel.curves) == {"spurious_energy", "drift_ref"}  # per probe, enrichment is the energy curve rescaled
    assert panel.curves["spurious_energy"][probes.ids[0]] == pytest.approx(float(ev.per_probe["spurious_energy"][0]))
    assert len(panel.curves["drift_ref"]) == 4
    without = build_panel(probes, ev, history, ReportSettings(max_grid_probes=4, tile_size=32), trends=False)
    assert without.trends is None and set(without.extra_images()) == {"filmstrip"} and without.curves == panel.curves


def test_report_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_grid_probes"):
        ReportSettings(max_grid_probes=0)
    with pytest.raises(ValueError, match="tile_size"):
        ReportSettings(tile_size=4)
