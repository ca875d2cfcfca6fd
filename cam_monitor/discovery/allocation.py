"""How an evaluation's pairs are shared among the arms: equally in the first stage, then in
proportion to what each arm's pairs so far are worth (decided before those pairs are classified,
so the e-values stay valid).
"""
from __future__ import annotations

import torch

from ..evidence import EvidenceState, log_growth, stream
from .settings import DiscoverySettings


def share_out(num: int, weights: list[float]) -> list[int]:
    """``num`` split in proportion to ``weights`` (largest remainder, ties to the first; equally
    when no weight is positive)."""
    w = torch.tensor([max(float(x), 0.0) for x in weights], dtype=torch.float64)
    share = (w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(w))) * num
    counts = share.floor().long()
    counts[(share - counts).argsort(descending=True, stable=True)[:num - int(counts.sum())]] += 1
    return counts.tolist()


def arm_shares(num: int, arms: tuple[str, ...], weights: dict[str, float] | None = None) -> dict[str, int]:
    """``num`` pairs over ``arms``: equally, or in proportion to ``weights`` (what each arm is worth
    testing: :func:`second_stage_weights`; an arm of weight 0 gets none). Decided before the pairs it
    shares are classified, so every pair's factor keeps its mean under the null (the e-values stay valid)."""
    counts = share_out(num, [1.0] * len(arms) if not weights else [weights.get(a, 1.0) for a in arms])
    return dict(zip(arms, counts))


def open_shares(num: int, left: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    """``num`` pairs over the arms of ``left`` (arm -> planned pairs not yet drawn) by ``weights``
    (:func:`arm_shares`), shared only among the arms with pairs left: an arm whose plan ran out (the
    detail arm's holds one pair a suspect, few where few probes are classified right) leaves its
    share to the others instead of the budget going unspent. Every arm gets an entry, 0 where none
    is left."""
    open_arms = tuple(a for a, n in left.items() if n > 0)
    shares = arm_shares(num, open_arms, weights) if open_arms else {}
    return {a: shares.get(a, 0) for a in left}


def second_stage_weights(diffs: dict[str, torch.Tensor], evidence: EvidenceState | None,
                         settings: DiscoverySettings) -> dict[str, float]:
    """Each arm's weight in an evaluation's second stage, from its first-stage paired differences
    ``diffs``: what one more pair of it adds to the statistic, its expected log growth per pair
    (:func:`~cam_monitor.evidence.log_growth`, 0 where negative; at the common stake ``bet``, so
    that the arms are compared by what their pairs show, not by what they stake) times its
    e-detector with the first stage counted (at least 1). Where no arm grows, the e-detectors
    alone: an arm that found a cue at earlier evaluations keeps testing it through a first stage
    that happened to show little (four pairs with one win and no loss show no growth at the stake
    0.7 and margin 0.05). An equal share there instead shortened the false alarms' tail but
    confirmed real cues later on fresh models (measured: see the reference)."""
    interim = (evidence or EvidenceState()).update({a: d for a, d in diffs.items() if d.numel()},
                                                   settings.bets, settings.margins)
    level = {a: interim.detector(stream(a)) for a in diffs}
    growth = {a: max(0.0, log_growth(d, settings.bet, settings.margins[a])) * max(1.0, level[a])
              for a, d in diffs.items()}
    return growth if any(growth.values()) else level
