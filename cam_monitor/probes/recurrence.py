"""Content that recurs across probes, wherever it sits, to within sensor noise and compression: a
finder of burnt-in cues that reads the probes only, never the model.

A stamp, a burnt-in text tag, a ruler or a watermark is drawn by a machine: the same pixels in
every image that carries it, at whatever place, up to the noise and the compression the image
went through afterwards. An object is not: two photographs, scans or drawings of the same kind of
thing never agree over a patch of any size. So a patch of one probe that reappears, shifted as
one piece (or turned: see below), in several other probes is a candidate cue, found without the
model's credit, which on any model points at the most class-bearing part of the object (the
reason the mask-free paste
test cannot size a window for a cue wider than one cell: see the reference, "Mask-free shortcut
discovery", item 2). The marked arm then tests the found pixels as it tests a user's marks.

Each structured pixel (one whose 3 x 3 neighbourhood spans at least :data:`STRUCTURE` of the
probes' value range) gets an exact key: its own colour, and for each pixel of its 5 x 5
neighbourhood that colour where it is within :data:`CLOSE` of the centre, else only whether it is
brighter or darker. An overlay on a varied background (a white tag over blotches) keeps its keys,
because the background shows through only as "darker"; an object's edge does not, because its
own colour differs from image to image. Two probes agree at a shift where at least ``min_pixels``
pixels have equal keys at that shift; a pixel is found where it agrees so with at least
``partners`` other probes (a pair of images can share a piece by chance; a cue recurs wherever it
is used). Exact keys need the copies the same to within about half a percent of the value range:
under Gaussian noise of 1 % (2.5 grey levels of 255) they found the zoo's cues in at most a fifth
of the probes carrying them, after a JPEG encoding at quality 90 in none. So each pixel also gets
tolerant keys, what noise and compression leave alone: whether each neighbour is brighter, darker
or within :data:`CLOSE` of the centre (over the channels' mean, which averages the noise), and the
centre's colour on :data:`TOLERANT_LEVELS` levels, in :data:`TOLERANT_TABLES` tables whose levels
are offset by a share of a level (a copy that noise moved across a level's edge in one table
shares a level in another). A tolerant key says less about its pixel, so pieces of objects agree more often: the
strokes of three '1's of a digits probe set (16 grey levels) agreed on 24 pixels at a shift, the
edges of three drawn shapes of one class agreed too, and the strokes beside a stamp joined its
box. So a tolerant table needs :data:`TOLERANT_AGREEMENT` times ``min_pixels``, skips keys seen
more than :data:`TOLERANT_COMMON` times per probe (a stroke's keys recur in most digits), and
counts a pixel found only with :data:`TOLERANT_PARTNERS` more partners; and a probe's finds are
the exact keys' wherever those find anything in it: the tolerant keys speak only where noise or
compression left no exact agreement, and clean probes are found as before. Measured on the zoo's
probes (``benchmarks/bench_finder_tolerance.py``; the reference, "Mask-free shortcut discovery",
item 11).

Each piece found is then boxed (:func:`boxed`), pieces with gaps narrower than a neighbourhood as one: a
ruler's ticks, a tag's glyphs and the rim of a stamp are found in pieces (the flat gaps between
them are not keyed), and a box per piece pasted a ruler with its bar cut between the ticks (on
Drawn Shapes the boxes held a median of 47 % of a ruler's box and 68-94 % of a stamp's; joined, 75 %
and 100 %; see the reference, "Mask-free shortcut discovery", item 11).

A machine may also lay its drawing turned: a ruler along whichever side of the object, a scale
bar upright or flat, a marker on a scan stored mirrored. So each probe is matched against the
others as they are and turned by each other symmetry of a square (:data:`TURNS`: quarter turns,
each mirrored or not; :func:`turn`); one unfold per image keys all eight, a turned image's keys
being its neighbourhoods' features in turned places. A turned partner's key counts only where
it is not seen more often than the table's cap per probe and way (an object's edges are common
in every direction); the cap and the pairs at the probes' own orientation are as without turns,
so turns only add agreeing pairs. On the zoo's rulers (drawn along one of four sides, so of the six
or so probes of a class few share a side) they raised the probes found from 56 to 224 of 256 on
clean digits and from 3 to 119 under noise (``benchmarks/bench_finder_tolerance.py``).

Only shifts of at least :data:`MIN_SHIFT` pixels (along either axis) count. Content at the same
place in several probes is what aligned images share: centred digits, registered scans, the
same anatomy in the same place, whose pieces can agree pixel for pixel where the images are
quantised (the zoo's digits, 16 grey levels, did: a digits control whose probes' backgrounds
all took their class's cast level raised a false alarm on its strokes before this guard, see
the reference). A burnt-in cue that moves recurs at other places; one at a fixed place (a
corner stamp, a frame) is the local and border tests' to find.

A probe whose boxes cover more than :data:`MAX_SHARE` of it keeps none: what recurs there is
background (a texture, a pattern), which lies around and under the object, so no box of its
size elsewhere in the probe can be its control (on a digits texture control the boxes took in
the digit and the arm raised a false alarm, see the reference); the detail and texture tests
are for those. The zoo's stamps, tags and rulers covered at most 9 % of their probes, its
textures a median of 19 % to 43 %. Where most of the probes with a find keep none, what recurs
in the probe set is a background pattern, and its small pieces in the other probes are the same
pattern where the object or a bright image hides the rest (a grating behind drawn shapes shows
only where the image is darker): then no probe keeps a box, so an arm that cannot test a texture
does not take a share of the evidence from the arms that can.

The least agreement is a count of pixels, not a share of the image: a tag is as many pixels in
a large image as in a small one. :data:`MIN_PIXELS` is measured on the zoo's two bases (the
reference, "Mask-free shortcut discovery", item 11): drawn shapes on varied backgrounds never
agree by chance, even at 8 pixels; the digits, 8 x 8 scans of 16 grey levels upsampled three
times, share pieces of strokes of up to about 20 pixels in a few probes of 64.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

#: Quantisation of colours in the exact keys, levels per channel over the probes' value range.
LEVELS = 32
#: Quantisation of a keyed pixel's own colour in the tolerant keys, levels per channel.
TOLERANT_LEVELS = 16
#: Tables of tolerant keys, each with the levels moved by ``1 / TOLERANT_TABLES`` of a level: two
#: copies of a pixel that noise put on either side of a level's edge in one table share a level in
#: another.
TOLERANT_TABLES = 2
#: The least agreement in a table of tolerant keys, as a multiple of ``min_pixels``: a tolerant
#: key says less about its pixel, and pieces of objects agree on more pixels (see the module's
#: docstring).
TOLERANT_AGREEMENT = 4 / 3
#: Tolerant keys seen more often than this many times per probe place nothing and are skipped.
TOLERANT_COMMON = 2
#: How many more partners a pixel needs in the tolerant tables than in the exact one: three
#: shapes of one class in a Drawn Shapes probe set agreed on their edges in two partners.
TOLERANT_PARTNERS = 1
#: The least range of a 3 x 3 neighbourhood, as a share of the probes' value range, for its centre
#: to be keyed: flat regions (a background, a filled object) match everywhere and place nothing.
STRUCTURE = 0.1
#: A neighbour within this share of the value range of the centre (every channel) is keyed by its
#: colour; one further away only by whether it is brighter.
CLOSE = 0.1
#: The symmetries of a square (quarter turns, each mirrored or not) a recurring drawing may take.
TURNS = 8
#: Side of the keyed neighbourhood, pixels.
NEIGHBOURHOOD = 5
#: Keys seen more often than this many times per probe place nothing and are skipped.
COMMON = 4
#: The least number of pixels two probes must agree on at one shift (see the module's docstring).
MIN_PIXELS = 24
#: Found pieces that gaps of at most ``2 * JOIN`` pixels separate (narrower than one
#: :data:`NEIGHBOURHOOD`) are one mark and get one box (:func:`boxed`).
JOIN = NEIGHBOURHOOD // 2
#: The most of a probe its boxes may cover; beyond it the probe's recurring content is background.
MAX_SHARE = 1 / 8
#: The least shift, pixels along either axis, at which two probes' agreement counts: one
#: neighbourhood, so the two places do not share a keyed pixel (see the module's docstring).
MIN_SHIFT = NEIGHBOURHOOD


def pixel_keys(images: torch.Tensor, offset: float | None = None,
               turned: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per way of seeing ``images`` (N, C, H, W), as they are and, with ``turned``, as each of the
    other symmetries of a square turns them (:func:`turn`): (N, H'*W') int64 keys of every pixel,
    exact (``offset`` None) or tolerant with the colour levels moved by ``offset`` of a level, and
    (N, H'*W') whether the pixel is structured enough to key (:mod:`this module
    <cam_monitor.probes.recurrence>`). A turned image's keys are its neighbourhoods' features
    in turned places, so each image is unfolded once for all eight. One image at a time: the
    neighbourhoods of a whole probe set of 224 px images would take gigabytes."""
    low, high = images.amin(), images.amax()
    x = (images - low) / (high - low).clamp_min(1e-12)
    n, c, h, w = x.shape
    weights = torch.randint(1, 2 ** 62, (NEIGHBOURHOOD ** 2 + c,), generator=torch.Generator().manual_seed(0))
    ways = range(TURNS if turned else 1)
    places = torch.arange(NEIGHBOURHOOD ** 2).view(NEIGHBOURHOOD, NEIGHBOURHOOD)
    mixes = torch.stack([weights.index_put((turn(places, t).flatten(),), weights[:NEIGHBOURHOOD ** 2]) for t in ways])
    keys, structured = zip(*(_image_keys(one, mixes, offset) for one in x))
    keys, structured = torch.stack(keys).view(n, len(ways), h, w), torch.stack(structured).view(n, h, w)
    return [(turn(keys[:, t], t).flatten(1), turn(structured, t).flatten(1)) for t in ways]


def turn(x: torch.Tensor, way: int) -> torch.Tensor:
    """``x`` with its last two axes (an image, a map) turned by one of the :data:`TURNS`
    symmetries of a square: ``way % 4`` quarter turns, then mirrored left to right from 4 on (an
    oblong image turned a quarter is W x H)."""
    turned = torch.rot90(x, way % 4, (-2, -1))
    return turned.flip(-1) if way >= 4 else turned


def _image_keys(x: torch.Tensor, mixes: torch.Tensor, offset: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, H*W) keys, one row per weighting of ``mixes`` (T, K*K + C), and (H*W,) structure of one
    (C, H, W) image already scaled to [0, 1] (:func:`pixel_keys`)."""
    c, h, w = x.shape
    near = F.unfold(x[None], NEIGHBOURHOOD, padding=NEIGHBOURHOOD // 2).view(c, NEIGHBOURHOOD ** 2, h * w)
    features = _exact_features(near, x.flatten(1)) if offset is None else _tolerant_features(near, x.flatten(1), offset)
    spread = F.max_pool2d(x, 3, 1, 1) + F.max_pool2d(-x, 3, 1, 1)
    keys = torch.stack([(features * mix[:, None]).sum(0) for mix in mixes])
    return keys, (spread.amax(0) >= STRUCTURE).flatten()


def _exact_features(near: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(K*K + C, P) features of P pixels, ``near`` (C, K*K, P) their neighbourhoods and ``centre``
    (C, P) their colours: each neighbour's colour on :data:`LEVELS` where it is within
    :data:`CLOSE` of the centre in every channel, else whether it is brighter; then the centre's."""
    levels = (near * (LEVELS - 1)).round().long()
    colour = sum(levels[ch] * LEVELS ** ch for ch in range(near.shape[0]))
    close = ((near - centre[:, None]).abs() <= CLOSE).all(0)
    brighter = (near.mean(0) > centre.mean(0)[None]).long()
    return torch.cat([torch.where(close, colour + 2, brighter), (centre * (LEVELS - 1)).round().long()], 0)


def _tolerant_features(near: torch.Tensor, centre: torch.Tensor, offset: float) -> torch.Tensor:
    """The features of :func:`_exact_features` that noise and compression leave alone: whether each
    neighbour is brighter, darker or within :data:`CLOSE` of the centre (the mean over channels),
    then the centre's colour on :data:`TOLERANT_LEVELS` moved by ``offset`` of a level."""
    step = (near - centre[:, None]).mean(0)
    relation = torch.where(step > CLOSE, 1, torch.where(step < -CLOSE, 0, 2))
    return torch.cat([relation, (centre * TOLERANT_LEVELS + offset).floor().long()], 0)


def _ranks(sizes: torch.Tensor) -> torch.Tensor:
    """0, 1, ..., size - 1 for each of ``sizes``, concatenated."""
    total = int(sizes.sum())
    return torch.arange(total) - (torch.cumsum(sizes, 0) - sizes).repeat_interleave(sizes, output_size=total)


def boxed(found: torch.Tensor, join: int = JOIN) -> torch.Tensor:
    """(N, H, W) bool: every mark of ``found`` replaced by its bounding box, a mark being the pieces
    (8-neighbours) that gaps of at most ``2 * join`` pixels separate. The finder keys structured
    pixels only, so the flat inside of a solid logo, the background between a tag's glyphs or
    between a ruler's ticks is not found itself; the box holds the whole mark, as a user's box
    around it would. ``join=0``: every piece its own box."""
    n, h, w = found.shape
    near = F.max_pool2d(found[:, None].float(), 2 * join + 1, 1, join)[:, 0] > 0 if join else found
    ids = torch.arange(1, n * h * w + 1, dtype=torch.float64).view(n, h, w)
    labels = torch.where(near, ids, torch.zeros((), dtype=torch.float64))
    while True:  # every pixel of a mark's grown pieces takes the mark's largest id
        grown = F.max_pool2d(labels[:, None], 3, 1, 1)[:, 0] * near
        if torch.equal(grown, labels):
            break
        labels = grown
    out = torch.zeros_like(found)
    pieces, piece = labels[found].long().unique(return_inverse=True)
    _, ys, xs = found.nonzero().unbind(1)
    lows = [torch.full((len(pieces),), big).scatter_reduce(0, piece, v, "amin") for v, big in ((ys, h), (xs, w))]
    highs = [torch.zeros(len(pieces), dtype=torch.long).scatter_reduce(0, piece, v, "amax") for v in (ys, xs)]
    for label, y0, x0, y1, x1 in zip(pieces.tolist(), *(t.tolist() for t in (*lows, *highs))):
        out[(label - 1) // (h * w), y0:y1 + 1, x0:x1 + 1] = True
    return out


def recurring_masks(images: torch.Tensor, min_pixels: int = MIN_PIXELS, partners: int = 2,
                    tolerant: bool = True, turned: bool = True) -> torch.Tensor:
    """(N, H, W) bool: :func:`recurring_boxes` without background (:func:`without_background`):
    none in a probe they would cover more than :data:`MAX_SHARE` of, and none at all where those
    are most of the probes with one. Reads the images only; deterministic."""
    return without_background(recurring_boxes(images, min_pixels, partners, tolerant, turned))


def recurring_boxes(images: torch.Tensor, min_pixels: int = MIN_PIXELS, partners: int = 2,
                    tolerant: bool = True, turned: bool = True) -> torch.Tensor:
    """(N, H, W) bool: the boxes (:func:`boxed`) around the pixels of each of ``images`` (N, C, H,
    W) whose keyed neighbourhood recurs, at one shift of at least :data:`MIN_SHIFT` pixels, with at
    least ``min_pixels`` pixels of agreement, in at least ``partners`` other images (:mod:`this module
    <cam_monitor.probes.recurrence>`), background included: in the exact keys, and in a probe
    where they find nothing, unless ``tolerant`` is False, in the tolerant ones (with
    :data:`TOLERANT_PARTNERS` more partners). A partner counts as it is and, unless ``turned`` is
    False, turned or mirrored by each of the other symmetries of a square (:func:`turn`)."""
    if min_pixels < 1 or partners < 1:
        raise ValueError(f"min_pixels and partners must be at least 1, got {min_pixels} and {partners}")
    n, _, h, w = images.shape
    images = images.detach().float().cpu()
    found = _found_in_tables(images, [(None, min_pixels, COMMON)], partners, turned, torch.ones(n, dtype=torch.bool))
    unfound = ~found.any(1)
    if tolerant and unfound.any():
        least = math.ceil(min_pixels * TOLERANT_AGREEMENT)
        tables = [(t / TOLERANT_TABLES, least, TOLERANT_COMMON) for t in range(TOLERANT_TABLES)]
        found |= _found_in_tables(images, tables, partners + TOLERANT_PARTNERS, turned, unfound)
    return boxed(found.view(n, h, w))


def _found_in_tables(images: torch.Tensor, tables: list[tuple[float | None, int, float]], partners: int,
                     turned: bool, probes: torch.Tensor) -> torch.Tensor:
    """(N, H*W) bool: the pixels of the ``probes`` (N,) bool of ``images`` that agree
    (:func:`_agreeing`, every probe a possible partner, as it is and, with ``turned``, turned) in
    any of ``tables``, each (the keys' ``offset`` for :func:`pixel_keys`, the least agreement, the
    most occurrences of a key per probe: :func:`_usable_keys`). The turned partners are paired
    one way at a time, so a 224 px probe set's eight ways are never listed at once."""
    n, _, h, w = images.shape
    found = torch.zeros(n, h * w, dtype=torch.bool)
    for offset, least, common in tables:
        ways = pixel_keys(images, offset, turned)
        usable = _usable_keys(ways, n, common)
        agreed: dict[int, list[torch.Tensor]] = {}
        for way in range(len(ways)):
            keys, where = _listed(ways, way, usable, (n, h, w))
            for probe, pairs in _found_in_table(keys, where, (n, h, w), least, probes, way > 0):
                agreed.setdefault(probe, []).append(pairs)
        for probe, pairs in agreed.items():
            position, partner_count = torch.unique(torch.unique(torch.cat(pairs)) // n, return_counts=True)
            found[probe, position[partner_count >= partners]] = True
    return found


class Usable(NamedTuple):
    """The keys of one table that can place anything (:func:`_usable_keys`): ``keys`` (K,) the
    probes' own keys, sorted; ``as_is`` (K,) bool, usable by the probes as they are; ``turned``
    (K,) bool, usable by their turned copies too; ``own`` each keyed pixel's of the probes as
    they are, its key's index in ``keys``."""

    keys: torch.Tensor
    as_is: torch.Tensor
    turned: torch.Tensor
    own: torch.Tensor


def _usable_keys(ways: list[tuple[torch.Tensor, torch.Tensor]], n: int, common: float) -> Usable:
    """Which keys of :func:`pixel_keys`'s ``ways`` of seeing ``n`` probes can place anything. A key
    seen once, or more than ``common`` times per probe as the probes are, places nothing; a
    turned copy's pixel counts only where its key is one of the probes' own and is not seen more
    than ``common`` times per probe and way over every way (an object's edges are common in
    every direction). Counted way by way against the probes' own keys."""
    keys, own, as_is = ways[0][0][ways[0][1]].unique(return_inverse=True, return_counts=True)
    every = as_is.clone()
    for turned_keys, structured in ways[1:]:
        at, hit = _lookup(keys, turned_keys[structured])
        every += torch.bincount(at[hit], minlength=len(keys))
    turned = every <= common * n * len(ways)
    usable = (torch.where(turned, every, as_is) >= 2) & (as_is <= common * n)
    return Usable(keys, usable, usable & turned, own)


def _lookup(keys: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each of ``wanted`` sits in the sorted ``keys``, and whether it is there."""
    at = torch.searchsorted(keys, wanted).clamp_max(max(len(keys) - 1, 0))
    return at, keys[at] == wanted if len(keys) else torch.zeros_like(wanted, dtype=torch.bool)


def _listed(ways: list[tuple[torch.Tensor, torch.Tensor]], way: int, usable: Usable,
            shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) keys and (M, 5) places (:func:`_places`) of the keyed pixels one pairing lists: the
    probes as they are with a key ``usable`` by them (``way`` 0), or with a key usable by turned
    copies, and the probes turned the ``way`` of :func:`turn` with such a key."""
    n, h, w = shape
    listed = [(0, usable.as_is)] if way == 0 else [(0, usable.turned), (way, usable.turned)]
    keys, places = [], []
    for at_way, allowed in listed:
        way_keys, structured = ways[at_way]
        flat = way_keys[structured]
        at, hit = (usable.own, True) if at_way == 0 else _lookup(usable.keys, flat)
        kept = hit & allowed[at]
        chosen = structured.clone()
        chosen[structured] = kept
        keys.append(flat[kept])
        places.append(_places(chosen, at_way * n, (h, w), at_way))
    return torch.cat(keys), torch.cat(places)


def _places(structured: torch.Tensor, first: int, shape: tuple[int, int], way: int) -> torch.Tensor:
    """(M, 5) (probe numbered from ``first``, row, column, and the row and column it came from)
    of the keyed pixels of ``structured`` (N, H'*W') bool, the pixels of H x W images turned the
    ``way`` of :func:`turn`."""
    probe, flat = structured.nonzero().unbind(1)
    rows, cols = (turn(grid, way).flatten()[flat] for grid in torch.meshgrid(*map(torch.arange, shape), indexing="ij"))
    width = shape[1] if way % 2 == 0 else shape[0]
    return torch.stack([probe + first, flat // width, flat % width, rows, cols], 1)


def _found_in_table(keys: torch.Tensor, where: torch.Tensor, shape: tuple[int, int, int], min_pixels: int,
                    probes: torch.Tensor, turned_only: bool) -> list[tuple[int, torch.Tensor]]:
    """Per one of ``probes`` with keyed pixels, its pixels' agreements (:func:`_agreeing`) in one
    pairing of ``keys`` (M,) of the keyed pixels at ``where`` (M, 5) (:func:`_listed`; probes
    from N on are the N probes of ``shape`` (N, H, W) turned, partners only, the only partners
    where ``turned_only``)."""
    n = shape[0]
    order = keys.argsort(stable=True)
    where, keys = where[order], keys[order]
    counts = keys.unique_consecutive(return_counts=True)[1]
    group = torch.arange(len(counts)).repeat_interleave(counts)
    starts = torch.cumsum(counts, 0) - counts
    if turned_only:  # a group lists the probes' own pixels first (a stable sort of them listed first)
        own_counts = torch.zeros_like(counts).index_add_(0, group, (where[:, 0] < n).long())
        starts, counts = starts + own_counts, counts - own_counts
    keyed = Keyed(where, group, starts, counts)
    listed = where[:, 0]
    mine = (listed < n).nonzero()[:, 0]
    mine = mine[listed[mine].argsort(stable=True)]
    owners, sizes = listed[mine].unique_consecutive(return_counts=True)
    return [(probe, _agreeing(keyed, probe, pixels, shape, min_pixels))
            for probe, pixels in zip(owners.tolist(), mine.split(sizes.tolist())) if probes[probe]]


class Keyed(NamedTuple):
    """The keyed pixels of a probe set sorted into groups of equal keys: ``where`` (M, 5) each
    one's (probe, row, column, row and column before turning) (:func:`_places`), ``group`` (M,)
    its group, and per group the first index (``starts``) and number (``counts``) of the entries
    that are partners (all of them, or the turned ones only)."""

    where: torch.Tensor
    group: torch.Tensor
    starts: torch.Tensor
    counts: torch.Tensor


def _agreeing(keyed: Keyed, probe: int, mine: torch.Tensor, shape: tuple[int, int, int], min_pixels: int) -> torch.Tensor:
    """Codes ``position * N + partner`` of ``probe``'s keyed pixels (entries ``mine`` of ``keyed``) and the other probes they agree
    with, each at one shift of at least :data:`MIN_SHIFT` pixels carrying at least
    ``min_pixels`` equal keys, as it is or turned (probes numbered from N on; the probe's own
    turns are not partners). A pair of pixels counts where
    they sit at least :data:`MIN_SHIFT` apart both in their images as they are and after the
    partner's turn: aligned images share content at the same place (a turned partner's too,
    whatever its shift after turning), and an aligned object that the turn leaves alike (a
    centred '0' turned a half) at the same place after turning. One probe at a time: the pairs
    of a whole probe set of 224 px images took gigabytes at once."""
    n, h, w = shape
    side = max(h, w)
    where = keyed.where
    sizes = keyed.counts[keyed.group[mine]]
    other = keyed.starts[keyed.group[mine]].repeat_interleave(sizes) + _ranks(sizes)
    own = mine.repeat_interleave(sizes)
    seen = where[other, 0]
    keep = seen % n != probe
    own, other, seen = own[keep], other[keep], seen[keep]
    dy, dx = where[other, 1] - where[own, 1], where[other, 2] - where[own, 2]
    apart = ((where[other, 3] - where[own, 3]).abs() >= MIN_SHIFT) | ((where[other, 4] - where[own, 4]).abs() >= MIN_SHIFT)
    keep = apart & ((dy.abs() >= MIN_SHIFT) | (dx.abs() >= MIN_SHIFT))
    own, seen, dy, dx = own[keep], seen[keep], dy[keep], dx[keep]
    agreement = seen * (4 * side * side) + (dy + side) * (2 * side) + (dx + side)
    _, which, votes = agreement.unique(return_inverse=True, return_counts=True)
    strong = votes[which] >= min_pixels
    return torch.unique((where[own[strong], 1] * w + where[own[strong], 2]) * n + seen[strong] % n)


def without_background(boxes: torch.Tensor) -> torch.Tensor:
    """``boxes`` (N, H, W) bool without background: none in a probe they would cover more than
    :data:`MAX_SHARE` of, and none at all where such probes are most of those with a box (the
    probe set's recurring content is then a background pattern; see the module's docstring)."""
    share = boxes.flatten(1).float().mean(1)
    background = share > MAX_SHARE
    if int(background.sum()) > int((share > 0).sum()) - int(background.sum()):
        return torch.zeros_like(boxes)
    return boxes & ~background[:, None, None]


_FOUND: dict[tuple[int, bool, bool], tuple[weakref.ref, torch.Tensor, torch.Tensor]] = {}


def _found(images: torch.Tensor, tolerant: bool = True, turned: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`recurring_boxes` of ``images`` with the defaults (and ``tolerant``, ``turned``) and
    the same without background, computed once per images tensor (the probes are fixed for a run;
    the finder reads nothing else) and forgotten when the tensor is."""
    key = (id(images), tolerant, turned)
    held = _FOUND.get(key)
    if held is not None and held[0]() is images:
        return held[1], held[2]
    boxes = recurring_boxes(images, tolerant=tolerant, turned=turned)
    masks = without_background(boxes)
    _FOUND[key] = (weakref.ref(images, lambda _, k=key: _FOUND.pop(k, None)), boxes, masks)
    return boxes, masks


def recurring_of(images: torch.Tensor, tolerant: bool = True, turned: bool = True) -> torch.Tensor:
    """:func:`recurring_masks` of a probe set's ``images`` with the defaults (and ``tolerant``,
    ``turned``), computed once per images tensor."""
    return _found(images, tolerant, turned)[1]


def background_of(images: torch.Tensor, tolerant: bool = True, turned: bool = True) -> int:
    """How many of a probe set's ``images`` hold recurring content that :func:`recurring_of` leaves
    as background (a texture, a pattern, a frame: for the texture, detail and border tests)."""
    boxes, masks = _found(images, tolerant, turned)
    return int((boxes.flatten(1).any(1) & ~masks.flatten(1).any(1)).sum())
