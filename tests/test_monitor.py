"""``Monitor``, the Lightning-free core: a whole evaluation in a plain loop, its outputs, its
state, its alert action, and the callback as its adapter (grouped settings, deprecated flat ones)."""
from __future__ import annotations

import ast
import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cam_monitor as cm
from cam_monitor.demo.data import make_decoy_digits
from cam_monitor.demo.model import SmallCNN

PACKAGE = Path(cm.__file__).parent
#: The modules that may import Lightning: the callback layer.
LIGHTNING_LAYER = {"callback.py", "trainer_access.py", "checkpoint.py", "cli.py", "compat.py"}


def plain_monitor(**kwargs) -> cm.Monitor:
    kwargs.setdefault("probe_settings", cm.ProbeSettings(num_probes=20))
    return cm.Monitor("features", **kwargs)


def train_one_epoch(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for idx in torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:512].split(64):
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_only_the_callback_layer_imports_lightning() -> None:
    """The monitor, its settings, outputs, probes and sinks run without Lightning."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if str(rel) in LIGHTNING_LAYER or rel.parts[0] == "demo":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{rel}: {n}" for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning",
                                                                               "lightning_fabric")]
    assert offenders == []


def test_a_whole_evaluation_runs_in_a_plain_loop_with_pictures_alerts_and_state(tmp_path) -> None:
    """Train on the shortcut variant by hand: the monitor picks its probes from a loader, checks
    them, evaluates each epoch, writes pictures and alerts.jsonl, fires the spurious alert, and its
    state round-trips; the training's RNG is untouched by the pick."""
    torch.manual_seed(0)
    data = make_decoy_digits(0)
    loader = torch.utils.data.DataLoader(data.val, batch_size=64)
    model = SmallCNN()
    mon = plain_monitor(alerting=cm.AlertSettings(action="log"), pictures=cm.PictureSettings(tile_size=32))
    mon.open(tmp_path / "cam")
    before = torch.get_rng_state()
    assert mon.prepare(model, loader=loader, which="validation loader") and len(mon.probes) == 20
    assert torch.equal(torch.get_rng_state(), before)
    outcomes = []
    for epoch in range(2):
        train_one_epoch(model, data.train_shortcut.images, data.train_shortcut.labels, epoch)
        outcomes.append(mon.evaluate(model, epoch=epoch, step=epoch + 1))
    mon.close()
    assert [o.evaluation.epoch for o in outcomes] == [0, 1] and [h["epoch"] for h in mon.history] == [0, 1]
    assert "spurious_enrichment" in {a["rule"] for a in mon.alerts}
    assert [a["rule"] for a in outcomes[0].fired] == [a["rule"] for a in mon.alerts[:len(outcomes[0].fired)]]
    lines = [json.loads(line) for line in (tmp_path / "cam" / "alerts.jsonl").read_text().splitlines()]
    assert [line["rule"] for line in lines if line["event"] == "fired"] == [a["rule"] for a in mon.alerts]
    assert sorted(p.name for p in (tmp_path / "cam").glob("probe_grid_*.png")) == [
        "probe_grid_e000_s0000001.png", "probe_grid_e001_s0000002.png"]
    fresh = plain_monitor()
    fresh.load_state_dict(torch.load(_saved(mon, tmp_path), weights_only=True))
    # str: NaN (a rate of no tests: the model was at chance, so discovery waited) equals itself there
    assert str(fresh.history) == str(mon.history) and fresh.alerts == mon.alerts and fresh.probes.same_as(mon.probes)


def _saved(mon: cm.Monitor, tmp_path: Path) -> Path:
    path = tmp_path / "state.pt"
    torch.save(mon.state_dict(), path)
    return path


def test_without_a_loader_a_pick_from_data_waits_and_evaluate_does_nothing() -> None:
    model = SmallCNN()
    mon = plain_monitor()
    assert mon.prepare(model) is False and mon.probes is None
    assert mon.evaluate(model, epoch=0, step=0) is None and mon.history == []


def test_the_stop_action_is_reported_to_the_loop_and_raise_raises() -> None:
    data = make_decoy_digits(0)
    probes = cm.ProbeSet.from_dataset(data.val, per_class=2, seed=0)
    model = SmallCNN()
    for seed in (0, 1):  # one pass leaves it at chance on the probes, when no rule judges its maps
        train_one_epoch(model, data.train_shortcut.images, data.train_shortcut.labels, seed)
    stop = plain_monitor(probes=probes, alerting=cm.AlertSettings(action="stop", spurious_enrichment=1.5))
    stop.prepare(model)
    outcome = stop.evaluate(model, epoch=0, step=1)
    assert outcome.fired and outcome.stop
    loud = plain_monitor(probes=probes, alerting=cm.AlertSettings(action="raise", spurious_enrichment=1.5))
    loud.prepare(model)
    with pytest.raises(cm.CAMAlertError, match="spurious_enrichment"):
        loud.evaluate(model, epoch=0, step=1)
    assert loud.history  # the evaluation was recorded before the action raised


def test_the_rules_wait_for_a_model_that_beats_chance_on_the_probes() -> None:
    """One pass over 512 decoy images puts the maps on the marked corner before the model beats
    chance on the probes: no alert (cam/skill_p says why); skill_level=1.0 judges it at once."""
    data = make_decoy_digits(0)
    probes = cm.ProbeSet.from_dataset(data.val, per_class=2, seed=0)
    model = SmallCNN()
    train_one_epoch(model, data.train_shortcut.images, data.train_shortcut.labels, 0)
    strict = cm.AlertSettings(action="log", spurious_enrichment=1.5)
    waits = plain_monitor(probes=probes, alerting=strict, discovery=cm.DiscoverySettings(enabled=False))
    waits.prepare(model)
    ev = waits.evaluate(model, epoch=0, step=1).evaluation
    assert ev.aggregates["skill_p"] > 0.01 and ev.aggregates["spurious_enrichment"] > 1.5
    assert waits.alerts == [] and waits.history[-1]["cam/skill_p"] == pytest.approx(ev.aggregates["skill_p"])
    eager = plain_monitor(probes=probes, alerting=strict, discovery=cm.DiscoverySettings(enabled=False, skill_level=1.0))
    eager.prepare(model)
    assert [a["rule"] for a in eager.evaluate(model, epoch=0, step=1).fired] == ["spurious_enrichment"]


def test_the_drift_reference_is_the_first_evaluation_even_when_its_model_is_at_chance() -> None:
    """The rules wait for skill, the reference does not: the reference rules need maps from before
    the shortcut is learned, and a shortcut model first beats chance on the probes by its cue
    (taking the first skilled evaluation instead lost a zoo detection: the reference, "Alerts")."""
    data = make_decoy_digits(0)
    probes = cm.ProbeSet.from_dataset(data.val, per_class=2, seed=0)
    model = SmallCNN()
    mon = plain_monitor(probes=probes, alerting=cm.AlertSettings(action="log"),
                        discovery=cm.DiscoverySettings(enabled=False))
    mon.prepare(model)
    for step in (1, 2):
        train_one_epoch(model, data.train_shortcut.images, data.train_shortcut.labels, step)
        mon.evaluate(model, epoch=step, step=step)
    skills = [row["cam/skill_p"] for row in mon.history]
    assert skills[0] > 0.01 and skills[1] <= 0.01  # one pass leaves it at chance, two do not
    assert mon.reference.global_step == 1 and mon.history[1]["cam/drift_ref"] > 0


def test_a_failing_evaluation_is_a_fault_reported_once(monkeypatch) -> None:
    data = make_decoy_digits(0)
    model = SmallCNN()
    mon = plain_monitor(probes=cm.ProbeSet.from_dataset(data.val, per_class=1, seed=0))
    mon.prepare(model)

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr("cam_monitor.monitor.evaluate", broken)
    with pytest.warns(UserWarning, match=r"evaluate failed \(RuntimeError: boom\)"):
        assert mon.evaluate(model, epoch=0, step=0) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mon.evaluate(model, epoch=1, step=1) is None  # once per kind
    assert mon.faults == {"evaluate:RuntimeError": 2}
    raising = plain_monitor(probes=mon.probes, on_error="raise")
    raising.prepare(model)
    with pytest.raises(RuntimeError, match="boom"):
        raising.evaluate(model)


def test_cammonitor_takes_grouped_keyword_only_settings_at_most_15_parameters() -> None:
    params = inspect.signature(cm.CAMMonitor.__init__).parameters
    assert len(params) - 1 <= 15
    assert [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD] == ["self", "target_layer", "probes"]
    mon = cm.CAMMonitor(alerting=cm.AlertSettings(spurious_enrichment=3.0, patience=2),
                        cams=cm.CAMSettings(methods=["gradcam", "layercam"]), probe_settings=cm.ProbeSettings(seed=3))
    (rule,) = [r for r in mon.rules if r.name == "spurious_enrichment"]
    assert rule.threshold == 3.0 and mon.monitor.book.patience == 2
    assert mon.settings.methods == ("gradcam", "layercam") and mon.settings.discovery.seed == 3


@pytest.mark.parametrize("flat, group, field, value", [
    ({"num_probes": 12}, "probe_settings", "num_probes", 12),
    ({"probe_seed": 4}, "probe_settings", "seed", 4),
    ({"spurious_enrichment": 3.0}, "alerting", "spurious_enrichment", 3.0),
    ({"alert_action": "stop"}, "alerting", "action", "stop"),
    ({"images_every_n_evals": 2}, "pictures", "every_n_evals", 2),
    ({"layout": "nhwc"}, "cams", "layout", "nhwc"),
    ({"shortcut_flip_excess": 0.2}, "discovery", "min_effect", 0.2),
])
def test_the_flat_arguments_of_earlier_releases_still_work_and_name_their_new_spelling(flat, group, field, value) -> None:
    (name,) = flat
    with pytest.warns(DeprecationWarning, match=rf"CAMMonitor\({name}=\.\.\.\) is deprecated.*{group}=\w+\({field}=") as seen:
        mon = cm.CAMMonitor(**flat)
    assert seen[0].filename == __file__  # attributed to the caller's line
    assert getattr(mon._given[group], field) == value
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_probe'"):
        cm.CAMMonitor(num_probe=3)


def test_a_settings_group_refuses_a_bad_value_where_it_is_written() -> None:
    with pytest.raises(ValueError, match=r"AlertSettings: drift_threshold=3.0 \(threshold of alert rule drift_off_object\)"):
        cm.AlertSettings(drift_threshold=3.0)
    with pytest.raises(ValueError, match="PictureSettings: probe_curves must be 'filmstrip', 'all' or 'none'"):
        cm.PictureSettings(probe_curves="some")
    with pytest.raises(ValueError, match="CAMSettings: reference must be 'first' or 'fit_start'"):
        cm.CAMSettings(reference="pretrained")
    with pytest.raises(TypeError):
        cm.AlertSettings(4.0)  # keyword-only


def test_hyperparameters_are_flat_with_groups_spelled_out() -> None:
    hp = cm.CAMMonitor("net.features", alerting=cm.AlertSettings(spurious_enrichment=3.0), name="l3").hyperparameters()
    assert hp["cam_monitor.l3.target_layer"] == "net.features"
    assert hp["cam_monitor.l3.alerting.spurious_enrichment"] == 3.0
    assert hp["cam_monitor.l3.discovery.alpha"] == 1e-3 and hp["cam_monitor.l3.probe_settings.num_probes"] == 64
    assert all(isinstance(v, (bool, int, float, str, list, type(None))) for v in hp.values())
    given = cm.CAMMonitor(probes=cm.ProbeSet(torch.rand(3, 1, 8, 8), torch.arange(3))).hyperparameters()
    assert given["cam_monitor.probes"] == "ProbeSet(3 probes)"  # a probe set is named, not flattened


def test_inferred_regions_are_drawn_only_while_their_alert_is_active_and_the_evidence_backs_them() -> None:
    from types import SimpleNamespace

    mon = plain_monitor()
    mon.probes = cm.ProbeSet(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))
    box = torch.zeros(2, 8, 8, dtype=torch.bool)
    box[0, :2, :2] = True

    def evaluation(masks: torch.Tensor, backed: bool) -> SimpleNamespace:
        found = SimpleNamespace(backs_regions=lambda evidence: backed,
                                found_masks=lambda evidence, n, size, min_excess=0.0: masks[:n])
        return SimpleNamespace(evidence=None, discovery=found)

    assert mon._regions_to_show(evaluation(box, True)) is None  # no alert: a box is a chance win, not a region found
    mon.book.active["shortcut_confirmed"] = True
    assert mon._regions_to_show(evaluation(box, False)) is None  # the alert rests on whole-image tests: no box
    mon.shown_regions = mon._regions_to_show(evaluation(box, True))
    assert torch.equal(mon.shown_regions, box)
    nothing = torch.zeros_like(box)
    assert torch.equal(mon._regions_to_show(evaluation(nothing, True)), box)  # still backed: the last regions stay
    assert mon._regions_to_show(evaluation(nothing, False)) is None  # the pairs no longer back a cue: the box goes
    assert mon._regions_to_show(SimpleNamespace(evidence=None, discovery=None)) is None
    mon.book.active["shortcut_confirmed"] = False
    assert mon._regions_to_show(evaluation(nothing, True)) is None  # cleared: nothing drawn


def test_the_shortcut_evidence_is_part_of_the_state_and_old_states_still_load(tmp_path) -> None:
    """A resumed run keeps the evidence it had accumulated (the alert neither restarts nor clears on
    resume); a state written before the evidence was kept loads with none."""
    from cam_monitor.evidence import EvidenceState

    mon = plain_monitor()
    mon.evidence = EvidenceState({"local": 3.5, "global": -0.2}, cap=13.8)
    torch.save(mon.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh = plain_monitor()
    fresh.load_state_dict(state)
    assert fresh.evidence == mon.evidence
    del state["evidence"]
    old = plain_monitor()
    old.load_state_dict(state)
    assert old.evidence is None


def test_discovery_says_once_that_it_waits_for_a_model_that_beats_chance() -> None:
    """An untrained model is at chance on its probes: discovery tests nothing (no pairs, the
    evidence where it was) and the monitor says why, once; trained, it tests."""
    from cam_monitor.console import Voice

    data = make_decoy_digits(0)
    notes: list[str] = []
    mon = plain_monitor(voice=Voice(info=notes.append), alerting=cm.AlertSettings(action="log"))
    torch.manual_seed(0)
    model = SmallCNN()
    assert mon.prepare(model, loader=torch.utils.data.DataLoader(data.val, batch_size=64))
    with torch.no_grad():
        model.head.bias[0] = 50.0  # predicts class 0 for every probe: 2 of 20 right
    for step in range(2):
        outcome = mon.evaluate(model, epoch=step, step=step)
        assert outcome.evaluation.discovery.waiting and outcome.evaluation.discovery.pasted == 0
    assert len([n for n in notes if "rules and shortcut discovery wait" in n]) == 1
    assert "2 of 20 probes right" in " ".join(notes)
    with torch.no_grad():
        model.head.bias[0] = 0.0
    for epoch in range(3):
        train_one_epoch(model, data.train_shortcut.images, data.train_shortcut.labels, epoch)
    outcome = mon.evaluate(model, epoch=2, step=2)
    assert not outcome.evaluation.discovery.waiting and outcome.evaluation.discovery.pasted > 0
