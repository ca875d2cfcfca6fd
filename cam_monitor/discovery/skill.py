"""Whether the model beats chance on the probes: discovery tests, and the alert rules judge, only
a model that does (a model at chance has maps that explain no decision).
"""
from __future__ import annotations

import math

import torch


def skill_p(targets: torch.Tensor, preds: torch.Tensor) -> float:
    """How likely a model at chance gets as many of the probes right as ``preds`` do: the one-sided
    exact binomial p-value of their correct count against the share of the most common class (what
    a model that always predicts it scores). 1.0 with no probes or a single class (nothing to beat).
    Every rank holds the same gathered predictions, so every rank computes the same."""
    n = len(targets)
    if n == 0:
        return 1.0
    correct = int((preds == targets).sum())
    share = float(torch.bincount(targets).max()) / n
    if share >= 1:
        return 1.0
    tail = torch.distributions.Binomial(n, probs=torch.tensor(share, dtype=torch.float64))
    return min(1.0, math.exp(float(tail.log_prob(torch.arange(correct, n + 1, dtype=torch.float64)).logsumexp(0))))


def skilled(p: float, level: float) -> bool:
    """Whether a model whose :func:`skill_p` is ``p`` beats chance at ``level``: ``p`` is at most
    ``level`` (a level of 1.0 counts every model as skilled). Discovery and the alert rules both
    decide by it."""
    return level >= 1 or p <= level


def beats_chance(targets: torch.Tensor, preds: torch.Tensor, level: float) -> bool:
    """Whether the predictions ``preds`` of the probes' ``targets`` beat chance at ``level`` (:func:`skilled`)."""
    return skilled(skill_p(targets, preds), level)
