"""Mask-free shortcut discovery and its causal confirmation, from maps already computed.

Seven interventions (the global one opt-in, the marked one where the probes carry spurious masks),
each a paired test against a control (:mod:`evidence` turns the pairs into a decision with a
stated false-alarm rate); forward passes only, no backward.

**Local cues** (a stamp, a tag, a ruler: something at a place). Every probe the model classifies
correctly is a candidate; its candidate region is the window of ``box_cells`` x ``box_cells``
cells of the layer's grid that holds the most map energy (sized in cells: a region means
something only at the resolution of the grid; one cell by default, the finest the grid resolves).
The region is pasted into a probe of another class *over that probe's most-credited window* (what
its own map reads as its evidence), and the control pastes the source's *next* most-credited
window (the best one not overlapping the region) at the same place. Both take the same evidence
away from the recipient and differ only in what they put there: a cue carries its class into any
image, while an object spans several regions its map credits, so its best region carries little
more of the class than its next one. The test holds where objects span more than one window; a
window that holds a whole object cannot be told from a cue (measured on Drawn Shapes, whose
objects fit a 2 x 2 window: see the reference). A flip is a prediction that becomes the source's
class.

**Colour cues** (a colour or brightness cast, a stain, an exposure: the image's per-channel
level and spread). The recipient is given the source's per-channel median and spread between the
1st and 99th percentiles (its own pixels, shifted and scaled) and, as the control, the source is
given the recipient's: the test carries the source's colour statistics and nothing of its
structure, the control the source's whole structure and none of its colour statistics. The
median and that spread are the background's level and range wherever the background is most of
the image: a cast moves them, the object's size (how much of the image a disc or a ring fills)
does not, where it moves the mean and the standard deviation.

**Global cues** (a texture, a grating, a background pattern: no one place). The recipient keeps its
phase (its structure) and is given the Fourier amplitude of the source's background: the source
with its most-credited :data:`~cam_monitor.interventions.OBJECT_SHARE` of pixels (its object, as
its own map sees it) filled with the mean of the rest. The control gives it the amplitude of the
source's object: the source with everything but that share filled. Both are whole-image statistics
of part of the same source, so both degrade the recipient alike; a stationary cue fills three times
the area of the background than of the object, and an object's class (its edges, orientation, size:
a spectrum carries them, measured on Drawn Shapes) is in the object's share. The test needs maps
that cover the object; where they do not, its control is weaker (see the reference).

**Border cues** (a frame, a scanner's margin, letterboxing, a tag or ruler along the edge: spread
along the border, neither one window nor an image statistic). The recipient gets the source's
border band (``border_band`` of each side, :func:`~cam_monitor.metrics.border_mask`) and, as the
control, the source's pixels of the next band inward, at least as many
(:func:`~cam_monitor.interventions.border_bands`). Objects sit inside the frame more often than on
it, so under the null the inner band carries at least as much of the source's class; a model that
follows the outer band more reads the border.

**Detail cues** (a texture, a grating, a noise pattern, a stamp: anything a model can read inside
one cell of the grid, wherever the cell sits). The candidate's own image with its cells shuffled
(:func:`~cam_monitor.interventions.shuffled_cells`: what lies inside each cell kept, their
arrangement lost) against, as the control, the candidate blurred at the scale of a cell
(:func:`~cam_monitor.interventions.blurred_cells`: the arrangement kept, detail finer than half a
cell lost). A *flip* here is the image keeping the candidate's class. A model that reads shapes
larger than a cell keeps its class on the blur more often than on the shuffle; one that reads
detail within cells, the reverse. Its null is that the classes are told by shapes spanning several
cells (measured on both zoo bases: see the reference); where the classes themselves are textures,
it reports the texture, which is then no shortcut (turn it off).

**Texture cues, against the object** (a texture, a grating, a noise pattern in the background: the
detail arm's cues, where the model reads the object as well). The detail arm takes detail away
from one probe and asks whether its class stays; a model that reads a texture *and* the object
keeps its class on the blur too, and that arm sees little. This one sets the two against each
other: the recipient blurred at half a cell (its own fine detail gone, its shapes kept) is given
the source's fine detail (the source minus its blur) from outside the source's most-credited
:data:`~cam_monitor.interventions.OBJECT_SHARE` of pixels (its object, as its map sees it,
:func:`~cam_monitor.interventions.background_detail_images`); the control gives it the fine detail
from inside that share. A model that reads the object finds more of the source's class in its
object's detail; one that reads a texture finds three times as much of the texture outside. Its
null is the spectrum arm's assumption, that the map covers the object (measured on control runs
of both zoo bases: see the reference). It runs where the detail arm does (a cell must be smaller
than an object for the blur to keep the recipient's shapes). Floating cues sit in the credited
share and are not its to find.

**Marked cues** (where the probes carry spurious masks: a region you suspect, of any size or
shape). The recipient, its own marked region filled with the mean of the rest, gets the source's
marked pixels at their place; the control gets, on the same pixels, the source's content from a
box of the mark's size elsewhere in the source, clear of the mark
(:func:`~cam_monitor.interventions.marked_images`). Both take the same from the same recipient and
differ only in whether what they bring is what you marked; the mark is not chosen by the model's
credit, so an object part the map would pick is not favoured. Measured with the zoo's true masks
on floating cues the mask-free arms miss: see the reference.

Budget: ``budget`` x the number of probes pasted images per evaluation (tests and controls),
inference forwards only, in two batches: a third of the pairs shared equally by the arms, then the
rest in proportion to what each arm's pairs so far are worth, its expected log growth per pair
times its evidence (:func:`second_stage_weights`), so an arm that shows a cue tests it harder in
the same evaluation while every arm keeps testing. The images themselves are built by
:mod:`interventions`. Everything is deterministic given its inputs (a private generator seeded by
the caller), so every rank of a multi-process run plans the same tests. Lightning-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .evidence import EvidenceState, check_bet, holm, log_growth, sign_test_p, stream
from .interventions import (MAX_BORDER_BAND, Box, Paste, background_detail_images, banded_images, border_bands,
                            colour_images, detail_images, markable, marked_images, object_regions, pasted_images,
                            spectrum_images)
from .probes import ProbeSet
from .records import ShortcutRegion

Predict = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) CPU images -> (B,) predicted classes
#: The confirmation arms: local paste, background spectrum swap, colour statistics swap, border band
#: swap, cell shuffle against blur, background fine detail against the object's, and (where the
#: probes carry spurious masks) the marked region against one from elsewhere.
ARMS = ("local", "global", "colour", "border", "detail", "texture", "marked")
MARKED = ARMS[-1]
LOCAL = ARMS[0]
#: What each arm tests, in the words an alert uses.
TEST_NAMES = {"local": "a local region (paste test)", "global": "the background's texture (spectrum swap)",
              "colour": "colour statistics (per-channel median and spread swap)",
              "border": "the border band (band swap)",
              "detail": "fine detail within cells (cell shuffle against a blur)",
              "texture": "the background's fine detail (background detail against the object's)",
              "marked": "your marked regions (the marked region pasted against one from elsewhere)"}
#: The default share of an evaluation's pairs the arms draw equally, before the rest follow what that
#: stage found (:func:`second_stage_weights`); measured against a half and against one stage in the reference.
FIRST_STAGE = 1 / 3
#: The coarsest grid the detail and texture arms run on, cells a side: on fewer, a cell holds a whole object
#: (on a 1 x 1 grid the shuffle leaves the image as it is and every model would keep its class),
#: and the finest measured grid is 4 x 4 (a ResNet-18's ``layer4`` at 32 px: see the reference).
MIN_DETAIL_GRID = 4


@dataclass(frozen=True)
class DiscoverySettings:
    """How candidates are tested and how the evidence is judged.

    Args:
        enabled: run discovery and confirmation at every evaluation.
        box_cells: side of a candidate region, in cells of the layer's grid (1: one cell, the finest
            region the grid resolves). Larger windows catch cues that span several cells but hold
            whole small objects, and the local test's control then no longer matches them.
        budget: pasted images per evaluation (tests plus controls, every arm) as a multiple of the
            probe count: 2.0 costs two inference forwards of the probe set. A third of the pairs
            go to the arms equally (4 each for 64 probes and the five default arms), the rest to
            the arms in proportion to what those pairs and the evidence so far say
            (:func:`second_stage_weights`); each arm's power is its pairs, so with fewer, cues
            are confirmed later.
        alpha: false-alarm rate per evaluation of ``shortcut_confirmed``: under the null (no
            candidate more than ``min_effect`` more potent than its control) the evidence needs
            at least ``1 / alpha`` evaluations on average to cross its threshold ``1 / alpha``.
        min_effect: the null hypothesis' margin: how much more often the candidate may flip
            predictions than its control and still not count (parts of a real object are a little
            more potent than other parts). Every arm's but the detail and marked arms'.
        detail_min_effect: the detail arm's margin. Its control (a blur at half a cell) takes more
            of a thin-stroked object than its test (a shuffle of the cells) does, so a model that
            still reads pieces of strokes keeps its class on the shuffle more often than on the
            blur, with no shortcut at all (digits controls early in training, measured: see the
            reference); a texture the model follows keeps it far more often still.
        marked_min_effect: the marked arm's margin. Its test and its control put content of the
            same shape from the same source on the same pixels of the recipient (the mark's own
            pixels against the source's from elsewhere), so for a model that does not read the mark
            neither is the more potent, save that the control may hold part of the object, which
            only makes it the stronger: this null needs no margin (measured on controls: see the
            reference).
        first_stage: the share of the pairs the arms draw equally, in the first batch; the rest
            follow what those pairs found (:func:`second_stage_weights`). 1.0 draws every pair
            equally in one batch (one forward round trip instead of two; each arm's pairs then
            follow no evidence, what the benchmarks record to replay other shares exactly).
        bet: the fraction of evidence staked on each pair (larger: faster on strong cues, slower
            to recover from pairs against). Every arm's but the detail arm's.
        detail_bet: the detail arm's stake. Its null is the least exact (the widest margin, and
            still strained for up to three evaluations early in training on thin-stroked objects:
            see the reference), so it stakes less: a run of wins where that null strains carries
            the evidence about half as far (in log), while a texture the model follows, losing a
            few pairs too, grows three quarters as fast (confirmed at most an evaluation later,
            measured). About the growth-optimal stake, 0.31, for pairs that beat the margin 0.2
            by 0.05 and never lose.
        global_test: run the background-spectrum arm for textures and patterns. Off by default:
            its null needs maps that cover the object, and on the zoo it found textures slowly
            (see the reference); turn it on where a texture shortcut is the worry.
        colour_test: run the colour-statistics arm (casts, stains, exposure).
        border_test: run the border-band arm for cues along the image's edge (frames, margins).
        border_band: width of the border band that arm swaps, as a share of each side (at least
            one pixel; the default matches the metrics' border band, ``CAMSettings.border_fraction``).
        detail_test: run the cell-shuffle arm for cues read inside one cell of the grid (textures,
            gratings, noise, small stamps), on grids of at least :data:`MIN_DETAIL_GRID` cells a
            side. Turn it off where the classes are textures.
        texture_test: run the background-detail arm for textures in the background (the source's
            fine detail from outside its credited share against from inside it, on a blurred probe
            of another class), on grids of at least :data:`MIN_DETAIL_GRID` cells a side. Turn it
            off where the classes are textures.
        marked_test: where the probes carry spurious masks, run the marked arm: a probe's marked
            pixels put into a probe of another class (its own marked region filled first),
            against the same pixels from a box of the mark's size elsewhere in the source. It asks
            whether the model's decision follows what you marked, as the mask-free arms ask of
            what they find; a cue of any size or shape, since the mask says where it is
            (:func:`~cam_monitor.interventions.marked_images`).
        seed: seeds the recipients' order (mixed with the evaluation's step).
        skill_level: discovery waits for a model that has learned something: it tests only where
            the probe set's accuracy beats what predicting its most common class scores, by a
            one-sided exact binomial test at this level (:func:`beats_chance`). A model at chance
            (the first steps of a run) classifies by whatever crude statistic its initial weights
            read, and the colour test took that for a cue on controls (measured: see the
            reference); a model that uses a shortcut is well above chance. 1.0 tests from the start.
            The alert rules wait for the same test (:func:`~cam_monitor.alerts.at_chance`).
        per_class: also keep the local arm's evidence per candidate class, and send half its pairs
            where each class's evidence grows (:mod:`evidence`): a cue in one class of ten (a ruler
            beside one lesion type) is confirmed instead of diluted, at a cost for cues in every
            class (the pooled evidence counts half): off by default, see the reference.
    """

    enabled: bool = True
    box_cells: int = 1
    budget: float = 2.0
    alpha: float = 1e-3
    min_effect: float = 0.05
    detail_min_effect: float = 0.2
    marked_min_effect: float = 0.0
    first_stage: float = FIRST_STAGE
    bet: float = 0.7
    detail_bet: float = 0.3
    global_test: bool = False
    colour_test: bool = True
    border_test: bool = True
    border_band: float = 0.1
    detail_test: bool = True
    texture_test: bool = True
    marked_test: bool = True
    seed: int = 0
    skill_level: float = 0.01
    per_class: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.box_cells, int) or isinstance(self.box_cells, bool) or self.box_cells < 1:
            raise ValueError(f"discovery box_cells must be an int >= 1 (cells of the layer grid), got {self.box_cells!r}")
        if not self.budget > 0:
            raise ValueError(f"discovery budget must be > 0 (pasted images per probe), got {self.budget!r}")
        if not 0 < self.first_stage <= 1:
            raise ValueError(f"discovery first_stage must be in (0, 1] (the share of pairs drawn equally; 1: one "
                             f"stage), got {self.first_stage!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"discovery alpha must be in (0, 1) (false alarms per evaluation), got {self.alpha!r}")
        if not 0 < self.skill_level <= 1:
            raise ValueError(f"discovery skill_level must be in (0, 1] (the test that the model beats chance on the "
                             f"probes; 1.0 tests from the first evaluation), got {self.skill_level!r}")
        if not 0 < self.border_band <= MAX_BORDER_BAND:
            raise ValueError(f"discovery border_band must be in (0, {MAX_BORDER_BAND:.3f}] (share of each side; "
                             f"wider leaves no inner band as large for the control), got {self.border_band!r}")
        check_bet(self.bet, self.min_effect)
        check_bet(self.bet, self.detail_min_effect, "detail_min_effect")  # the weights compare every arm at it
        check_bet(self.detail_bet, self.detail_min_effect, "detail_min_effect", "detail_bet")
        check_bet(self.bet, self.marked_min_effect, "marked_min_effect")

    @property
    def margins(self) -> dict[str, float]:
        """Each arm's null margin (:func:`~cam_monitor.evidence.arm_value` reads it per stream)."""
        special = {"detail": self.detail_min_effect, MARKED: self.marked_min_effect}
        return {arm: special.get(arm, self.min_effect) for arm in ARMS}

    @property
    def bets(self) -> dict[str, float]:
        """Each arm's stake per pair (:func:`~cam_monitor.evidence.arm_value` reads it per stream)."""
        return {arm: self.detail_bet if arm == "detail" else self.bet for arm in ARMS}

    @property
    def arms(self) -> tuple[str, ...]:
        """The mask-free arms this evaluation runs, in :data:`ARMS` order (the marked arm joins them
        where the probes carry masks: :meth:`arms_on`)."""
        on = (True, self.global_test, self.colour_test, self.border_test, self.detail_test, self.texture_test)
        return tuple(a for a, use in zip(ARMS, on) if use)

    def arms_on(self, grid: tuple[int, int], image_size: tuple[int, int], marked: bool = False) -> tuple[str, ...]:
        """The arms that run on a layer of ``grid`` cells and images of ``image_size``: :attr:`arms`
        less the border arm where the images have no inner band as large as the border band
        (:func:`~cam_monitor.interventions.border_bands`) and the detail and texture arms on a grid
        too coarse (:func:`detail_runs`), plus the marked arm where ``marked`` (some probe has a
        mark it can test: :func:`marks_testable`) and ``marked_test``. Fixed for a run, so the
        evidence is the mean of the arms that can gather any: an arm that cannot run would hold
        its detector at 1 and dilute the others'."""
        fine = detail_runs(grid)
        can = {"border": border_bands(image_size, self.border_band) is not None, "detail": fine, "texture": fine}
        extra = (MARKED,) if marked and self.marked_test else ()
        return tuple(a for a in self.arms if can.get(a, True)) + extra


@dataclass
class Suspect:
    """A candidate: a probe the model classifies correctly, the class its map explains, its
    best-credited window (image pixels) and the share of the map's energy inside it."""

    probe: int
    cls: int
    box: Box
    share: float

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass
class PasteTest:
    """One local confirmation: ``suspect``'s box pasted into probe ``recipient`` at ``place``
    (the recipient's most-credited window), and the control: the source's ``control_box`` (its
    next most-credited window) pasted at the same place."""

    suspect: int
    recipient: int
    control_box: Box
    place: Box


@dataclass
class Pair:
    """One whole-image confirmation: something of ``suspect``'s image given to probe ``recipient``
    (its background's amplitude, its colour statistics, its border band or its background's fine
    detail), and the control; for
    the detail arm the recipient is the suspect's own probe (its cells shuffled, or blurred)."""

    suspect: int
    recipient: int


@dataclass
class PairedArm:
    """A paired arm's tests (global, colour, border, detail, texture, marked): its pairs, and whether each test image and each
    control turned the recipient's prediction into the suspect's class."""

    pairs: list[Pair]
    flips: torch.Tensor
    control_flips: torch.Tensor


@dataclass
class Discovery:
    """What one evaluation's discovery found and its confirmation measured.

    ``flips[i]`` / ``control_flips[i]`` say whether local test ``i`` (and its control) turned the
    recipient's prediction into the suspect's class; ``paired`` holds the same for the whole-image
    arms that ran (``global``, ``colour``, ``border``, ``detail``, ``texture``, ``marked``). ``waiting``: the
    model did not beat chance on the probes (``DiscoverySettings.skill_level``), so nothing was tested.
    ``arms``: the arms that run for these probes on this layer (:func:`arms_run`, fixed for a run),
    whose mean the evidence takes.
    """

    suspects: list[Suspect]
    tests: list[PasteTest]
    flips: torch.Tensor
    control_flips: torch.Tensor
    paired: dict[str, PairedArm]
    waiting: bool = False
    arms: tuple[str, ...] = ()

    @property
    def pasted(self) -> int:
        """How many images this discovery classified (tests and controls, every arm)."""
        return 2 * (len(self.tests) + sum(len(a.pairs) for a in self.paired.values()))

    def diffs(self, by_class: bool = False) -> dict[str, torch.Tensor]:
        """Per arm, the paired differences flip - control flip (in {-1, 0, 1}) of its tests; with
        ``by_class`` also the local arm's per candidate class (streams ``local/<class>``,
        :func:`stream`). The whole-image arms stay pooled: a class can be told by its statistics
        alone (a "1" is a vertical bar: its spectrum is its orientation), which is no shortcut, and
        a per-class stream would find it (measured with the whole-image amplitude swap: a control
        model's ``global/1`` reached 4e3)."""
        out = {LOCAL: self.flips.long() - self.control_flips.long()}
        out.update({arm: a.flips.long() - a.control_flips.long() for arm, a in self.paired.items() if a.pairs})
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
        ``texture_*``, ``marked_*``), the evaluation's
        ``shortcut_p`` and the count of ``shortcut_suspects`` (candidates)."""
        out = {"shortcut_suspects": float(len(self.suspects)), "shortcut_p": self.p_value()}
        arms = [("shortcut", self.flips, self.control_flips)]
        arms += [(arm, a.flips, a.control_flips) for arm, a in self.paired.items()]
        for name, flips, control in arms:
            rate = float(flips.float().mean()) if flips.numel() else math.nan
            base = float(control.float().mean()) if control.numel() else math.nan
            out.update({f"{name}_flip_rate": rate, f"{name}_flip_control": base, f"{name}_flip_excess": rate - base})
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

    def regions(self, ids: list[str], class_names: list[str] | None = None,
                classes: tuple[int, ...] | None = None) -> list[ShortcutRegion]:
        """Per class of the tested suspects (of ``classes`` only, when given), strongest first: the
        local flip and control rates, the number of tests, and each suspect's probe id and box
        (``[y0, x0, y1, x1]`` image pixels)."""
        by_class: dict[int, dict[str, Any]] = {}
        for s, suspect in enumerate(self.suspects):
            mine = [i for i, t in enumerate(self.tests) if t.suspect == s]
            if not mine or (classes is not None and suspect.cls not in classes):
                continue
            row = by_class.setdefault(suspect.cls, {"class": suspect.cls, "flips": 0, "control_flips": 0, "tests": 0,
                                                    "probe_ids": [], "boxes": []})
            row["flips"] += int(self.flips[mine].sum())
            row["control_flips"] += int(self.control_flips[mine].sum())
            row["tests"] += len(mine)
            row["probe_ids"].append(ids[suspect.probe])
            row["boxes"].append(list(suspect.box))
        out = []
        for row in by_class.values():
            row["flip_rate"] = row["flips"] / row["tests"]
            row["control_rate"] = row["control_flips"] / row["tests"]
            if class_names is not None and 0 <= row["class"] < len(class_names):
                row["class_name"] = class_names[row["class"]]
            out.append(row)
        return sorted(out, key=lambda r: (r["control_rate"] - r["flip_rate"], r["class"]))

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


def window_energy(maps: torch.Tensor, side: tuple[int, int]) -> torch.Tensor:
    """(N, h - bh + 1, w - bw + 1): the map energy inside every window of ``side`` cells."""
    return F.avg_pool2d(maps.float().clamp_min(0)[:, None], side, stride=1)[:, 0] * (side[0] * side[1])


def window_side(grid: tuple[int, int], box_cells: int) -> tuple[int, int]:
    """The candidate window in cells: ``box_cells`` a side, at most the grid."""
    return min(box_cells, grid[0]), min(box_cells, grid[1])


def window_at(index: int, energy_width: int, side: tuple[int, int]) -> torch.Tensor:
    """The (y0, x0, y1, x1) cell box of flat window ``index`` in a window-energy map ``energy_width`` wide."""
    y, x = divmod(int(index), energy_width)
    return torch.tensor([y, x, y + side[0], x + side[1]])


def cells_to_pixels(box: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> Box:
    """A (y0, x0, y1, x1) box of grid cells as image pixels (each cell covers its stride)."""
    sy, sx = image_size[0] / grid[0], image_size[1] / grid[1]
    y0, x0, y1, x1 = box.tolist()
    return (int(math.floor(y0 * sy)), int(math.floor(x0 * sx)),
            min(image_size[0], int(math.ceil(y1 * sy))), min(image_size[1], int(math.ceil(x1 * sx))))


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


def find_suspects(maps: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor, image_size: tuple[int, int],
                  settings: DiscoverySettings, windows: "Windows | None" = None) -> list[Suspect]:
    """Every probe classified correctly with a non-zero map, with its best-credited window, most
    concentrated first (no gate: the paired tests decide, not a share of energy). ``windows``: the
    maps' windows when the caller has them already (:meth:`Windows.of`)."""
    windows = windows or Windows.of(maps, window_side(tuple(maps.shape[-2:]), settings.box_cells), image_size)
    total = maps.float().clamp_min(0).flatten(1).sum(1)
    best, idx = windows.energy.max(1)
    ok = (preds == targets) & (total > 0)
    suspects = [Suspect(i, int(targets[i]), windows.boxes[int(idx[i])], float(best[i] / total[i]))
                for i in ok.nonzero()[:, 0].tolist()]
    return sorted(suspects, key=lambda s: (-s.share, s.probe))


def fit_box(box: Box, size: tuple[int, int], image_size: tuple[int, int]) -> Box:
    """``box``'s top-left with ``size``, moved back inside the image."""
    y = min(box[0], image_size[0] - size[0])
    x = min(box[1], image_size[1] - size[1])
    return y, x, y + size[0], x + size[1]


@dataclass
class Windows:
    """Every window of ``side`` cells of a set of maps: its energy per map (N, K) and its pixel box."""

    energy: torch.Tensor
    boxes: list[Box]
    corners: torch.Tensor  # (K, 4) the boxes as a tensor

    @classmethod
    def of(cls, maps: torch.Tensor, side: tuple[int, int], image_size: tuple[int, int]) -> "Windows":
        grid = tuple(maps.shape[-2:])
        energy = window_energy(maps, side)
        width = energy.shape[-1]
        boxes = [cells_to_pixels(window_at(i, width, side), grid, image_size) for i in range(width * energy.shape[-2])]
        return cls(energy.flatten(1), boxes, torch.tensor(boxes, dtype=torch.long).reshape(-1, 4))

    def clear_of(self, box: Box) -> torch.Tensor:
        """(K,) bool: which windows do not overlap ``box`` (image pixels)."""
        c = self.corners
        return (c[:, 2] <= box[0]) | (c[:, 0] >= box[2]) | (c[:, 3] <= box[1]) | (c[:, 1] >= box[3])


def control_box(windows: Windows, source: int, avoid: Box, size: tuple[int, int], image_size: tuple[int, int]) -> Box:
    """Map ``source``'s next most-credited window: the one of most energy among those not
    overlapping ``avoid`` (the first such on ties; any window when none is free), ``size`` pixels."""
    free = windows.clear_of(avoid)
    if not free.any():
        free = torch.ones_like(free)
    energy = torch.where(free, windows.energy[source].double(), -math.inf)
    return fit_box(windows.boxes[int(energy.argmax())], size, image_size)


def credited_place(windows: Windows, recipient: int, size: tuple[int, int], image_size: tuple[int, int]) -> Box:
    """The recipient's most-credited window (what its map reads as its evidence), ``size`` pixels."""
    return fit_box(windows.boxes[int(windows.energy[recipient].argmax())], size, image_size)


def recipients_of(suspects: list[Suspect], targets: torch.Tensor, preds: torch.Tensor, num: int,
                  gen: torch.Generator, weights: dict[int, float] | None = None) -> list[tuple[int, int]]:
    """Up to ``num`` (suspect, recipient) pairs: suspects round-robin (one of each class before a
    second of any), each into recipients it has not met yet, in a seeded order. A recipient neither
    belongs to nor is predicted as the suspect's class, so a flip is a change.

    With ``weights`` (class -> weight, from the evidence so far), half the pairs go round-robin as
    above and the other half to the classes in proportion to their weights (:func:`follow_evidence`).
    """
    if weights:
        pairs = recipients_of(suspects, targets, preds, num - num // 2, gen)
        return pairs + follow_evidence(suspects, targets, preds, num - len(pairs), gen, weights, set(pairs))
    order = round_robin(suspects)[:num]
    queues = {s: _recipients(suspects[s].cls, targets, preds, gen) for s in order}
    pairs: list[tuple[int, int]] = []
    while len(pairs) < num and any(queues[s] for s in order):
        for s in order:
            if len(pairs) < num and queues[s]:
                pairs.append((s, queues[s].pop(0)))
    return pairs


def round_robin(suspects: list[Suspect]) -> list[int]:
    """The suspects' indices, one of each class before a second of any (in their order within a class)."""
    seen: dict[int, int] = {}
    rank = []
    for suspect in suspects:
        rank.append(seen.get(suspect.cls, 0))
        seen[suspect.cls] = rank[-1] + 1
    return sorted(range(len(suspects)), key=lambda s: (rank[s], s))


def sources_of(suspects: list[Suspect], num: int) -> list[Pair]:
    """Up to ``num`` single-image tests, each suspect at most once, classes in turn (:func:`round_robin`)."""
    return [Pair(s, suspects[s].probe) for s in round_robin(suspects)[:num]]


def _recipients(cls: int, targets: torch.Tensor, preds: torch.Tensor, gen: torch.Generator) -> list[int]:
    """The probes a suspect of class ``cls`` can be pasted into, in a seeded order."""
    ok = ((targets != cls) & (preds != cls)).nonzero()[:, 0]
    return ok[torch.randperm(len(ok), generator=gen)].tolist()


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


def follow_evidence(suspects: list[Suspect], targets: torch.Tensor, preds: torch.Tensor, num: int,
                    gen: torch.Generator, weights: dict[int, float], taken: set[tuple[int, int]]
                    ) -> list[tuple[int, int]]:
    """Up to ``num`` pairs not in ``taken``, shared among the suspects' classes in proportion to
    ``weights`` (largest remainder), each class's suspects in turn. The weights come from earlier
    evaluations only, so every pair's factor keeps its mean under the null (the e-values stay valid)."""
    classes = sorted({s.cls for s in suspects})
    if num <= 0 or not classes:
        return []
    counts = share_out(num, [weights.get(k, 1.0) for k in classes])
    pairs: list[tuple[int, int]] = []
    for k, count in zip(classes, counts):
        members = [i for i, s in enumerate(suspects) if s.cls == k]
        fresh = [(m, r) for r in _recipients(k, targets, preds, gen) for m in members if (m, r) not in taken]
        pairs += fresh[:count]  # each recipient meets the class's suspects in turn
    return pairs


def plan_tests(suspects: list[Suspect], maps: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor,
               image_size: tuple[int, int], num_tests: int, box_cells: int, gen: torch.Generator,
               windows: "Windows | None" = None, weights: dict[int, float] | None = None) -> list[PasteTest]:
    """Up to ``num_tests`` local paste tests (see the module docstring); ``weights``: see :func:`recipients_of`."""
    pairs = recipients_of(suspects, targets, preds, num_tests, gen, weights)
    if not pairs:
        return []
    windows = windows or Windows.of(maps, window_side(tuple(maps.shape[-2:]), box_cells), image_size)
    tests = []
    for s, r in pairs:
        box = suspects[s].box
        size = (box[2] - box[0], box[3] - box[1])
        tests.append(PasteTest(s, r, control_box(windows, suspects[s].probe, box, size, image_size),
                               credited_place(windows, r, size, image_size)))
    return tests


def marks_testable(masks: torch.Tensor | None) -> bool:
    """Whether the marked arm has anything to test: some probe's spurious mask marks a region that
    can be moved clear of itself (:func:`~cam_monitor.interventions.markable`)."""
    return masks is not None and bool(markable(masks).any())


def arms_run(settings: DiscoverySettings, grid: tuple[int, int], probes: ProbeSet) -> tuple[str, ...]:
    """The arms that run for ``probes`` on a layer of ``grid`` cells (:meth:`DiscoverySettings.arms_on`,
    the marked arm where their masks give it something to test): fixed for a run."""
    return settings.arms_on(grid, probes.image_size, marks_testable(probes.spurious_masks))


def marked_pairs(suspects: list[Suspect], masks: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor,
                 num: int, gen: torch.Generator) -> list[Pair]:
    """Up to ``num`` pairs of the marked arm: the suspects whose probe's mark is
    :func:`~cam_monitor.interventions.markable`, each into recipients of another class
    (:func:`recipients_of`); indices into ``suspects``."""
    usable = markable(masks)
    keep = [i for i, s in enumerate(suspects) if usable[s.probe]]
    return [Pair(keep[s], r) for s, r in recipients_of([suspects[i] for i in keep], targets, preds, num, gen)]


def detail_runs(grid: tuple[int, int]) -> bool:
    """Whether the detail arm runs on a layer of this grid (at least :data:`MIN_DETAIL_GRID` cells a side)."""
    return min(grid) >= MIN_DETAIL_GRID


def pastes(suspects: list[Suspect], tests: list[PasteTest]) -> list[Paste]:
    """The local tests as pastes (:func:`~cam_monitor.interventions.pasted_images`): every test's
    candidate box, then every test's control box, each at the test's place in its recipient."""
    return ([Paste(suspects[t.suspect].probe, suspects[t.suspect].box, t.recipient, t.place) for t in tests]
            + [Paste(suspects[t.suspect].probe, t.control_box, t.recipient, t.place) for t in tests])


def discover(maps: torch.Tensor, probes: ProbeSet, targets: torch.Tensor, preds: torch.Tensor, predict: Predict,
             settings: DiscoverySettings, step: int = 0, evidence: EvidenceState | None = None) -> Discovery:
    """Find candidates in ``maps`` (N, h, w), plan ``budget`` x N pasted images over the arms, run them.

    ``predict`` classifies a CPU batch of pasted images (it does the device placement, batching and
    any cross-rank sharding); it is called twice, once per stage, and with an empty batch never.
    The first stage's ``settings.first_stage`` share of the pairs goes to the arms equally, the rest in
    proportion to :func:`second_stage_weights` among the arms with planned pairs left
    (:func:`open_shares`; decided before those pairs are classified, so the e-values stay valid),
    and with ``per_class`` half of the local arm's planned pairs follow the classes' evidence
    (:func:`follow_evidence`): a class whose own stream has grown gets more of them, so a cue in one
    class is confirmed without waiting for the round-robin share of that class.
    """
    image_size, grid = probes.image_size, tuple(maps.shape[-2:])
    windows = Windows.of(maps, window_side(grid, settings.box_cells), image_size)
    ready = beats_chance(targets, preds, settings.skill_level)
    suspects = find_suspects(maps, targets, preds, image_size, settings, windows) if ready else []
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    marks = probes.spurious_masks
    runs = arms_run(settings, grid, probes)
    images = probes.images
    src = lambda pairs: [suspects[p.suspect].probe for p in pairs]  # noqa: E731
    dst = lambda pairs: [p.recipient for p in pairs]  # noqa: E731
    makers: dict[str, Callable[[list[Pair]], torch.Tensor]] = {}
    objects = object_regions(maps, image_size) if {"global", "texture"} & set(runs) else None
    if "global" in runs:
        makers["global"] = lambda pairs: spectrum_images(images, objects, src(pairs), dst(pairs))
    if "colour" in runs:
        makers["colour"] = lambda pairs: colour_images(images, src(pairs), dst(pairs))
    bands = border_bands(image_size, settings.border_band)
    if "border" in runs and bands is not None:  # arms_on runs the border arm only where the bands exist
        makers["border"] = lambda pairs: banded_images(images, src(pairs), dst(pairs), bands)
    if "detail" in runs:
        makers["detail"] = lambda pairs: detail_images(images, src(pairs), grid, gen)
    if "texture" in runs:
        makers["texture"] = lambda pairs: background_detail_images(images, objects, grid, src(pairs), dst(pairs))
    if MARKED in runs:  # its own generator: the other arms draw as they would without masks
        places = torch.Generator().manual_seed(settings.seed * 1_000_003 + step + 1)
        makers[MARKED] = lambda pairs: marked_images(images, marks, src(pairs), dst(pairs), places)
    follow = evidence is not None and bool(evidence.log_detector)  # from the second evaluation on
    arms = (LOCAL, *makers)
    total = int(settings.budget * len(probes)) // 2
    classes = tuple(sorted({s.cls for s in suspects}))
    tests = plan_tests(suspects, maps, targets, preds, image_size, total, settings.box_cells, gen, windows,
                       evidence.class_weights(LOCAL, classes) if follow and settings.per_class else None)
    planned = {arm: sources_of(suspects, total) if arm == "detail" else
               marked_pairs(suspects, marks, targets, preds, total, gen) if arm == MARKED else
               [Pair(s, r) for s, r in recipients_of(suspects, targets, preds, total, gen)] for arm in makers}
    plans: dict[str, list[Any]] = {LOCAL: tests, **planned}

    def run(spans: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Classify the planned pairs ``plans[arm][a:b]`` of every arm in one batch: per arm, whether
        each test and each control turned the prediction into the suspect's class."""
        chosen = {arm: plans[arm][a:b] for arm, (a, b) in spans.items()}
        parts = [pasted_images(images, pastes(suspects, chosen[LOCAL]))]
        parts += [makers[arm](chosen[arm]) for arm in makers]
        batch = torch.cat(parts)
        out = predict(batch).cpu() if len(batch) else torch.zeros(0, dtype=torch.long)
        result, start = {}, 0
        for arm in arms:
            n = len(chosen[arm])
            cls = torch.tensor([suspects[i.suspect].cls for i in chosen[arm]], dtype=torch.long)
            result[arm] = (out[start:start + n] == cls, out[start + n:start + 2 * n] == cls)
            start += 2 * n
        return result

    first = int(total * settings.first_stage)
    spans = {arm: (0, min(n, len(plans[arm]))) for arm, n in arm_shares(first, arms).items()}
    found = run(spans)
    weights = second_stage_weights({arm: f.long() - c.long() for arm, (f, c) in found.items()}, evidence, settings)
    second = open_shares(total - first, {arm: len(plans[arm]) - spans[arm][1] for arm in arms}, weights)
    spans = {arm: (spans[arm][1], min(spans[arm][1] + second[arm], len(plans[arm]))) for arm in arms}
    more = run(spans)
    both = {arm: (torch.cat([found[arm][0], more[arm][0]]), torch.cat([found[arm][1], more[arm][1]])) for arm in arms}
    ran = {arm: spans[arm][1] for arm in arms}
    paired = {arm: PairedArm(plans[arm][:ran[arm]], *both[arm]) for arm in makers}
    return Discovery(suspects, tests[:ran[LOCAL]], *both[LOCAL], paired, waiting=not ready, arms=runs)
