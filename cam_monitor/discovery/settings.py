"""What mask-free discovery runs: its arms, their names, the user's settings, and which arms run
for a probe set on a layer (fixed for a run).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..evidence import check_bet
from ..interventions import MAX_BORDER_BAND, border_bands, markable
from ..probes import ProbeSet
from ..probes.recurrence import recurring_of

#: The confirmation arms: local paste, background spectrum swap, colour statistics swap, border band
#: swap, cell shuffle against blur, background fine detail against the object's, content that recurs
#: across probes (drawn the same, to within noise and compression) against content from elsewhere
#: (where there is any), and (where the probes carry spurious masks) the marked region against one
#: from elsewhere.
ARMS = ("local", "global", "colour", "border", "detail", "texture", "recurring", "marked")
MARKED = ARMS[-1]
RECURRING = ARMS[-2]
LOCAL = ARMS[0]
#: What each arm tests, in the words an alert uses.
TEST_NAMES = {"local": "a local region (paste test)", "global": "the background's texture (spectrum swap)",
              "colour": "colour statistics (per-channel median and spread swap)",
              "border": "the border band (band swap)",
              "detail": "fine detail within cells (cell shuffle against a blur)",
              "texture": "the background's fine detail (background detail against the object's)",
              "recurring": "content drawn the same in several probes (pasted against content from elsewhere)",
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
            reference). The recurring arm runs the same test on the pixels it finds but takes the
            common margin, ``min_effect``: its boxes take in an edge around the cue, which beside
            an object (a ruler beside a digit) holds a sliver of it, and its graded pairs see that
            (measured on controls: see the reference).
        recurring_gain_scale: how the recurring arm scores a pair: the probability of the source's
            class that the test gives the recipient minus what its control gives, over this scale,
            clipped to [-1, 1] (:func:`graded`), where the other arms count only predictions that
            turn into that class. A model that reads a stamp, a tag or a ruler beside the object
            raises the cue's class on most recipients without turning many of them; graded, such
            cues were confirmed up to two evaluations sooner (measured: see the reference), and
            the null is the flips' (test and control exchangeable, or the control the stronger).
            0.1: a test that gives 10 points more than its control counts as a turned prediction.
            The marked arm still counts flips (its false-alarm campaign with masks was measured so).
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
        recurring_test: run the recurring arm where some probes share content drawn the same at
            any place, to within sensor noise and JPEG compression (a stamp, a burnt-in tag, a
            ruler, a watermark:
            :func:`~cam_monitor.probes.recurrence.recurring_masks`, which reads the probes only,
            once per probe set): the marked arm's test on the pixels found, so a cue wider than a
            cell of the layer is tested whole without masks. Finds nothing where objects never
            repeat (photographs, scans); see the reference for what it finds on synthetic
            objects.
        recurring_tolerant: besides copies of the same pixels, let the recurring arm find copies
            that sensor noise or JPEG compression made differ a little (the tolerant keys of
            :func:`~cam_monitor.probes.recurrence.recurring_masks`, used only for probes where no
            exact copy is found). False keeps exact copies only: a finder 1.4 to 2.5 times
            cheaper, once per probe set, that misses most copies in noisy or compressed images.
        recurring_turned: let the recurring arm also find copies turned by quarter turns or
            mirrored (a ruler or a scale bar laid along whichever side of the object, a marker on
            a mirrored scan: each probe's content against the other probes turned by the square's
            eight symmetries). False finds copies at the same orientation only: a finder 1.4 to 7
            times cheaper, once per probe set (about 110 s against 16 s for 64 noisy 224 px probes
            on one core), that misses a ruler laid along different sides in different probes.
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
    recurring_gain_scale: float = 0.1
    first_stage: float = FIRST_STAGE
    bet: float = 0.7
    detail_bet: float = 0.3
    global_test: bool = False
    colour_test: bool = True
    border_test: bool = True
    border_band: float = 0.1
    detail_test: bool = True
    texture_test: bool = True
    recurring_test: bool = True
    recurring_tolerant: bool = True
    recurring_turned: bool = True
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
        if not 0 < self.recurring_gain_scale <= 1:
            raise ValueError(f"discovery recurring_gain_scale must be in (0, 1] (the gain in the source class's "
                             f"probability that counts as a turned prediction), got {self.recurring_gain_scale!r}")
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
    def gain_scales(self) -> dict[str, float]:
        """The arms scored by graded gains (:func:`graded`), each with its scale."""
        return {RECURRING: self.recurring_gain_scale}

    @property
    def bets(self) -> dict[str, float]:
        """Each arm's stake per pair (:func:`~cam_monitor.evidence.arm_value` reads it per stream)."""
        return {arm: self.detail_bet if arm == "detail" else self.bet for arm in ARMS}

    @property
    def arms(self) -> tuple[str, ...]:
        """The mask-free arms this evaluation runs, in :data:`ARMS` order (the recurring and marked
        arms join them where the probes give them something to test: :meth:`arms_on`)."""
        on = {LOCAL: True, "global": self.global_test, "colour": self.colour_test, "border": self.border_test,
              "detail": self.detail_test, "texture": self.texture_test}
        return tuple(a for a in ARMS if on.get(a, False))

    def arms_on(self, grid: tuple[int, int], image_size: tuple[int, int], marked: bool = False,
                recurring: bool = False) -> tuple[str, ...]:
        """The arms that run on a layer of ``grid`` cells and images of ``image_size``: :attr:`arms`
        less the border arm where the images have no inner band as large as the border band
        (:func:`~cam_monitor.interventions.border_bands`) and the detail and texture arms on a grid
        too coarse (:func:`detail_runs`), plus the recurring arm where ``recurring`` (some probe
        holds recurring content it can test) and ``recurring_test``, and the marked arm where
        ``marked`` (some probe has a mark it can test: :func:`marks_testable`) and ``marked_test``.
        Fixed for a run, so the evidence is the mean of the arms that can gather any: an arm that
        cannot run would hold its detector at 1 and dilute the others'."""
        fine = detail_runs(grid)
        can = {"border": border_bands(image_size, self.border_band) is not None, "detail": fine, "texture": fine}
        extra = (((RECURRING,) if recurring and self.recurring_test else ())
                 + ((MARKED,) if marked and self.marked_test else ()))
        return tuple(a for a in self.arms if can.get(a, True)) + extra


def graded(gains: torch.Tensor, scale: float) -> torch.Tensor:
    """Paired outcomes in [-1, 1] from ``gains`` (the source class's probability on each test
    image minus on its control): ``gains / scale``, clipped. Under the null (test and control
    exchangeable, or the control the stronger) their mean is at most 0, as the flips' is."""
    return (gains.double() / scale).clamp(-1.0, 1.0)


def marks_testable(masks: torch.Tensor | None) -> bool:
    """Whether the marked arm has anything to test: some probe's spurious mask marks a region that
    can be moved clear of itself (:func:`~cam_monitor.interventions.markable`)."""
    return masks is not None and bool(markable(masks).any())


def arms_run(settings: DiscoverySettings, grid: tuple[int, int], probes: ProbeSet) -> tuple[str, ...]:
    """The arms that run for ``probes`` on a layer of ``grid`` cells (:meth:`DiscoverySettings.arms_on`,
    the recurring arm where content recurs in them, the marked arm where their masks give it
    something to test): fixed for a run."""
    recurring = settings.recurring_test and marks_testable(recurring_in(probes, settings))
    return settings.arms_on(grid, probes.image_size, marks_testable(probes.spurious_masks), recurring)


def recurring_in(probes: ProbeSet, settings: DiscoverySettings) -> torch.Tensor:
    """The recurring arm's marks in ``probes``: what the recurrence finder, with the keys and turns
    ``settings`` choose, finds in them (computed once per probe set,
    :func:`~cam_monitor.probes.recurrence.recurring_of`)."""
    return recurring_of(probes.images, settings.recurring_tolerant, settings.recurring_turned)


def detail_runs(grid: tuple[int, int]) -> bool:
    """Whether the detail arm runs on a layer of this grid (at least :data:`MIN_DETAIL_GRID` cells a side)."""
    return min(grid) >= MIN_DETAIL_GRID
