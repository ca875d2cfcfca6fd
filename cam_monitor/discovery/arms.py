"""Mask-free shortcut discovery and its causal confirmation, from maps already computed.

Eight interventions (the global one opt-in, the recurring one where content recurs across the
probes, the marked one where the probes carry spurious masks),
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

**Recurring cues** (a floating stamp, a burnt-in tag, a ruler drawn the same wherever it sits). The
marked arm's test, on the boxes :func:`~cam_monitor.probes.recurrence.recurring_masks` finds from
the probes alone (content that recurs, to within noise and compression, in other probes at
another place), with its own generator: the cue's place comes from the data, not from the model's
credit, so a cue wider than a cell is tested whole without masks. Its pairs are graded: the gain in the source class's
probability of the test over its control, scaled and clipped
(:func:`~cam_monitor.discovery.settings.graded`), since a model that reads the object first and
the cue second raises the cue's class on most recipients and turns few of them.

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

from typing import Any, Callable

import torch

from ..evidence import EvidenceState
from ..interventions import (background_detail_images, banded_images, border_bands, colour_images, detail_images,
                             marked_images, object_regions, pasted_images, spectrum_images)
from ..probes import ProbeSet
from .allocation import arm_shares, open_shares, second_stage_weights
from .candidates import (Pair, Windows, find_suspects, marked_pairs, pastes, plan_tests, recipients_of,
                         sources_of, window_side)
from .outcome import Discovery, PairedArm
from .settings import LOCAL, MARKED, RECURRING, DiscoverySettings, arms_run, recurring_in
from .skill import beats_chance

Predict = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) CPU images -> (B, K) class scores (logits)


def discover(maps: torch.Tensor, probes: ProbeSet, targets: torch.Tensor, preds: torch.Tensor, predict: Predict,
             settings: DiscoverySettings, step: int = 0, evidence: EvidenceState | None = None) -> Discovery:
    """Find candidates in ``maps`` (N, h, w), plan ``budget`` x N pasted images over the arms, run them.

    ``predict`` scores a CPU batch of pasted images, (B, K) logits (it does the device placement,
    batching and any cross-rank sharding); it is called twice, once per stage, and with an empty
    batch never.
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
    runs = arms_run(settings, grid, probes)
    marks = {MARKED: probes.spurious_masks, RECURRING: recurring_in(probes, settings) if RECURRING in runs else None}
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
    for arm, offset in ((RECURRING, 2), (MARKED, 1)):  # own generators: the other arms draw as they would without
        if arm in runs:
            places = torch.Generator().manual_seed(settings.seed * 1_000_003 + step + offset)
            makers[arm] = lambda pairs, m=marks[arm], g=places: marked_images(images, m, src(pairs), dst(pairs), g)
    follow = evidence is not None and bool(evidence.log_detector)  # from the second evaluation on
    arms = (LOCAL, *makers)
    total = int(settings.budget * len(probes)) // 2
    classes = tuple(sorted({s.cls for s in suspects}))
    tests = plan_tests(suspects, maps, targets, preds, image_size, total, settings.box_cells, gen, windows,
                       evidence.class_weights(LOCAL, classes) if follow and settings.per_class else None)
    planned = {arm: sources_of(suspects, total) if arm == "detail" else
               marked_pairs(suspects, marks[arm], targets, preds, total, gen) if arm in marks else
               [Pair(s, r) for s, r in recipients_of(suspects, targets, preds, total, gen)] for arm in makers}
    plans: dict[str, list[Any]] = {LOCAL: tests, **planned}

    def run(spans: dict[str, tuple[int, int]]) -> dict[str, PairedArm]:
        """Classify the planned pairs ``plans[arm][a:b]`` of every arm in one batch: per arm, whether
        each test and each control turned the prediction into the suspect's class, and the gain
        in that class's probability of each test over its control."""
        chosen = {arm: plans[arm][a:b] for arm, (a, b) in spans.items()}
        parts = [pasted_images(images, pastes(suspects, chosen[LOCAL]))]
        parts += [makers[arm](chosen[arm]) for arm in makers]
        batch = torch.cat(parts)
        probs = predict(batch).cpu().float().softmax(1) if len(batch) else torch.zeros(0, 1)
        out, result, start = probs.argmax(1), {}, 0
        for arm in arms:
            n = len(chosen[arm])
            cls = torch.tensor([suspects[i.suspect].cls for i in chosen[arm]], dtype=torch.long)
            test, control = slice(start, start + n), slice(start + n, start + 2 * n)
            gains = probs[test].gather(1, cls[:, None])[:, 0] - probs[control].gather(1, cls[:, None])[:, 0]
            result[arm] = PairedArm(chosen[arm], out[test] == cls, out[control] == cls, gains, scales.get(arm))
            start += 2 * n
        return result

    scales = settings.gain_scales
    first = int(total * settings.first_stage)
    spans = {arm: (0, min(n, len(plans[arm]))) for arm, n in arm_shares(first, arms).items()}
    found = run(spans)
    weights = second_stage_weights({arm: f.outcomes for arm, f in found.items()}, evidence, settings)
    second = open_shares(total - first, {arm: len(plans[arm]) - spans[arm][1] for arm in arms}, weights)
    spans = {arm: (spans[arm][1], min(spans[arm][1] + second[arm], len(plans[arm]))) for arm in arms}
    more = run(spans)
    both = {arm: found[arm].then(more[arm]) for arm in arms}
    local = both.pop(LOCAL)
    return Discovery(suspects, local.pairs, local.flips, local.control_flips, both, waiting=not ready, arms=runs,
                     marks={arm: mask for arm, mask in marks.items() if arm in makers})
