"""What one evaluation's discovery found: each arm's paired outcomes, their sign tests and
excesses, the per-probe flips, the regions the local test and the mark tests (recurring, marked)
confirmed and their masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..evidence import EvidenceState, holm, sign_test_p, stream
from ..interventions import mask_boxes
from ..records import ShortcutRegion
from .candidates import Pair, PasteTest, Suspect
from .settings import LOCAL, graded


@dataclass
class PairedArm:
    """A paired arm's tests (global, colour, border, detail, texture, recurring, marked): its pairs,
    whether each test image and each control turned the recipient's prediction into the suspect's
    class, and how much more probability of that class each test gave than its control
    (``gains``). ``scale``: where set, the arm's evidence is the graded gains
    (:func:`~cam_monitor.discovery.settings.graded`), else the flips."""

    pairs: list[Pair]  # discover's own run of the local arm holds its PasteTests here
    flips: torch.Tensor
    control_flips: torch.Tensor
    gains: torch.Tensor
    scale: float | None = None

    @property
    def outcomes(self) -> torch.Tensor:
        """The paired outcomes the evidence bets on: graded gains in [-1, 1], or flip minus
        control flip in {-1, 0, 1}."""
        if self.scale is not None:
            return graded(self.gains, self.scale)
        return self.flips.long() - self.control_flips.long()

    def then(self, more: "PairedArm") -> "PairedArm":
        """These pairs followed by ``more``'s (an evaluation's second stage after its first)."""
        return PairedArm(self.pairs + more.pairs, torch.cat([self.flips, more.flips]),
                         torch.cat([self.control_flips, more.control_flips]), torch.cat([self.gains, more.gains]),
                         self.scale)


@dataclass
class Discovery:
    """What one evaluation's discovery found and its confirmation measured.

    ``flips[i]`` / ``control_flips[i]`` say whether local test ``i`` (and its control) turned the
    recipient's prediction into the suspect's class; ``paired`` holds the same for the other arms
    that ran (``global``, ``colour``, ``border``, ``detail``, ``texture``, ``recurring``, ``marked``).
    ``waiting``: the model did not beat chance on the probes (``DiscoverySettings.skill_level``), so
    nothing was tested.
    ``arms``: the arms that run for these probes on this layer (:func:`arms_run`, fixed for a run),
    whose mean the evidence takes. ``marks``: per mark arm that ran (``recurring``, ``marked``),
    the (N, H, W) masks its pairs carried from their source probe.
    """

    suspects: list[Suspect]
    tests: list[PasteTest]
    flips: torch.Tensor
    control_flips: torch.Tensor
    paired: dict[str, PairedArm]
    waiting: bool = False
    arms: tuple[str, ...] = ()
    marks: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def pasted(self) -> int:
        """How many images this discovery classified (tests and controls, every arm)."""
        return 2 * (len(self.tests) + sum(len(a.pairs) for a in self.paired.values()))

    def diffs(self, by_class: bool = False) -> dict[str, torch.Tensor]:
        """Per arm, the paired outcomes of its tests (:attr:`PairedArm.outcomes`; the local arm's
        flip - control flip, in {-1, 0, 1}); with
        ``by_class`` also the local arm's per candidate class (streams ``local/<class>``,
        :func:`stream`). The whole-image arms stay pooled: a class can be told by its statistics
        alone (a "1" is a vertical bar: its spectrum is its orientation), which is no shortcut, and
        a per-class stream would find it (measured with the whole-image amplitude swap: a control
        model's ``global/1`` reached 4e3)."""
        out = {LOCAL: self.flips.long() - self.control_flips.long()}
        out.update({arm: a.outcomes for arm, a in self.paired.items() if a.pairs})
        if by_class:
            cls = torch.tensor([self.suspects[t.suspect].cls for t in self.tests], dtype=torch.long)
            for k in cls.unique().tolist():
                out[stream(LOCAL, k)] = out[LOCAL][cls == k]
        return out

    def p_value(self) -> float:
        """This evaluation alone: the smallest Holm-adjusted exact sign-test p-value over the arms
        tested (1.0 when nothing was tested)."""
        ps = {arm: sign_test_p(int((d > 0).sum()), int((d < 0).sum())) for arm, d in self.diffs().items() if d.numel()}
        return min(holm(ps).values(), default=1.0)

    def aggregates(self) -> dict[str, float]:
        """Flip rates of every arm that ran, their controls and excesses (NaN for an arm without
        tests: ``shortcut_*`` for the local arm, ``global_*``, ``colour_*``, ``border_*``, ``detail_*``,
        ``texture_*``, ``recurring_*``, ``marked_*``), the mean probability gain of the arms scored
        by it (``recurring_gain``), the evaluation's
        ``shortcut_p`` and the count of ``shortcut_suspects`` (candidates)."""
        out = {"shortcut_suspects": float(len(self.suspects)), "shortcut_p": self.p_value()}
        arms = [("shortcut", self.flips, self.control_flips)]
        arms += [(arm, a.flips, a.control_flips) for arm, a in self.paired.items()]
        for name, flips, control in arms:
            rate = float(flips.float().mean()) if flips.numel() else math.nan
            base = float(control.float().mean()) if control.numel() else math.nan
            out.update({f"{name}_flip_rate": rate, f"{name}_flip_control": base, f"{name}_flip_excess": rate - base})
        for arm, a in self.paired.items():
            if a.scale is not None:
                out[f"{arm}_gain"] = float(a.gains.float().mean()) if a.gains.numel() else math.nan
        return out

    def excess(self) -> dict[int, float]:
        """Probe index -> its local flip rate minus its control rate, for every suspect that was tested."""
        out = {}
        for s, suspect in enumerate(self.suspects):
            mine = torch.tensor([t.suspect == s for t in self.tests], dtype=torch.bool)
            if mine.any():
                out[suspect.probe] = (self.flips[mine].float().mean() - self.control_flips[mine].float().mean()).item()
        return out

    def per_probe(self, n: int) -> dict[str, torch.Tensor]:
        """``shortcut_flip`` (n,): each tested suspect's flip rate minus its control rate, NaN for other probes."""
        out = torch.full((n,), math.nan)
        for probe, value in self.excess().items():
            out[probe] = value
        return {"shortcut_flip": out}

    def backed_classes(self, evidence: EvidenceState | None) -> tuple[int, ...]:
        """The candidate classes whose boxes may be shown as found regions: those whose local-arm
        pairs are, on balance, for a cue (:meth:`~cam_monitor.evidence.EvidenceState.backed_classes`).
        None before there is evidence; none either when an alert rests on the whole-image arms,
        whose cue has no box (a cast, a texture, a frame)."""
        if evidence is None:
            return ()
        return evidence.backed_classes(LOCAL, tuple(sorted({s.cls for s in self.suspects})))

    def backed_marks(self, evidence: EvidenceState | None) -> tuple[str, ...]:
        """The mark arms that ran (:attr:`marks`) whose pairs are, on balance, for a cue: their
        pooled e-detector above 1, as :meth:`backed_classes` reads the local arm's (they keep no
        per-class stream). Their masks are the found regions of every class they tested."""
        if evidence is None:
            return ()
        return tuple(arm for arm in self.marks if arm in self.paired and evidence.detector(stream(arm)) > 1.0)

    def regions(self, ids: list[str], class_names: list[str] | None = None,
                classes: tuple[int, ...] | None = None) -> list[ShortcutRegion]:
        """Per class of the tested suspects (of ``classes`` only, when given), strongest first: the
        local flip and control rates, the number of tests, and each suspect's probe id and box
        (``[y0, x0, y1, x1]`` image pixels)."""
        tested = []
        for s, suspect in enumerate(self.suspects):
            mine = [i for i, t in enumerate(self.tests) if t.suspect == s]
            if mine and (classes is None or suspect.cls in classes):
                flips, control = int(self.flips[mine].sum()), int(self.control_flips[mine].sum())
                tested.append((suspect.cls, suspect.probe, list(suspect.box), flips, control, len(mine),
                               float(flips - control)))
        return _by_class(tested, LOCAL, ids, class_names)

    def mark_regions(self, arm: str, ids: list[str], class_names: list[str] | None = None) -> list[ShortcutRegion]:
        """The regions of mark arm ``arm`` (``recurring`` or ``marked``), per class of its source
        probes, strongest first: its flip and control rates, its pairs, and each source probe's id
        and the box around its mask."""
        boxes = mask_boxes(self.marks[arm]).tolist()
        return _by_class([(cls, probe, boxes[probe], *counts) for probe, (cls, *counts) in self._sources(arm).items()],
                         arm, ids, class_names)

    def found_regions(self, evidence: EvidenceState | None, ids: list[str],
                      class_names: list[str] | None = None) -> list[ShortcutRegion]:
        """Every region this evaluation's evidence backs, strongest first: the local test's in
        :meth:`backed_classes`, and every class's of each mark arm in :meth:`backed_marks`."""
        out = self.regions(ids, class_names, self.backed_classes(evidence))
        for arm in self.backed_marks(evidence):
            out += self.mark_regions(arm, ids, class_names)
        return sorted(out, key=_strongest_first)

    def _sources(self, arm: str) -> dict[int, tuple[int, int, int, int, float]]:
        """Source probe -> (its class, flips, control flips, pairs, sum of the paired outcomes) over
        mark arm ``arm``'s pairs."""
        out: dict[int, list] = {}
        paired = self.paired[arm]
        outcomes = paired.outcomes.tolist()
        for i, pair in enumerate(paired.pairs):
            suspect = self.suspects[pair.suspect]
            row = out.setdefault(suspect.probe, [suspect.cls, 0, 0, 0, 0.0])
            row[1] += int(paired.flips[i])
            row[2] += int(paired.control_flips[i])
            row[3] += 1
            row[4] += outcomes[i]
        return {probe: tuple(row) for probe, row in out.items()}

    def masks(self, n: int, image_size: tuple[int, int], min_excess: float = 0.0,
              classes: tuple[int, ...] | None = None) -> torch.Tensor:
        """(n, H, W) bool for the first ``n`` probes: the box of every tested suspect (of ``classes``
        only, when given) whose own flip excess is above ``min_excess`` (the inferred spurious
        regions), empty elsewhere."""
        out = torch.zeros(n, *image_size, dtype=torch.bool)
        excess = self.excess()
        for suspect in self.suspects:
            if classes is not None and suspect.cls not in classes:
                continue
            if suspect.probe < n and excess.get(suspect.probe, -math.inf) > min_excess:
                y0, x0, y1, x1 = suspect.box
                out[suspect.probe, y0:y1, x0:x1] = True
        return out

    def mark_masks(self, arm: str, n: int, min_excess: float = 0.0) -> torch.Tensor:
        """(n, H, W) bool for the first ``n`` probes: mark arm ``arm``'s mask on every source probe
        whose own pairs' mean outcome (:attr:`PairedArm.outcomes`: the graded gain, or the flip
        excess) is above ``min_excess``, empty elsewhere."""
        marks = self.marks[arm]
        out = torch.zeros(n, *marks.shape[1:], dtype=torch.bool)
        for probe, (*_, pairs, outcome) in self._sources(arm).items():
            if probe < n and outcome / pairs > min_excess:
                out[probe] = marks[probe]
        return out

    def found_masks(self, evidence: EvidenceState | None, n: int, image_size: tuple[int, int],
                    min_excess: float = 0.0) -> torch.Tensor:
        """(n, H, W) bool: the masks of :meth:`found_regions` (the local boxes of the backed classes
        and the backed mark arms' masks) on the probes whose own excess is above ``min_excess``."""
        out = self.masks(n, image_size, min_excess, self.backed_classes(evidence))
        for arm in self.backed_marks(evidence):
            out |= self.mark_masks(arm, n, min_excess)
        return out

    def backs_regions(self, evidence: EvidenceState | None) -> bool:
        """Whether the evidence backs any region: a class of the local test or a mark arm."""
        return bool(self.backed_classes(evidence) or self.backed_marks(evidence))


def _strongest_first(region: dict[str, Any]) -> tuple[float, int]:
    """Sort key of regions: the largest mean paired outcome first, then the class."""
    return -region["outcome"], region["class"]


def _by_class(tested: list[tuple[int, int, list[int], int, int, int, float]], test: str, ids: list[str],
              class_names: list[str] | None) -> list[ShortcutRegion]:
    """One region per class from ``tested`` (class, probe, box, flips, control flips, tests, sum of
    the paired outcomes), each named by its ``test``, strongest first (:func:`_strongest_first`)."""
    by_class: dict[int, dict[str, Any]] = {}
    for cls, probe, box, flips, control, tests, outcome in tested:
        row = by_class.setdefault(cls, {"class": cls, "test": test, "flips": 0, "control_flips": 0, "tests": 0,
                                        "outcome": 0.0, "probe_ids": [], "boxes": []})
        row["flips"] += flips
        row["control_flips"] += control
        row["tests"] += tests
        row["outcome"] += outcome
        row["probe_ids"].append(ids[probe])
        row["boxes"].append(box)
    out = []
    for row in by_class.values():
        row["flip_rate"] = row["flips"] / row["tests"]
        row["control_rate"] = row["control_flips"] / row["tests"]
        row["outcome"] /= row["tests"]
        if class_names is not None and 0 <= row["class"] < len(class_names):
            row["class_name"] = class_names[row["class"]]
        out.append(row)
    return sorted(out, key=_strongest_first)
