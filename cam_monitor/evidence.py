"""Evidence for a shortcut with a stated false-alarm rate: an exact test per evaluation and an
e-detector that accumulates across evaluations.

Every confirmation test of :mod:`discovery` is a *paired* outcome on one recipient image, ``d``
in [-1, 1]: ``x - y`` where ``x`` = the intervention carrying the candidate cue turned the
prediction into the cue's class and ``y`` = its control did, or (the recurring arm) the gain in the
cue's class's probability of the test over its control, scaled and clipped
(:func:`~cam_monitor.discovery.settings.graded`). The null hypothesis of an arm is "the candidate
is at most ``min_effect`` more potent than its control": ``E[d] <= min_effect``, with a margin per
arm where the arms' controls match their tests less or more closely (:data:`Margins`).

- Per evaluation, :func:`sign_test_p` is the exact one-sided sign (McNemar) test on the discordant
  pairs (valid for ``min_effect = 0``), Holm-adjusted over the arms (:func:`holm`).
- Across evaluations, each stream of pairs bets a fixed fraction ``bet`` on every pair:
  ``e = prod(1 + bet * (d - min_effect))``, an e-value under the null (a product of factors of
  mean at most 1). The stake is fixed per arm (:data:`Bets`), like the margin: an arm whose control
  matches its test least (the widest margin) stakes less, so that a few evaluations where its null
  is strained carry the statistic less far. :class:`EvidenceState` keeps, per stream, the CUSUM
  form of these products (``M_t = e_t * max(1, M_{t-1})``, an e-detector: Shin, Ramdas and
  Rinaldo 2023). The streams are each arm's pairs pooled over classes (``local``, ``global``),
  every arm's pairs together (``all``: a cue that shows a little in several arms, as a corner patch does in the local,
  border and detail arms, adds up there instead of being averaged with each arm alone; a pair
  counts there only while its arm's own evidence is not against a cue, so an arm whose control
  is the more potent does not drag it down) and the local arm's pairs of one candidate class
  (``local/3``): a cue in one class of ten is diluted tenfold in the pooled stream, not in its
  own. The statistic is a fixed mixture: half the mean of the arms' streams, half the ``all``
  stream; with per-class streams that is half the statistic, the other half the mean of the
  per-class streams over the probe set's classes. A mixture of e-detectors with fixed weights is
  an e-detector, so crossing ``1 / alpha`` under the null takes at least ``1 / alpha``
  evaluations on average (average run length) under any dependence between the streams, and
  ``alpha`` is the false-alarm rate per evaluation. Which class gets how many pairs may depend on
  the evidence so far (:meth:`EvidenceState.class_weights`): a choice made before the pairs are
  drawn keeps every factor's mean at most 1.

An alert built on the statistic fires when it crosses ``1 / alpha`` and clears when it is back at
1 or below: the pairs since the cue was confirmed went against it. Between the two it holds, so a
single noisy evaluation neither raises nor clears it. Pure torch and math, no Lightning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch


def sign_test_p(wins: int, losses: int) -> float:
    """Exact one-sided p-value of ``wins`` discordant pairs for the candidate and ``losses``
    against it: P(Binomial(wins + losses, 1/2) >= wins); 1.0 without discordant pairs."""
    n = wins + losses
    if n == 0:
        return 1.0
    return min(1.0, sum(math.comb(n, k) for k in range(wins, n + 1)) / 2.0 ** n)


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error over the keys)."""
    order = sorted(pvalues, key=lambda k: pvalues[k])
    out, running = {}, 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[key]))
        out[key] = running
    return out


#: A value of every stream, or one per arm (a stream ``local/3`` takes its arm's).
PerArm = float | Mapping[str, float]
#: The null's margin of each stream.
Margins = PerArm
#: The stake per pair of each stream.
Bets = PerArm


def arm_value(value: PerArm, name: str) -> float:
    """``value`` for stream ``name`` (:func:`stream`): its arm's, or the one value of every stream."""
    return float(value) if isinstance(value, (int, float)) else float(value[name.split("/")[0]])


def log_evalue(diffs: torch.Tensor, bet: float, min_effect: float) -> float:
    """log of ``prod(1 + bet * (d - min_effect))`` over paired outcomes ``d`` in [-1, 1]."""
    if diffs.numel() == 0:
        return 0.0
    return float(torch.log1p(bet * (diffs.double() - min_effect)).sum())


def log_growth(diffs: torch.Tensor, bet: float, min_effect: float, prior: float = 0.5) -> float:
    """The expected log factor of one more pair of a stream whose pairs so far are ``diffs`` (in
    [-1, 1]): the mean log factor of those pairs and of ``prior`` made-up pairs at each of a win, a
    tie and a loss (so a handful of pairs is not taken at its word). Positive where more such pairs
    grow the e-detector: what an arm is worth testing more, in the units the statistic grows in."""
    made_up = prior * sum(math.log1p(bet * (v - min_effect)) for v in (1, 0, -1))
    seen = float(torch.log1p(bet * (diffs.double() - min_effect)).sum()) if diffs.numel() else 0.0
    return (seen + made_up) / (diffs.numel() + 3 * prior)


def log_evalue_following(pairs: dict[str, torch.Tensor], start: dict[str, float], bet: Bets,
                         min_effect: Margins) -> float:
    """log of the :data:`ALL` stream's factor for one evaluation: every arm's pairs bet on
    together, each pair only while its arm's own evidence is not against a cue (its log detector,
    from ``start`` and its earlier pairs of this evaluation, at least 0). Whether a pair is bet on
    depends only on pairs before it, so each factor keeps its mean at most 1 under the null; an arm
    whose control is the more potent (the null allows that) stops costing the others after its
    first pair against. Each pair is bet on against its own arm's margin, at its own arm's stake."""
    total = 0.0
    for arm, d in pairs.items():
        if d.numel() == 0:
            continue
        factors = torch.log1p(arm_value(bet, arm) * (d.double() - arm_value(min_effect, arm)))
        before = start.get(arm, 0.0) + torch.cat([factors.new_zeros(1), factors.cumsum(0)[:-1]])
        total += float(factors[before >= 0].sum())
    return total


def check_bet(bet: float, min_effect: float, name: str = "min_effect", bet_name: str = "bet") -> None:
    """The bet must keep every factor positive: ``0 < bet < 1 / (1 + min_effect)`` (``name`` and
    ``bet_name``: what the margin and the stake are called where the user set them)."""
    if not 0 <= min_effect < 1:
        raise ValueError(f"{name} must be in [0, 1), got {min_effect!r}")
    if not 0 < bet < 1 / (1 + min_effect):
        raise ValueError(f"{bet_name} must be in (0, 1 / (1 + {name})) = (0, {1 / (1 + min_effect):.4g}), got {bet!r}")


#: The stream of every arm's pairs together.
ALL = "all"


def stream(arm: str, cls: int | None = None) -> str:
    """The name of an evidence stream: an arm's pooled pairs (``local``) or one class's (``local/3``)."""
    return arm if cls is None else f"{arm}/{cls}"


@dataclass
class EvidenceState:
    """Per stream (:func:`stream`), the log of its e-detector; ``cap`` bounds each (log) so that
    evidence piled up while a cue was used does not take forever to undo once it stops being used."""

    log_detector: dict[str, float] = field(default_factory=dict)
    cap: float = math.inf

    @classmethod
    def capped(cls, alpha: float) -> "EvidenceState":
        """A fresh state for a statistic judged at ``1 / alpha``: each stream capped at its square
        (in log, twice the threshold's), the monitor's choice."""
        return cls(cap=2 * math.log(1 / alpha))

    def update(self, diffs: dict[str, torch.Tensor], bet: Bets, min_effect: Margins,
               pool: tuple[str, ...] = ()) -> "EvidenceState":
        """The state after one evaluation's paired differences per stream (a stream without pairs
        holds), each bet on at its arm's stake against its arm's margin (:func:`arm_value`); the
        pairs of the arms in ``pool`` also feed :data:`ALL` (:func:`log_evalue_following`)."""
        out = dict(self.log_detector)
        for name, d in diffs.items():
            if d.numel() == 0:
                continue
            out[name] = self._next(out.get(name, 0.0), log_evalue(d, arm_value(bet, name), arm_value(min_effect, name)))
        pooled = {a: diffs[a] for a in pool if a in diffs and diffs[a].numel()}
        if pooled:
            step = log_evalue_following(pooled, {a: self.log_detector.get(a, 0.0) for a in pooled}, bet, min_effect)
            out[ALL] = self._next(out.get(ALL, 0.0), step)
        return EvidenceState(out, self.cap)

    def _next(self, log_detector: float, log_e: float) -> float:
        """The CUSUM step: restart from 1 if below, multiply by this evaluation's e-value, cap."""
        return min(self.cap, max(0.0, log_detector) + log_e)

    def detector(self, name: str) -> float:
        """One stream's e-detector (1.0 for a stream never tested)."""
        return math.exp(self.log_detector.get(name, 0.0))

    def value(self, arms: tuple[str, ...], classes: tuple[int, ...] = (), per_class_arm: str = "local") -> float:
        """The statistic: half the mean over ``arms`` of their e-detectors, half the :data:`ALL`
        stream's; with ``classes`` (fixed for the run: the probe set's), half that and half the mean
        of ``per_class_arm``'s per-class detectors over ``classes``."""
        pooled = 0.5 * sum(self.detector(stream(a)) for a in arms) / len(arms) + 0.5 * self.detector(ALL)
        if not classes:
            return pooled
        per_class = sum(self.detector(stream(per_class_arm, k)) for k in classes) / len(classes)
        return 0.5 * pooled + 0.5 * per_class

    def backed_classes(self, arm: str, classes: tuple[int, ...]) -> tuple[int, ...]:
        """Of ``classes``, those whose ``arm`` pairs are, on balance, for a cue: every one while the
        arm's pooled e-detector is above 1 (its pairs since its last restart beat the margin), else
        those whose own stream (``arm/k``, kept with ``per_class``) is. Where a shortcut alert shows
        the arm's regions: above 1, not at ``1 / alpha``, since the alert itself may rest on several
        arms together; at or below 1 its regions are chance wins of a test whose pairs say no cue."""
        if self.detector(stream(arm)) > 1.0:
            return tuple(classes)
        return tuple(k for k in classes if self.detector(stream(arm, k)) > 1.0)

    def class_weights(self, arm: str, classes: tuple[int, ...]) -> dict[int, float]:
        """Each class's per-class e-detector of ``arm``: where the evidence so far points, the weight
        of that class in the next evaluation's share of pairs that follows the evidence."""
        return {k: self.detector(stream(arm, k)) for k in classes}

    def state_dict(self) -> dict[str, object]:
        return {"log_detector": dict(self.log_detector), "cap": self.cap}

    @classmethod
    def from_state(cls, state: dict[str, object]) -> "EvidenceState":
        return cls({str(k): float(v) for k, v in dict(state["log_detector"]).items()}, float(state["cap"]))
