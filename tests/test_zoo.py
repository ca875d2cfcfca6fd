"""The shortcut zoo: its data, and reduced monitored fits with NO masks (controls must stay quiet)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from cam_monitor.demo.data import CUES, PATCH, make_decoy_digits
from cam_monitor.demo.zoo import mask_free_probes, run_task


@pytest.mark.parametrize("cue", CUES)
def test_each_cue_is_class_coded_in_the_shortcut_split_and_random_in_the_control(cue) -> None:
    data = make_decoy_digits(0, cue=cue)
    assert torch.equal(data.train_shortcut.decoy_class, data.train_shortcut.labels)
    agree = (data.train_control.decoy_class == data.train_control.labels).float().mean()
    assert 0.05 < agree < 0.2  # chance is 0.1
    masks = data.val.spurious_masks
    assert masks.flatten(1).any(1).all()
    assert (data.test_none.decoy_class == -1).all() and not data.test_none.spurious_masks.any()
    if cue == "interior_patch":  # off the border: inside the digit's box, never in the 4-pixel margin
        assert not masks[:, :4].any() and not masks[:, -4:].any() and not masks[:, :, :4].any()
        assert (masks.flatten(1).sum(1) == (2 * PATCH) ** 2).all()


def test_an_unknown_cue_is_refused() -> None:
    with pytest.raises(ValueError, match="cue must be one of"):
        make_decoy_digits(0, cue="watermark")


@pytest.mark.parametrize("cue", CUES)
def test_no_alert_on_any_control_of_the_zoo(cue, tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_task(cue, "control", 0, 3, str(tmp_path))
    assert run.alerts == [], run.alerts
    assert max(abs(r["accuracy_gap"]) for r in run.rows) < 0.1  # the ground truth agrees: no shortcut


def test_the_corner_shortcut_is_found_without_masks_and_its_region_named_and_exported(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_task("corner_patch", "shortcut", 0, 2, str(tmp_path))
    assert run.gap_epoch == 0 and run.first_alert_epoch == 0
    (alert,) = [a for a in run.alerts if a["epoch"] == 0]
    assert alert["rule"] == "shortcut_confirmed" and alert["metric"] == "cam/shortcut_flip_excess"
    truth = make_decoy_digits(0, cue="corner_patch").val
    probes = run.monitor.probes
    ids = {pid: i for i, pid in enumerate(probes.ids)}
    top = alert["regions"][0]
    assert top["flip_rate"] > top["control_rate"] and top["tests"] >= 1
    # every box the alert names covers its probe's decoy, which nobody marked
    picked = mask_free_probes("corner_patch", 0)
    assert torch.equal(picked.images, probes.images)
    for region in alert["regions"]:
        for pid, (y0, x0, y1, x1) in zip(region["probe_ids"], region["boxes"]):
            i = ids[pid]
            decoy = _truth_mask(truth, probes.images[i])
            assert decoy[y0:y1, x0:x1].any(), (pid, (y0, x0, y1, x1))
            assert (y1 - y0) * (x1 - x0) <= 4 * PATCH * PATCH * 4
    logged = [json.loads(line) for line in (tmp_path / "cam_monitor" / "alerts.jsonl").read_text().splitlines()]
    assert logged[0]["regions"] == alert["regions"]
    exported = run.monitor.inferred_probes()
    assert exported.spurious_masks is not None and exported.spurious_masks.flatten(1).any(1).sum() >= 1
    assert exported.images is probes.images or torch.equal(exported.images, probes.images)


def _truth_mask(split, image: torch.Tensor) -> torch.Tensor:
    """The decoy mask of the validation image equal to ``image``."""
    (i,) = (split.images.flatten(1) == image.flatten()).all(1).nonzero()[:, 0].tolist()[:1]
    return split.spurious_masks[i]
