"""The decision's statistics: the exact sign test, Holm, the betting e-value and the e-detector,
with its false-alarm rate measured on simulated null evaluations."""
from __future__ import annotations

import math

import pytest
import torch

from cam_monitor.evidence import (EvidenceState, arm_value, check_bet, holm, log_evalue, log_growth, log_evalue_following,
                                  sign_test_p)


def test_the_sign_test_is_the_exact_binomial_tail_on_discordant_pairs() -> None:
    assert sign_test_p(10, 0) == pytest.approx(2 ** -10)  # every pair one way: 10 pairs reach 1e-3
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(0, 5) == 1.0
    assert sign_test_p(12, 1) == pytest.approx(14 / 2 ** 13)
    assert sign_test_p(3, 3) == pytest.approx(sum(math.comb(6, k) for k in range(3, 7)) / 64)


def test_holm_adjusts_step_down_and_stays_monotone() -> None:
    out = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert out == {"a": pytest.approx(0.03), "c": pytest.approx(0.06), "b": pytest.approx(0.06)}
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


def test_the_evalue_bets_on_each_pair_less_the_margin() -> None:
    d = torch.tensor([1, 1, 0, -1])
    expected = 2 * math.log(1 + 0.5 * 0.9) + math.log(1 - 0.5 * 0.1) + math.log(1 - 0.5 * 1.1)
    assert log_evalue(d, bet=0.5, min_effect=0.1) == pytest.approx(expected)
    assert log_evalue(torch.zeros(0), 0.5, 0.1) == 0.0
    with pytest.raises(ValueError, match="bet"):
        check_bet(0.95, 0.1)  # a pair against would bet more than everything
    with pytest.raises(ValueError, match="min_effect"):
        check_bet(0.5, -0.1)


def test_the_detector_restarts_at_one_holds_without_pairs_and_is_capped() -> None:
    state = EvidenceState(cap=math.log(50))
    against = state.update({"local": torch.tensor([-1, -1])}, 0.5, 0.0)
    assert against.detector("local") == pytest.approx(0.25)
    back = against.update({"local": torch.tensor([1])}, 0.5, 0.0)
    assert back.detector("local") == pytest.approx(1.5)  # restarts from 1, not from 0.25
    held = back.update({"local": torch.zeros(0)}, 0.5, 0.0)
    assert held.log_detector == back.log_detector
    capped = back.update({"local": torch.ones(20)}, 0.5, 0.0)
    assert capped.detector("local") == pytest.approx(50)
    assert capped.detector("global") == 1.0  # a stream never tested
    assert EvidenceState.from_state(capped.state_dict()) == capped


def test_the_statistic_is_half_the_arms_mean_half_the_all_arms_stream() -> None:
    state = EvidenceState({"local": math.log(50), "all": math.log(10)})
    assert state.value(("local", "global")) == pytest.approx(0.5 * (50 + 1) / 2 + 0.5 * 10)  # untested counts 1
    per_class = EvidenceState({"local": math.log(50), "all": math.log(10), "local/3": math.log(8)})
    assert per_class.value(("local", "global"), (3, 4)) == pytest.approx(
        0.5 * (0.5 * 25.5 + 0.5 * 10) + 0.5 * (8 + 1) / 2)


def test_the_all_stream_bets_on_a_pair_only_while_its_arm_is_not_against_a_cue() -> None:
    win, loss = math.log(1 + 0.5 * 0.9), math.log(1 - 0.5 * 1.1)
    pairs = {"detail": torch.tensor([1, 1, 1, -1]), "colour": torch.tensor([-1, 1, 1, 1])}
    # detail: every pair counts (its own evidence is at least 1 before each); colour: only its first,
    # after which its own evidence is below 1 up to its last pair (one loss outweighs two wins at 0.5)
    assert log_evalue_following(pairs, {}, 0.5, 0.1) == pytest.approx(3 * win + loss + loss)
    assert loss + 2 * win < 0
    behind = {"detail": -3 * win + 0.01}  # an arm whose evidence was against a cue after the last evaluation
    assert log_evalue_following({"detail": torch.tensor([1, 1, 1, 1])}, behind, 0.5, 0.1) == pytest.approx(win)
    state = EvidenceState().update(pairs, 0.5, 0.1, pool=("detail", "colour"))
    assert state.log_detector["all"] == pytest.approx(3 * win + 2 * loss)
    assert state.log_detector["detail"] == pytest.approx(3 * win + loss)  # the arms' own streams bet on every pair
    assert set(EvidenceState().update(pairs, 0.5, 0.1).log_detector) == {"detail", "colour"}  # nothing pooled


def test_each_arm_bets_against_its_own_margin_in_its_streams_and_in_the_all_stream() -> None:
    margins = {"local": 0.05, "detail": 0.3}
    assert arm_value(margins, "detail") == 0.3 and arm_value(margins, "local/3") == 0.05 and arm_value(0.1, "x") == 0.1
    pairs = {"local": torch.tensor([1, 0]), "local/3": torch.tensor([1]), "detail": torch.tensor([1, 0])}
    state = EvidenceState().update(pairs, 0.5, margins, pool=("local", "detail"))
    local = math.log(1 + 0.5 * 0.95) + math.log(1 - 0.5 * 0.05)
    detail = math.log(1 + 0.5 * 0.7) + math.log(1 - 0.5 * 0.3)
    assert state.log_detector["local"] == pytest.approx(local)
    assert state.log_detector["local/3"] == pytest.approx(math.log(1 + 0.5 * 0.95))
    assert state.log_detector["detail"] == pytest.approx(detail)
    assert state.log_detector["all"] == pytest.approx(local + detail)
    one = EvidenceState().update(pairs, 0.5, 0.05, pool=("local", "detail"))
    assert one.log_detector["detail"] > state.log_detector["detail"]  # the wider margin asks more of a cue
    with pytest.raises(ValueError, match="detail_min_effect"):
        check_bet(0.9, 0.3, "detail_min_effect")


def test_each_arm_bets_at_its_own_stake_in_its_streams_and_in_the_all_stream() -> None:
    bets, margins = {"local": 0.7, "detail": 0.4}, {"local": 0.05, "detail": 0.2}
    pairs = {"local": torch.tensor([1, 0]), "local/3": torch.tensor([1]), "detail": torch.tensor([1, -1])}
    state = EvidenceState().update(pairs, bets, margins, pool=("local", "detail"))
    local = math.log(1 + 0.7 * 0.95) + math.log(1 - 0.7 * 0.05)
    detail = math.log(1 + 0.4 * 0.8) + math.log(1 - 0.4 * 1.2)
    assert state.log_detector["local/3"] == pytest.approx(math.log(1 + 0.7 * 0.95))
    assert state.log_detector["local"] == pytest.approx(local) and state.log_detector["detail"] == pytest.approx(detail)
    assert state.log_detector["all"] == pytest.approx(local + detail)


def test_the_detail_arms_lower_stake_damps_a_run_of_wins_more_than_a_cue_with_losses() -> None:
    """What the monitor's lower detail stake buys: a run of wins where the arm's null strains adds
    about half as much (in log) as at the common stake, while a texture that wins most of its
    pairs and loses a few keeps three quarters of its growth (a loss costs less) and two
    evaluations of it still cross 1 / alpha."""
    from cam_monitor.discovery import DiscoverySettings

    settings = DiscoverySettings()
    common = {a: settings.bet for a in settings.bets}

    def grown(diffs: list[int], bets: dict[str, float]) -> float:
        return EvidenceState().update({"detail": torch.tensor(diffs)}, bets, settings.margins).log_detector["detail"]

    run_of_wins = [1] * 20
    assert grown(run_of_wins, settings.bets) < 0.6 * grown(run_of_wins, common)
    texture = [1] * 45 + [-1] * 5 + [0] * 14
    assert grown(texture, settings.bets) > 0.7 * grown(texture, common)
    assert grown(texture * 2, settings.bets) > math.log(1 / settings.alpha)


@pytest.mark.parametrize("bet", [0.7, {"local": 0.7, "detail": 0.4}])
def test_the_false_alarm_rate_holds_with_each_arm_at_its_own_worst_case_null(bet) -> None:
    """Two arms at the edge of their own nulls (0.05 and 0.3 more potent than their controls), at
    one stake or at one each: at most alpha of the evaluations alarm; both at 0.3 against a margin
    of 0.05 for one, far more."""
    alpha, margins = 0.02, {"local": 0.05, "detail": 0.3}

    def alarm_rate(effects: dict[str, float]) -> float:
        gen = torch.Generator().manual_seed(3)
        alarms = evaluations = 0
        for _ in range(60):
            state = EvidenceState(cap=2 * math.log(1 / alpha))
            for _ in range(30):
                state = state.update({a: _null_pairs(32, e, gen, discordant=0.6) for a, e in effects.items()}, bet,
                                     margins, pool=tuple(effects))
                evaluations += 1
                if state.value(tuple(effects)) >= 1 / alpha:
                    alarms += 1
                    break  # count the alarm, start over (next run)
        return alarms / evaluations

    assert alarm_rate({"local": 0.05, "detail": 0.3}) <= alpha
    assert alarm_rate({"local": 0.3, "detail": 0.3}) > 4 * alpha  # the margin is what keeps the rate


def _update(state: EvidenceState, diffs: dict[str, torch.Tensor], bet: float, min_effect: float) -> EvidenceState:
    """``state`` after one evaluation, every arm (a stream without a class) also feeding ``all``."""
    return state.update(diffs, bet, min_effect, pool=tuple(k for k in diffs if "/" not in k))


def _null_pairs(n: int, effect: float, gen: torch.Generator, discordant: float = 0.3) -> torch.Tensor:
    """n paired differences with P(+1) - P(-1) = ``effect`` among a ``discordant`` share."""
    u = torch.rand(n, generator=gen)
    plus = discordant * (1 + effect / discordant) / 2
    return torch.where(u < plus, 1, torch.where(u < discordant, -1, 0))


@pytest.mark.parametrize("effect", [0.0, 0.05])
def test_the_false_alarm_rate_per_evaluation_is_at_most_alpha_on_null_evaluations(effect) -> None:
    """Null evaluations (candidates at most ``min_effect`` more potent than their controls, the
    worst case included): the detector crosses 1 / alpha in at most alpha of the evaluations."""
    alpha, bet, min_effect = 0.02, 0.7, 0.05
    gen = torch.Generator().manual_seed(0)
    alarms, evaluations = 0, 0
    for _ in range(100):
        state = EvidenceState(cap=2 * math.log(1 / alpha))
        for _ in range(50):
            state = _update(state, {"local": _null_pairs(32, effect, gen),
                                            "global": _null_pairs(32, effect, gen)}, bet, min_effect)
            evaluations += 1
            if state.value(("local", "global")) >= 1 / alpha:
                alarms += 1
                state = EvidenceState(cap=state.cap)  # count the alarm, start over
    assert alarms / evaluations <= alpha, (alarms, evaluations)


def test_a_cue_a_third_more_potent_than_its_control_is_confirmed_within_three_evaluations() -> None:
    gen = torch.Generator().manual_seed(1)
    state = EvidenceState(cap=2 * math.log(1e3))
    values = []
    for _ in range(3):
        state = _update(state, {"local": _null_pairs(32, 0.33, gen, discordant=0.4)}, 0.7, 0.05)
        values.append(state.value(("local", "global")))
    assert values[-1] >= 1e3, values


def _run_streams(effects: dict[int, float], evaluations: int, seed: int, alpha: float, follow: bool = True,
                 per_class: int = 4) -> list[tuple[float, float]]:
    """Evaluations of 10 classes' candidates, planned by discovery's own allocation (half round-robin,
    half following each class's evidence), each pair drawn with its class's effect; per evaluation
    (the statistic with per-class streams, the pooled streams' mean alone)."""
    from cam_monitor.discovery import Suspect, recipients_of
    from cam_monitor.evidence import stream

    classes = tuple(range(10))
    labels = torch.arange(10 * per_class) % 10
    suspects = [Suspect(i, int(labels[i]), (0, 0, 4, 4), 0.5) for i in range(len(labels))]
    gen = torch.Generator().manual_seed(seed)
    state, out = EvidenceState(cap=2 * math.log(1 / alpha)), []
    for e in range(evaluations):
        weights = state.class_weights("local", classes) if follow and state.log_detector else None
        pairs = recipients_of(suspects, labels, labels, 32, torch.Generator().manual_seed(seed * 1000 + e), weights)
        cls = torch.tensor([suspects[s].cls for s, _ in pairs])
        d = torch.stack([_null_pairs(1, effects.get(int(k), 0.0), gen, discordant=0.6)[0] for k in cls])
        diffs = {"local": d, **{stream("local", int(k)): d[cls == k] for k in cls.unique()}}
        state = _update(state, diffs, 0.7, 0.05)
        out.append((state.value(("local",), classes), state.value(("local",))))
    return out


def test_a_cue_in_one_class_of_ten_is_confirmed_by_its_own_stream_and_missed_by_the_pooled_one() -> None:
    """The ruler beside one class only: pooled over ten classes its pairs are a tenth of the stream
    and the pooled detector never grows; the class's own stream, fed more pairs as its evidence
    grows, crosses 1 / alpha within a few evaluations."""
    values = _run_streams({0: 0.55}, 8, seed=0, alpha=1e-3)
    first = next(i for i, (v, _) in enumerate(values) if v >= 1e3)
    assert first <= 5 and values[-1][0] >= 1e3, values
    before = _run_streams({0: 0.55}, 8, seed=0, alpha=1e-3, follow=False)  # round-robin pairs, pooled streams
    assert max(p for _, p in before) < 1e3, before


def test_per_class_streams_with_evidence_led_allocation_keep_the_false_alarm_rate() -> None:
    """Null evaluations at the worst case (every class's candidates ``min_effect`` more potent than
    their controls), planned by the evidence-led allocation: at most alpha of the evaluations alarm."""
    alpha, alarms, evaluations = 0.02, 0, 0
    for seed in range(30):
        for value, _ in _run_streams({k: 0.05 for k in range(10)}, 30, seed=seed, alpha=alpha, per_class=3):
            evaluations += 1
            alarms += value >= 1 / alpha
            if value >= 1 / alpha:
                break  # count the alarm, start over (next run)
    assert alarms / evaluations <= alpha, (alarms, evaluations)


def test_arms_share_the_pairs_equally_or_in_proportion_to_their_weights() -> None:
    from cam_monitor.discovery import arm_shares

    arms = ("local", "global", "border")
    assert arm_shares(64, arms) == {"local": 22, "global": 21, "border": 21}  # the remainder to the first arm
    assert arm_shares(43, arms, {"local": 0.0, "global": 1.0, "border": 3.0}) == {
        "local": 0, "global": 11, "border": 32}  # an arm of weight 0 gets none
    assert arm_shares(64, arms, {"local": 1.0, "global": 1.0, "border": 998.0}) == {"local": 0, "global": 0, "border": 64}
    assert arm_shares(64, arms, {a: 1.0 for a in arms}) == arm_shares(64, arms, {a: 0.0 for a in arms}) == arm_shares(64, arms)


def test_the_second_stage_follows_the_arm_whose_first_pairs_grow_the_statistic() -> None:
    from cam_monitor.discovery import DiscoverySettings, second_stage_weights

    settings = DiscoverySettings()
    diffs = {"local": torch.tensor([1, 1, 1, 0]), "colour": torch.tensor([-1, -1, 0, 0]),
             "detail": torch.tensor([1, 1, 1, 0])}
    weights = second_stage_weights(diffs, None, settings)
    assert weights["local"] > weights["detail"] > 0 == weights["colour"]  # the same pairs: detail's margin 0.2 taxes them more
    earlier = EvidenceState({"colour": math.log(500.0)})  # no arm grows now: the evidence so far leads
    none_grow = {a: torch.tensor([0, 0, 0, -1]) for a in diffs}
    led = second_stage_weights(none_grow, earlier, settings)
    assert max(led, key=led.get) == "colour" and led["colour"] > 100 * max(led["local"], led["detail"])


def test_evidence_led_arm_allocation_keeps_the_false_alarm_rate_and_finds_the_one_arm_with_a_cue() -> None:
    """Three arms, each evaluation's 48 pairs shared by discovery's own rule (a third equally, the
    rest by what those pairs and the evidence so far say: :func:`second_stage_weights`). At the
    worst-case null (every arm ``min_effect`` more potent than its control) at most alpha of the
    evaluations alarm; with a cue in one arm only (effect 0.4) the statistic confirms it sooner
    than an equal split does."""
    from cam_monitor.discovery import FIRST_STAGE, DiscoverySettings, arm_shares, second_stage_weights

    arms, alpha, bet, margin = ("local", "global", "border"), 0.02, 0.7, 0.05
    settings = DiscoverySettings(bet=bet, min_effect=margin)

    def run(effects: dict[str, float], seed: int, follow: bool, evaluations: int) -> list[float]:
        gen = torch.Generator().manual_seed(seed)
        state, out = EvidenceState(cap=2 * math.log(1 / alpha)), []
        for _ in range(evaluations):
            if follow:
                first = int(48 * FIRST_STAGE)
                found = {a: _null_pairs(n, effects[a], gen) for a, n in arm_shares(first, arms).items()}
                rest = arm_shares(48 - first, arms, second_stage_weights(found, state, settings))
                diffs = {a: torch.cat([found[a], _null_pairs(rest[a], effects[a], gen)]) for a in arms}
            else:
                diffs = {a: _null_pairs(n, effects[a], gen) for a, n in arm_shares(48, arms).items()}
            state = _update(state, diffs, bet, margin)
            out.append(state.value(arms))
        return out

    alarms = evaluations = 0
    for seed in range(40):
        for value in run({a: margin for a in arms}, seed, True, 30):
            evaluations += 1
            alarms += value >= 1 / alpha
            if value >= 1 / alpha:
                break  # count the alarm, start over (next run)
    assert alarms / evaluations <= alpha, (alarms, evaluations)
    cue = {"local": 0.0, "global": 0.0, "border": 0.4}
    first = lambda values: next((i for i, v in enumerate(values) if v >= 1 / alpha), 99)  # noqa: E731
    led = [first(run(cue, seed, True, 8)) for seed in range(20)]
    equal = [first(run(cue, seed, False, 8)) for seed in range(20)]
    assert max(led) <= 3 and sum(led) <= sum(equal), (led, equal)


def _first_crossings(effects: list[tuple[float, float]], runs: int, alpha: float = 1e-3, evaluations: int = 8,
                     pairs: int = 16) -> tuple[list[int], list[int]]:
    """Per run, the first evaluation the statistic crosses ``1 / alpha`` (99: never), with the
    ``all`` stream and under the arms' mean alone, for arms whose pairs win and lose at the given
    rates (16 pairs each per evaluation, as four arms share the first evaluation of 64 probes)."""
    arms = tuple(f"arm{i}" for i in range(len(effects)))
    gen = torch.Generator().manual_seed(0)
    mixed, mean = [], []
    for _ in range(runs):
        state, first = EvidenceState(cap=2 * math.log(1 / alpha)), [99, 99]
        for e in range(evaluations):
            diffs = {}
            for arm, (win, loss) in zip(arms, effects):
                u = torch.rand(pairs, generator=gen)
                diffs[arm] = torch.where(u < win, 1, torch.where(u < win + loss, -1, 0))
            state = _update(state, diffs, 0.7, 0.05)
            arm_mean = sum(state.detector(a) for a in arms) / len(arms)
            for k, value in enumerate((state.value(arms), arm_mean)):
                if value > 1 / alpha and first[k] == 99:
                    first[k] = e
        mixed.append(first[0])
        mean.append(first[1])
    return mixed, mean


def test_a_cue_seen_by_several_arms_adds_up_in_the_all_stream() -> None:
    """A corner patch moves the local, border and detail arms a little each: averaged arm by arm
    the evidence crosses late; pooled it crosses by the second evaluation in most runs."""
    mixed, mean = _first_crossings([(0.4, 0.05)] * 3 + [(0.1, 0.1)], runs=200)
    by_second = lambda firsts: sum(f <= 1 for f in firsts) / len(firsts)  # noqa: E731
    assert by_second(mixed) > 0.4 and by_second(mean) < 0.2, (by_second(mixed), by_second(mean))
    against = _first_crossings([(0.4, 0.05)] * 3 + [(0.0, 1.0)], runs=200)  # a control that always flips
    assert by_second(against[0]) > 0.4, by_second(against[0])
    strong_one = _first_crossings([(0.6, 0.02)] + [(0.1, 0.1)] * 3, runs=200)
    assert max(strong_one[0]) <= 3 and max(strong_one[1]) <= 3  # a cue one arm sees: the mean half still finds it


def test_the_all_stream_keeps_the_false_alarm_rate_at_the_worst_case_null() -> None:
    """Every arm's candidates ``min_effect`` more potent than their controls: the statistic with the
    ``all`` stream crosses in at most alpha of the evaluations."""
    alpha = 0.02
    firsts, _ = _first_crossings([(0.175, 0.125)] * 4, runs=100, alpha=alpha, evaluations=30)
    alarms = sum(f != 99 for f in firsts)
    evaluations = sum(f + 1 if f != 99 else 30 for f in firsts)  # a run stops at its alarm
    assert alarms / evaluations <= alpha, (alarms, evaluations)


def test_a_state_written_before_the_all_stream_resumes_with_it_at_one_and_an_active_alert_holds() -> None:
    """Checkpoints written before the ``all`` stream hold the arms' streams only. Resumed, that
    stream starts at 1 (a valid start for an e-detector), so the statistic is half the arms' mean
    plus one half: an alert raised on the arms' mean (at least 1 / alpha) stays above 1 and holds,
    and the stream gathers from the next evaluation on."""
    alpha = 1e-3
    old = EvidenceState.from_state({"log_detector": {"local": math.log(2 / alpha), "border": 0.0}, "cap": 13.8})
    arms = ("local", "border")
    assert old.detector("all") == 1.0
    assert old.value(arms) == pytest.approx(0.5 * (2 / alpha + 1) / 2 + 0.5)
    assert 1 < old.value(arms) < 1 / alpha  # holds an active alert; would not raise a new one alone
    after = old.update({"local": torch.ones(4), "border": torch.zeros(0)}, 0.5, 0.1, pool=arms)
    assert after.detector("all") == pytest.approx((1 + 0.5 * 0.9) ** 4)
    assert after.value(arms) > old.value(arms)


def test_an_arm_backs_every_class_while_its_pooled_evidence_is_for_a_cue_else_only_its_classes_own() -> None:
    """Where an alert may show the local arm's boxes: its pooled e-detector above 1 backs every
    candidate class; at or below 1, only a class whose own stream is above 1; none before any pairs."""
    classes = (0, 3, 7)
    assert EvidenceState().backed_classes("local", classes) == ()
    assert EvidenceState({"local": 0.2}).backed_classes("local", classes) == classes
    assert EvidenceState({"local": 0.0, "local/3": 1.5, "local/7": 0.0}).backed_classes("local", classes) == (3,)
    assert EvidenceState({"local": -0.4, "detail": 9.0, "all": 9.0}).backed_classes("local", classes) == ()


def test_log_growth_is_the_mean_log_factor_of_the_pairs_and_a_prior_pair_at_each_outcome() -> None:
    """Flip pairs: each outcome's share (counted ``prior`` times more) times its log factor; graded
    pairs in between count by their own factor, so a gain half the scale grows half as much."""
    bet, margin, prior = 0.7, 0.05, 0.5
    factor = {v: math.log1p(bet * (v - margin)) for v in (1, 0, -1)}
    flips = torch.tensor([1, 1, 1, 0, -1])
    expected = ((3 + prior) * factor[1] + (1 + prior) * factor[0] + (1 + prior) * factor[-1]) / (5 + 3 * prior)
    assert log_growth(flips, bet, margin, prior) == pytest.approx(expected)
    assert log_growth(torch.zeros(0), bet, margin, prior) == pytest.approx(sum(factor.values()) / 3)
    half, full = (log_growth(torch.full((40,), v, dtype=torch.float64), bet, 0.0) for v in (0.5, 1.0))
    assert 0 < half < full and half == pytest.approx((40 * math.log1p(bet * 0.5) + 0.5 * sum(
        math.log1p(bet * v) for v in (1, 0, -1))) / 41.5)


def test_a_capped_state_holds_each_stream_at_the_square_of_the_threshold() -> None:
    state = EvidenceState.capped(1e-3)
    assert state.cap == pytest.approx(2 * math.log(1e3)) and state.log_detector == {}
    assert state.update({"local": torch.ones(100)}, 0.7, 0.0).detector("local") == pytest.approx(1e6)
