"""Alert rules and the patience/hysteresis state machine, without Lightning."""
from __future__ import annotations

import math
import re

import pytest
import torch

from cam_monitor.alerts import (AlertBook, Rule, at_chance, check_rules, default_rules, describe_alert, describe_alert_markdown,
                                resolve_action, strongest_test)

IDS = ["a", "b", "c"]
RULES = default_rules()


def agg(enr=1.0, energy=0.1, obj=0.8, drift=0.0, rise=0.0, masked=3.0) -> dict:
    """Aggregates of an evaluation whose ``masked`` probes carry spurious masks of their own."""
    return {"spurious_enrichment": enr, "spurious_energy": energy, "object_energy": obj, "object_enrichment": obj / 0.5,
            "drift_ref": drift, "spurious_energy_rise": rise, "spurious_masked": masked}


def per(enr=(1.0, 1.0, 1.0), rise=(0.0, 0.0, 0.0)) -> dict:
    return {"spurious_enrichment": torch.tensor(enr), "spurious_energy_rise": torch.tensor(rise),
            "object_energy": torch.tensor([0.8, 0.1, 0.5]), "object_enrichment": torch.tensor([1.6, 0.2, 1.0]),
            "drift_ref": torch.tensor([0.9, 0.1, 0.6])}


def levels(checks) -> dict:
    return {c.rule: c.level for c in checks}


def test_enrichment_rule_fire_hold_clear_and_offenders_worst_first() -> None:
    rules = default_rules(spurious_enrichment=4.0)
    fire = check_rules(rules, agg(enr=5.0), per(enr=(4.5, 9.0, 1.0)), IDS, None, hysteresis=0.1)
    (c,) = [c for c in fire if c.rule == "spurious_enrichment"]
    assert c.level == "fire" and c.probe_ids == ["b", "a"]
    assert levels(check_rules(rules, agg(enr=3.8), per(), IDS, None, 0.1))["spurious_enrichment"] == "hold"
    assert levels(check_rules(rules, agg(enr=3.6), per(), IDS, None, 0.1))["spurious_enrichment"] == "clear"
    assert levels(check_rules(rules, agg(enr=math.nan), per(), IDS, None, 0.1))["spurious_enrichment"] == "hold"


def test_reference_rules_only_once_a_reference_exists() -> None:
    assert set(levels(check_rules(RULES, agg(), per(), IDS, None))) == {"spurious_enrichment", "object_enrichment_floor"}
    ref = agg(energy=0.05, obj=0.9)
    checks = check_rules(RULES, agg(energy=0.3, obj=0.5, drift=0.8, rise=0.25), per(rise=(0.3, 0.0, 0.4)), IDS, ref)
    lv = levels(checks)
    assert lv["spurious_energy_rise"] == "fire" and lv["drift_off_object"] == "fire"
    (rise,) = [c for c in checks if c.rule == "spurious_energy_rise"]
    # the alert names the metric it read, with that metric's value (not the raw spurious energy)
    assert rise.metric == "spurious_energy_rise" and rise.value == 0.25 and rise.probe_ids == ["c", "a"]


def test_every_rule_reads_a_metric_the_evaluation_produces() -> None:
    from cam_monitor.evaluation import PER_PROBE

    assert {r.metric for r in RULES} - {"shortcut_evidence"} <= set(PER_PROBE)
    assert [r.name for r in RULES] == ["spurious_enrichment", "spurious_energy_rise", "object_enrichment_floor",
                                       "drift_off_object", "shortcut_confirmed"]


def test_drift_toward_the_object_is_not_an_alert() -> None:
    lv = levels(check_rules(RULES, agg(obj=0.9, drift=0.9), per(), IDS, agg(obj=0.5)))
    assert lv["drift_off_object"] == "hold"


def test_drift_off_the_object_needs_a_material_fall_of_the_object_energy() -> None:
    """A control's maps sharpening as it learns lose a few points of the object's energy while
    they drift: not a move off the object. A fall of MOVED_OFF_OBJECT_FALL or more is."""
    from cam_monitor.alerts import MOVED_OFF_OBJECT_FALL

    for fall, verdict in ((0.02, "hold"), (MOVED_OFF_OBJECT_FALL - 0.01, "hold"), (MOVED_OFF_OBJECT_FALL + 1e-6, "fire"),
                          (0.4, "fire")):
        lv = levels(check_rules(RULES, agg(obj=0.8 - fall, drift=0.9), per(), IDS, agg(obj=0.8)))
        assert lv["drift_off_object"] == verdict, fall
    assert levels(check_rules(RULES, agg(obj=0.1, drift=0.3), per(), IDS, agg(obj=0.8)))["drift_off_object"] == "clear"


def test_drift_without_object_masks_counts_only_when_the_marks_energy_rose_on_most_probes() -> None:
    """Without object masks the rule needs the sign test that the energy on the user's marks rose on
    more probes than chance allows (``spurious_rise_p``), not a mean rise: 33 probes up and 31 down
    with a mean above 0 is drift, not a move onto the marks."""
    from cam_monitor.alerts import MOVED_ONTO_MARKS_LEVEL
    from cam_monitor.evidence import sign_test_p

    no_obj = {k: v for k, v in agg(drift=0.9, rise=0.1).items() if k != "object_energy"}
    ref = {k: v for k, v in agg().items() if k != "object_energy"}
    assert levels(check_rules(RULES, no_obj, per(), IDS, ref))["drift_off_object"] == "hold"  # no sign test: no masks
    even = {**no_obj, "spurious_rise_p": sign_test_p(33, 31)}
    assert levels(check_rules(RULES, even, per(), IDS, ref))["drift_off_object"] == "hold"
    most = {**no_obj, "spurious_rise_p": sign_test_p(50, 14)}
    assert sign_test_p(50, 14) <= MOVED_ONTO_MARKS_LEVEL
    assert levels(check_rules(RULES, most, per(), IDS, ref))["drift_off_object"] == "fire"
    assert levels(check_rules(RULES, {**most, "drift_ref": 0.3}, per(), IDS, ref))["drift_off_object"] == "clear"


def test_drift_without_any_mask_never_alerts() -> None:
    """Mask-free, nothing says where the object is: the border band's rise is no evidence that the
    maps left it (it rose on drifting control models), so the drift rule holds however far the maps moved."""
    bare = {k: v for k, v in agg(drift=1.5, rise=0.4, masked=0.0).items() if k != "object_energy"}
    ref = {k: v for k, v in agg(masked=0.0).items() if k != "object_energy"}
    assert levels(check_rules(RULES, bare, per(), IDS, ref))["drift_off_object"] == "hold"


def test_object_floor_fires_below_floor() -> None:
    checks = check_rules(default_rules(object_energy_floor=0.3), agg(obj=0.2), per(), IDS, None)
    (c,) = [c for c in checks if c.rule == "object_energy_floor"]
    assert c.level == "fire" and c.probe_ids == ["b"]


def test_the_object_rule_is_relative_to_chance_so_diffuse_maps_on_a_small_object_do_not_fire() -> None:
    """A 12 % object holding 12 % of a diffuse map is at chance (enrichment 1.0): no alert, though
    its absolute energy is far below 0.3; a map that avoids the object (enrichment 0.2) fires."""
    diffuse = {**agg(), "object_energy": 0.12, "object_enrichment": 1.0}
    assert levels(check_rules(RULES, diffuse, per(), IDS, None))["object_enrichment_floor"] == "clear"
    avoiding = {**agg(), "object_energy": 0.024, "object_enrichment": 0.2}
    (c,) = [c for c in check_rules(RULES, avoiding, per(), IDS, None) if c.rule == "object_enrichment_floor"]
    assert c.level == "fire" and c.probe_ids == ["b"]
    assert "object_energy_floor" not in {r.name for r in RULES}  # the absolute floor is opt-in


def test_no_rule_fires_or_clears_while_the_model_is_at_chance_on_the_probes() -> None:
    """At chance (``skill_p`` above ``skill_level``) the maps explain no decision: every rule holds,
    whichever side of its threshold; at or below the level the rules judge as before."""
    ref = agg()
    past, back = agg(enr=9.0, obj=0.1, drift=0.9), agg(enr=1.0, obj=0.8)
    past["spurious_rise_p"] = 1e-6
    for values, verdict in ((past, "fire"), (back, "clear")):
        judged = levels(check_rules(RULES, {**values, "skill_p": 0.01}, per(), IDS, ref, skill_level=0.01))
        held = levels(check_rules(RULES, {**values, "skill_p": 0.02}, per(), IDS, ref, skill_level=0.01))
        assert judged["spurious_enrichment"] == verdict and judged["object_enrichment_floor"] == verdict
        assert set(held) == set(judged) and set(held.values()) == {"hold"}
    # skill_level 1.0 never waits; without a skill_p (an evaluation of an older version) nothing waits either
    assert levels(check_rules(RULES, {**past, "skill_p": 1.0}, per(), IDS, ref, skill_level=1.0))["spurious_enrichment"] == "fire"
    assert not at_chance(past, 0.01) and at_chance({"skill_p": 0.5}, 0.01) and not at_chance({"skill_p": 0.5}, 1.0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="skill_level"):
            check_rules(RULES, past, per(), IDS, ref, skill_level=bad)


def test_an_active_alert_stays_active_while_the_model_falls_back_to_chance() -> None:
    book = AlertBook(patience=1)
    fired = book.update(check_rules(RULES, {**agg(enr=9.0), "skill_p": 1e-9}, per(), IDS, None, skill_level=0.01), 0, 0)
    assert [e["event"] for e in fired] == ["fired"]
    assert book.update(check_rules(RULES, {**agg(enr=1.0), "skill_p": 0.5}, per(), IDS, None, skill_level=0.01), 1, 1) == []
    assert book.n_active == 1
    cleared = book.update(check_rules(RULES, {**agg(enr=1.0), "skill_p": 1e-9}, per(), IDS, None, skill_level=0.01), 2, 2)
    assert [e["event"] for e in cleared] == ["cleared"] and book.n_active == 0


def test_the_enrichment_rule_judges_only_regions_the_user_outlined() -> None:
    """Without any spurious mask the border band stands in; its enrichment is logged but cannot
    alert (its ceiling sits below the threshold), the mask-free shortcut rule covers that case."""
    assert levels(check_rules(RULES, agg(enr=9.0, masked=0.0), per(), IDS, None))["spurious_enrichment"] == "hold"
    assert levels(check_rules(RULES, agg(enr=9.0, masked=1.0), per(), IDS, None))["spurious_enrichment"] == "fire"


def test_the_shortcut_rule_names_the_suspect_probes_and_carries_the_regions() -> None:
    regions = [{"class": 3, "flips": 6, "control_flips": 0, "tests": 8, "flip_rate": 0.75, "control_rate": 0.0,
                "probe_ids": ["c"], "boxes": [[0, 0, 4, 4]]}]
    values = {**agg(), "shortcut_evidence": 2000.0}
    series = {**per(), "shortcut_flip": torch.tensor([math.nan, 0.2, 0.75])}
    by_test = {"local": 1.5, "global": 0.8, "border": 4.5e4, "all": 6e4}
    (c,) = [c for c in check_rules(RULES, values, series, IDS, None, regions={"shortcut_evidence": regions},
                                   evidence_by_test={"shortcut_evidence": by_test})
            if c.rule == "shortcut_confirmed"]
    assert c.level == "fire" and c.probe_ids == ["c", "b"]
    (event,) = AlertBook().update([c], epoch=2, global_step=40)
    assert event["regions"] == regions and event["regions"] is not regions
    assert event["evidence_by_test"] == by_test and event["evidence_by_test"] is not by_test
    text = describe_alert(event)
    assert "class 3 at box (y0, x0, y1, x1) (0, 0, 4, 4) flips 6/8 vs control 0/8, mean outcome +0.75" in text
    assert "strongest test: the border band (band swap), evidence 4.5e+04 (every test together 6e+04)" in text
    markdown = describe_alert_markdown(event)
    assert "Strongest test: the border band (band swap), evidence 4.5e+04 (every test together 6e+04); each test: " \
           "local 1.5, global 0.8, border 4.5e+04\n" in markdown
    found = {**regions[0], "test": "recurring", "class": 5}
    assert "class 5 (recurring test) at box (y0, x0, y1, x1) (0, 0, 4, 4)" in describe_alert({**event, "regions": [found]})
    assert "| 5 | recurring | (0, 0, 4, 4) | 6 | 0 | 8 | +0.75 |" in describe_alert_markdown({**event, "regions": [found]})
    assert "| 3 | local | (0, 0, 4, 4) | 6 | 0 | 8 | +0.75 |" in markdown  # regions written before the keys: the local test's
    # a mark test's graded pairs: no flip more than the controls, yet each test gave the class more probability
    graded = {**found, "flips": 0, "flip_rate": 0.0, "outcome": 0.6}
    assert "flips 0/8 vs control 0/8, mean outcome +0.60" in describe_alert({**event, "regions": [graded]})
    assert "regions:" not in describe_alert({**event, "regions": [{**graded, "outcome": -0.1}]})
    assert strongest_test({**event, "evidence_by_test": {"all": 6e4}}) is None  # no single test to name
    assert strongest_test({**event, "evidence_by_test": {"colour": 2.0}}) == \
        "colour statistics (per-channel median and spread swap), evidence 2"


def test_the_shortcut_rule_fires_at_one_over_alpha_holds_between_and_clears_only_at_no_evidence() -> None:
    """The evidence is an e-detector: it fires on reaching 1 / alpha, a fall short of that holds the
    alert (one weak evaluation neither raises nor clears it), and it clears only back at 1."""
    (rule,) = [r for r in default_rules(shortcut_alpha=0.01) if r.name == "shortcut_confirmed"]
    assert rule.metric == "shortcut_evidence" and rule.threshold == 100.0
    assert [rule.level(v, hysteresis=0.1) for v in (150.0, 99.0, 2.0, 1.0, 0.3, math.nan)] == [
        "fire", "hold", "hold", "clear", "clear", "hold"]
    book = AlertBook()
    states = []
    for value in (5.0, 300.0, 40.0, 3.0, 0.9, 50.0):
        (c,) = check_rules((rule,), {"shortcut_evidence": value}, {}, IDS, None)
        book.update([c], epoch=0, global_step=0)
        states.append(book.active.get("shortcut_confirmed", False))
    assert states == [False, True, True, True, False, False]


def test_a_custom_rule_is_a_row_of_the_table() -> None:
    rule = Rule("too_diffuse", "pointing_spurious", "below", 0.5)
    (c,) = check_rules((rule,), {"pointing_spurious": 0.2}, {"pointing_spurious": torch.tensor([0.1, 0.9, 0.4])}, IDS,
                       None)
    assert (c.level, c.probe_ids) == ("fire", ["a", "c"])


@pytest.mark.parametrize("kwargs, text", [(dict(spurious_enrichment=0), "> 0"), (dict(spurious_energy_rise=2), "(0, 1]"),
                                          (dict(object_energy_floor=-1), "[0, 1]"), (dict(drift_threshold=3), "(0, 2]"),
                                          (dict(object_enrichment_floor=2), "1.0 = chance"),
                                          (dict(shortcut_alpha=1.5), "(0, 1)")])
def test_thresholds_out_of_range_are_refused(kwargs, text) -> None:
    with pytest.raises(ValueError, match=re.escape(text)):
        default_rules(**kwargs)


def test_patience_and_hysteresis_state_machine() -> None:
    rules = default_rules(spurious_enrichment=4.0)
    book = AlertBook(patience=2)
    events = []
    for step, enr in enumerate([5.0, 3.9, 5.0, 5.0, 3.9, 5.0, 3.0, 3.0]):
        checks = [c for c in check_rules(rules, agg(enr=enr), per(), IDS, None, 0.1) if c.rule == "spurious_enrichment"]
        events += [(e["event"], step, e["metric"]) for e in book.update(checks, 0, step, prefix="cam/l3")]
    # fire needs 2 consecutive; 3.9 is inside the hysteresis band, so the alert holds until 3.0
    assert events == [("fired", 3, "cam/l3/spurious_enrichment"), ("cleared", 6, "cam/l3/spurious_enrichment")]
    assert book.n_active == 0


def test_describe_alert_is_one_sentence() -> None:
    text = describe_alert({"rule": "r", "metric": "cam/x", "value": 5.0, "threshold": 4.0, "epoch": 1, "global_step": 9,
                           "probe_ids": ["a", "b"]})
    assert text == "r (cam/x = 5, threshold 4) at epoch 1, step 9; probes: a, b"


def test_book_state_roundtrip() -> None:
    book = AlertBook(patience=3)
    book.count, book.active = {"x": 2}, {"x": True}
    other = AlertBook()
    other.load_state_dict(book.state_dict())
    assert other.count == {"x": 2} and other.active == {"x": True} and other.patience == 3


def test_resolve_action_accepts_builtins_and_import_paths_never_eval() -> None:
    assert resolve_action("stop") == "stop"
    assert resolve_action("math:sqrt") is math.sqrt and resolve_action("math.sqrt") is math.sqrt
    with pytest.raises(ValueError, match="not callable"):
        resolve_action("math:pi")
    with pytest.raises(ValueError, match="cannot import"):
        resolve_action("__import__('os').system('true')")
