"""Decoy Digits and its shortcut zoo: scikit-learn's handwritten digits with a class-coded cue.

Each 8x8 digit (values 0..16) is scaled to [0, 1], upsampled 3x to 24x24 and centred on a 32x32
canvas. The cue (:data:`CUES`) is fixed per class:

- ``corner_patch`` (Decoy Digits): a 4x4 binary pattern in a random corner of the 4-pixel margin;
- ``interior_patch``: the same patterns at twice the scale (8x8 px, so a small CNN can learn them
  anywhere) at a random position inside the digit's box, drawn over the digit (no fixed place,
  off the border);
- ``background_texture``: a faint grating (orientation and frequency fixed per class) behind the
  digit, over the whole canvas;
- ``border_frame``: a one-pixel frame around the canvas, dashed with a class-coded period and phase
  (a global cue at no single spot: every side carries it);
- ``background_cast``: the black background lifted to a class-coded grey level (a brightness
  cast, the grayscale form of a colour cast: nothing local to find);
- ``text_tag``: burnt-in text, three 3 x 5 px glyphs (11 x 5 px) whose string codes the class,
  white, in a random corner one pixel in from the edges (several cells of the grid, none aligned
  to them: the kind of cue a scanner or a hospital writes on its images);
- ``ruler``: a 16 px bar with ticks beside the object, on a random side of its box (clear of it
  when there is room): the tick spacing (2 to 6 px) and length (2 or 3 px) code the class.

When the cue matches the label (the "shortcut" split) a small CNN learns the cue instead of the
digit; when it is random (the "control" split) the cue is noise.

The same cues go over a second base task (``base="shapes"``, :mod:`.shapes`): ten kinds of drawn
shapes on varied backgrounds, 64 x 64 RGB. Every cue scales with the canvas (a 4 x 4 px patch at
32 px is 8 x 8 at 64), grey cues are drawn on every channel, and on colour images the cast is a
class-coded tint of the whole image.

Real images reach a classifier through a sensor and an encoder: ``degradation`` (:func:`degraded`)
puts every split through Gaussian noise or a JPEG encoding after its cues are drawn, so the copies
of a burnt-in cue are no longer the same pixels.
Validation and probes carry matched patterns (the realistic case: validation shares the bias);
the ground truth comes from three test splits over the same digits, with matched, random and no
patterns: shortcut use is accuracy(matched) - accuracy(random). Everything is built in memory,
deterministically from a seed, in well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import torch.nn.functional as F

CANVAS = 32
DIGIT = 24
MARGIN = (CANVAS - DIGIT) // 2
PATCH = 4
NUM_CLASSES = 10
#: The zoo's cues: :data:`LOCAL_CUES` sit at one place (a patch, a tag, a ruler), the others are
#: global (they cover the background or the border, no one spot carries them).
CUES = ("corner_patch", "interior_patch", "background_texture", "border_frame", "background_cast", "text_tag",
        "ruler")
LOCAL_CUES = ("corner_patch", "interior_patch", "text_tag", "ruler")
TEXTURE_CONTRAST = 0.35
#: The background grey level of class k under ``background_cast``: CAST_STEP * (k + 1).
CAST_STEP = 0.03
#: The strength of the colour cast on three-channel bases (a tint of this size per channel).
COLOUR_CAST = 0.12


@lru_cache(maxsize=1)
def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """(1797, 8, 8) float digits in [0, 1] and their (1797,) labels, from scikit-learn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("the demo data needs scikit-learn: pip install 'cam-monitor[demo]'") from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.long)


def decoy_patterns(seed: int = 0, min_distance: int = 6, min_ones: int = 6) -> torch.Tensor:
    """(10, 4, 4) bool patterns, one per class, pairwise Hamming distance >= ``min_distance``.

    Drawn greedily from a private generator so the same seed always gives the same patterns.
    Each pattern has at least ``min_ones`` lit pixels, so it is visible on the black margin.
    """
    gen = torch.Generator().manual_seed(seed)
    chosen: list[torch.Tensor] = []
    for _ in range(100_000):
        cand = torch.rand(PATCH * PATCH, generator=gen) < 0.5
        if int(cand.sum()) < min_ones:
            continue
        if all(int((cand ^ c).sum()) >= min_distance for c in chosen):
            chosen.append(cand)
            if len(chosen) == NUM_CLASSES:
                return torch.stack(chosen).reshape(NUM_CLASSES, PATCH, PATCH)
    raise RuntimeError(f"could not draw {NUM_CLASSES} patterns {min_distance} bits apart; lower min_distance")


def check_cue(cue: str) -> None:
    """Refuse a cue that is not one of :data:`CUES`."""
    if cue not in CUES:
        raise ValueError(f"cue must be one of {CUES}, got {cue!r}")


def degraded(images: torch.Tensor, how: str, gen: torch.Generator) -> torch.Tensor:
    """``images`` (N, C, H, W) after ``how``: ``"clean"`` (unchanged), ``"noiseS"`` (Gaussian noise
    of S times the images' value range, clipped to it; noise drawn from ``gen``) or ``"jpegQ"`` (a
    JPEG encoding at quality Q, 1 to 100, of the images put on 8 bits over their range, and back)."""
    kind, amount = check_degradation(how)
    if kind == "clean":
        return images
    low, high = images.amin(), images.amax()
    if kind == "noise":
        noise = torch.randn(images.shape, generator=gen, dtype=images.dtype)
        return (images + amount * (high - low) * noise).clamp(low, high)
    from torchvision.io import decode_jpeg, encode_jpeg

    eight_bit = ((images - low) / (high - low).clamp_min(1e-12) * 255).round().clamp(0, 255).to(torch.uint8)
    back = torch.stack([decode_jpeg(encode_jpeg(one, quality=int(amount))) for one in eight_bit])
    return back.to(images.dtype) / 255 * (high - low) + low


def check_degradation(how: str) -> tuple[str, float]:
    """``how`` read as (``"clean"``, 0), (``"noise"``, S) with 0 < S <= 1, or (``"jpeg"``, Q) with
    Q an integer from 1 to 100; anything else refused with the forms it takes."""
    forms = "'clean', 'noiseS' (S of the value range, e.g. noise0.02) or 'jpegQ' (quality 1-100, e.g. jpeg90)"
    if how == "clean":
        return "clean", 0.0
    for kind, low, high in (("noise", 0.0, 1.0), ("jpeg", 1, 100)):
        if how.startswith(kind):
            try:
                amount = float(how[len(kind):]) if kind == "noise" else int(how[len(kind):])
            except ValueError:
                break
            if (low < amount <= high) if kind == "noise" else (low <= amount <= high):
                return kind, float(amount)
            break
    raise ValueError(f"degradation must be {forms}, got {how!r}")


def class_textures(contrast: float = TEXTURE_CONTRAST, size: int = CANVAS) -> torch.Tensor:
    """(10, size, size) gratings in [0, contrast], one per class: orientation k * 18 degrees, period
    4 or 6 pixels at 32 px (scaled with ``size``) alternating by class, so neighbouring
    orientations also differ in frequency."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    scale = size / CANVAS
    out = []
    for k in range(NUM_CLASSES):
        theta, period = k * torch.pi / NUM_CLASSES, scale * (4.0 if k % 2 == 0 else 6.0)
        phase = 2 * torch.pi * (xs * torch.cos(torch.tensor(theta)) + ys * torch.sin(torch.tensor(theta))) / period
        out.append(0.5 * contrast * (1 + torch.sin(phase)))
    return torch.stack(out)


def class_frames(size: int = CANVAS) -> torch.Tensor:
    """(10, size, size) one-pixel border frames, dashed: class k lights runs of ``2 + k % 5`` pixels
    at 32 px (scaled with ``size``) every two runs along the border, shifted by a further
    ``k // 5`` runs, so no two classes share a frame."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    on_border = (ys == 0) | (xs == 0) | (ys == size - 1) | (xs == size - 1)
    along = torch.where((ys == 0) | (ys == size - 1), xs, ys)  # position along the side
    out = []
    for k in range(NUM_CLASSES):
        run = (2 + k % 5) * max(1, size // CANVAS)
        out.append((on_border & (((along + k // 5 * run) // run) % 2 == 0)).float())
    return torch.stack(out)


#: A 3 x 5 pixel font of the digits 0-9 (rows top to bottom, ``#`` lit), the text tag's glyphs.
GLYPHS = (
    ("###", "#.#", "#.#", "#.#", "###"), (".#.", "##.", ".#.", ".#.", "###"), ("###", "..#", "###", "#..", "###"),
    ("###", "..#", "###", "..#", "###"), ("#.#", "#.#", "###", "..#", "..#"), ("###", "#..", "###", "..#", "###"),
    ("###", "#..", "###", "#.#", "###"), ("###", "..#", "..#", "..#", "..#"), ("###", "#.#", "###", "#.#", "###"),
    ("###", "#.#", "###", "..#", "###"),
)
#: The ruler's length along its bar at 32 px (scaled with the canvas).
RULER = 16


def class_tags(unit: int = 1) -> torch.Tensor:
    """(10, 5u, 11u) bool tags: class k writes the digits k, k + 3 and k + 6 (mod 10), one pixel
    apart, ``unit`` pixels per font pixel. The first glyph alone tells the classes apart."""
    font = torch.tensor([[[c == "#" for c in row] for row in glyph] for glyph in GLYPHS])  # (10, 5, 3)
    gap = torch.zeros(5, 1, dtype=torch.bool)
    tags = [torch.cat([font[k], gap, font[(k + 3) % 10], gap, font[(k + 6) % 10]], 1) for k in range(NUM_CLASSES)]
    return torch.stack(tags).repeat_interleave(unit, 1).repeat_interleave(unit, 2)


def class_rulers(unit: int = 1) -> torch.Tensor:
    """(10, 4u, 16u) bool rulers, lying along x with ticks pointing up from a one-pixel bar: class
    k ticks every ``2 + k % 5`` pixels, ``2 + k // 5`` pixels long (at 32 px; ``unit`` pixels per
    pixel), from its first pixel."""
    out = torch.zeros(NUM_CLASSES, 4, RULER, dtype=torch.bool)
    out[:, 3] = True
    for k in range(NUM_CLASSES):
        out[k, 3 - (2 + k // 5):3, ::2 + k % 5] = True
    return out.repeat_interleave(unit, 1).repeat_interleave(unit, 2)


def ruler_place(obj: torch.Tensor, depth: int, length: int, side: int, gen: torch.Generator) -> tuple[int, int]:
    """Where a ruler ``depth`` deep and ``length`` long goes beside ``obj`` (S, S bool) on ``side``
    (0 above, 1 below, 2 left, 3 right of the object's box, touching it, moved back inside the
    canvas), centred on the box along that side with a jitter of up to a quarter of its length:
    its top-left (y, x); it stands upright on the left and right."""
    size = obj.shape[-1]
    rows, cols = obj.any(1).nonzero()[:, 0], obj.any(0).nonzero()[:, 0]
    y0, y1, x0, x1 = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1) if len(rows) \
        else (size // 4, 3 * size // 4, size // 4, 3 * size // 4)
    jitter = int(torch.randint(-(length // 4), length // 4 + 1, (1,), generator=gen))
    upright = side >= 2
    along = (y0 + y1) // 2 if upright else (x0 + x1) // 2
    start = min(max(0, along - length // 2 + jitter), size - length)
    across = [y0 - depth, y1, x0 - depth, x1][side]
    across = min(max(0, across), size - depth)
    return (start, across) if upright else (across, start)


def place_digits(digits: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) -> (N, 1, 32, 32): upsampled 3x (bilinear) and centred on a black canvas."""
    up = F.interpolate(digits[:, None], size=(DIGIT, DIGIT), mode="bilinear", align_corners=False).clamp(0, 1)
    canvas = torch.zeros(digits.shape[0], 1, CANVAS, CANVAS)
    canvas[:, :, MARGIN:MARGIN + DIGIT, MARGIN:MARGIN + DIGIT] = up
    return canvas


@dataclass
class DecoySplit:
    """Images (N, 1, 32, 32) in [0, 1], labels (N,), the class each decoy codes (or -1 for none),
    and per-image spurious (decoy box) and object (digit box) masks (N, 32, 32)."""

    images: torch.Tensor
    labels: torch.Tensor
    decoy_class: torch.Tensor
    spurious_masks: torch.Tensor
    object_masks: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return {"image": self.images[i], "label": int(self.labels[i]),
                "spurious_mask": self.spurious_masks[i], "object_mask": self.object_masks[i]}

    @property
    def targets(self) -> list[int]:
        """Labels as a list (the torchvision convention ProbeSet.from_dataset reads)."""
        return self.labels.tolist()


def cue_classes(labels: torch.Tensor, mode: str, gen: torch.Generator, correlation: float = 1.0) -> torch.Tensor:
    """The class each image's cue codes: ``matched`` (the label with probability ``correlation``,
    else a random class), ``random`` (uniform) or ``none`` (-1: no cue)."""
    n = labels.shape[0]
    if mode == "none":
        return torch.full((n,), -1)
    if mode not in ("matched", "random"):
        raise ValueError(f"mode must be 'matched', 'random' or 'none', got {mode!r}")
    random_cls = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    if mode == "random":
        return random_cls
    keep = torch.rand(n, generator=gen) < correlation
    return torch.where(keep, labels, random_cls)


def class_casts(size: int, channels: int) -> torch.Tensor:
    """(10, channels, size, size) class-coded casts: on one channel the grey level
    ``CAST_STEP * (k + 1)`` the background is lifted to; on three, a tint of class k's hue (a
    colour cast) added to the whole image."""
    if channels == 1:
        return CAST_STEP * (torch.arange(NUM_CLASSES, dtype=torch.float32) + 1)[:, None, None, None].expand(
            NUM_CLASSES, 1, size, size)
    hue = 2 * torch.pi * torch.arange(NUM_CLASSES, dtype=torch.float32) / NUM_CLASSES
    tint = torch.stack([torch.cos(hue + 2 * torch.pi * c / 3) for c in range(channels)], 1)  # (10, C)
    return (COLOUR_CAST * tint)[:, :, None, None].expand(NUM_CLASSES, channels, size, size)


def draw_cues(images: torch.Tensor, cue_class: torch.Tensor, cue: str, gen: torch.Generator,
              patterns: torch.Tensor, objects: torch.Tensor | None = None) -> torch.Tensor:
    """Draw each image's cue in place; returns the (N, S, S) masks of where the cue is (the ruler
    needs the images' ``objects`` masks: it goes beside them).

    Images are (N, C, S, S) with S a multiple of 32: every cue scales with S (a patch of 4 x 4 px
    at 32 px is 8 x 8 at 64). Grey cues are drawn on every channel; on three channels the cast is
    a colour tint (:func:`class_casts`)."""
    n, channels, size = images.shape[0], images.shape[1], images.shape[-1]
    unit = max(1, size // CANVAS)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    check_cue(cue)
    if not bool((cue_class >= 0).any()):
        return masks
    if cue == "background_cast" and channels > 1:
        casts = class_casts(size, channels)
        for i in torch.nonzero(cue_class >= 0)[:, 0].tolist():
            images[i] = (images[i] + casts[int(cue_class[i])]).clamp(0, 1)
            masks[i] = True
        return masks
    if cue in ("background_texture", "border_frame", "background_cast"):
        layers = (class_textures(size=size) if cue == "background_texture" else class_frames(size)
                  if cue == "border_frame" else class_casts(size, 1)[:, 0])
        for i in torch.nonzero(cue_class >= 0)[:, 0].tolist():
            layer = layers[int(cue_class[i])]
            masks[i] = (layer > images[i]).any(0)
            images[i] = torch.maximum(images[i], layer)
        return masks
    if cue == "text_tag":
        return draw_tags(images, cue_class, gen, masks)
    if cue == "ruler":
        if objects is None:
            raise ValueError("the ruler cue goes beside the object: pass the objects' masks")
        return draw_rulers(images, cue_class, objects, gen, masks)
    margin = size // 8
    if cue == "corner_patch":
        scale = unit
        stamp = scale * PATCH
        corners = torch.tensor([(y * (size - stamp), x * (size - stamp)) for y, x in ((0, 0), (0, 1), (1, 0), (1, 1))])
        corners = corners[torch.randint(0, len(corners), (n,), generator=gen)]
    else:
        scale = 2 * unit
        corners = torch.randint(margin, size - margin - scale * PATCH + 1, (n, 2), generator=gen)
    side = scale * PATCH
    stamps = patterns.float().repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    for i in torch.nonzero(cue_class >= 0)[:, 0].tolist():
        y, x = corners[i].tolist()
        images[i, :, y:y + side, x:x + side] = stamps[int(cue_class[i])]
        masks[i, y:y + side, x:x + side] = True
    return masks


def _stamp(image: torch.Tensor, mask: torch.Tensor, lit: torch.Tensor, y: int, x: int) -> None:
    """Light ``lit``'s pixels white on every channel of ``image`` at (y, x), in place, and mark
    its whole box in ``mask``."""
    h, w = lit.shape
    image[:, y:y + h, x:x + w].masked_fill_(lit, 1.0)
    mask[y:y + h, x:x + w] = True


def draw_tags(images: torch.Tensor, cue_class: torch.Tensor, gen: torch.Generator, masks: torch.Tensor
              ) -> torch.Tensor:
    """The ``text_tag`` cue: class ``cue_class[i]``'s tag (:func:`class_tags`) in a random corner of
    image i, one font pixel in from both edges; fills and returns ``masks``."""
    size = images.shape[-1]
    unit = max(1, size // CANVAS)
    tags = class_tags(unit)
    th, tw = tags.shape[-2:]
    corner = torch.randint(0, 4, (images.shape[0],), generator=gen)
    for i in torch.nonzero(cue_class >= 0)[:, 0].tolist():
        c = int(corner[i])
        y, x = (unit if c < 2 else size - unit - th), (unit if c % 2 == 0 else size - unit - tw)
        _stamp(images[i], masks[i], tags[int(cue_class[i])], y, x)
    return masks


def draw_rulers(images: torch.Tensor, cue_class: torch.Tensor, objects: torch.Tensor, gen: torch.Generator,
                masks: torch.Tensor) -> torch.Tensor:
    """The ``ruler`` cue: class ``cue_class[i]``'s ruler (:func:`class_rulers`) beside image i's
    object, on a random side (:func:`ruler_place`), its bar towards the object; fills and returns ``masks``."""
    rulers = class_rulers(max(1, images.shape[-1] // CANVAS))
    depth, length = rulers.shape[-2:]
    sides = torch.randint(0, 4, (images.shape[0],), generator=gen)
    for i in torch.nonzero(cue_class >= 0)[:, 0].tolist():
        side = int(sides[i])
        y, x = ruler_place(objects[i], depth, length, side, gen)
        ruler = rulers[int(cue_class[i])]
        ruler = ruler if side == 0 else ruler.flip(0) if side == 1 else ruler.T if side == 2 else ruler.T.flip(1)
        _stamp(images[i], masks[i], ruler, y, x)
    return masks


def make_split(base: torch.Tensor, labels: torch.Tensor, objects: torch.Tensor, mode: str, gen: torch.Generator,
               patterns: torch.Tensor, correlation: float = 1.0, cue: str = "corner_patch") -> DecoySplit:
    """Build one split from ``base`` images (N, C, S, S) and their object masks (left unchanged).
    ``mode``: ``matched`` (cue = label with probability ``correlation``, else a random class),
    ``random`` (cue class uniform) or ``none`` (no cue); ``cue`` one of :data:`CUES`."""
    images = base.clone()
    decoy = cue_classes(labels, mode, gen, correlation)
    spurious = draw_cues(images, decoy, cue, gen, patterns, objects)
    return DecoySplit(images, labels, decoy, spurious, objects)


def digit_base() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits placed on the 32 px canvas: images, labels and the digit boxes as object masks."""
    digits, labels = load_digits_tensor()
    objects = torch.zeros(len(labels), CANVAS, CANVAS, dtype=torch.bool)
    objects[:, MARGIN:MARGIN + DIGIT, MARGIN:MARGIN + DIGIT] = True
    return place_digits(digits), labels, objects


#: The zoo's base tasks: the digits, and procedurally drawn shapes on varied backgrounds (64 px RGB).
BASES = ("digits", "shapes")


def base_task(base: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (N, C, S, S), labels and object masks of a base task of :data:`BASES`."""
    if base == "digits":
        return digit_base()
    if base == "shapes":
        from .shapes import shapes_dataset

        return shapes_dataset()
    raise ValueError(f"base must be one of {BASES}, got {base!r}")


@dataclass
class DecoyDigits:
    """All splits of one Decoy Digits build (see module docstring)."""

    train_shortcut: DecoySplit
    train_control: DecoySplit
    val: DecoySplit
    test_matched: DecoySplit
    test_random: DecoySplit
    test_none: DecoySplit
    patterns: torch.Tensor


@lru_cache(maxsize=4)
def make_decoy_digits(seed: int = 0, correlation: float = 1.0, val_fraction: float = 0.15,
                      test_fraction: float = 0.2, cue: str = "corner_patch", base: str = "digits",
                      degradation: str = "clean") -> DecoyDigits:
    """Build every split from one seed with the class-coded ``cue`` (:data:`CUES`; the default is
    Decoy Digits) over a ``base`` task (:data:`BASES`: the digits, or Drawn Shapes), each image then
    put through ``degradation`` (:func:`degraded`: ``"clean"``, ``"noiseS"``, ``"jpegQ"``; the
    noise drawn from a generator of its own, so the images and cues are those of the clean build);
    the global RNG is never touched.

    Cached per arguments (the shortcut and control runs share one build); treat the returned
    tensors as read-only.
    """
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [0, 1], got {correlation}")
    check_cue(cue)
    check_degradation(degradation)
    images, labels, objects = base_task(base)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    n_val, n_test = int(len(order) * val_fraction), int(len(order) * test_fraction)
    val_idx, test_idx, train_idx = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    patterns = decoy_patterns(seed)
    noise = torch.Generator().manual_seed(seed + 2**32)  # a stream apart from the splits' draws

    def part(idx: torch.Tensor, mode: str, corr: float = 1.0) -> DecoySplit:
        split = make_split(images[idx], labels[idx], objects[idx], mode, gen, patterns, corr, cue)
        return replace(split, images=degraded(split.images, degradation, noise))

    return DecoyDigits(
        train_shortcut=part(train_idx, "matched", correlation),
        train_control=part(train_idx, "random"),
        val=part(val_idx, "matched"),
        test_matched=part(test_idx, "matched"),
        test_random=part(test_idx, "random"),
        test_none=part(test_idx, "none"),
        patterns=patterns,
    )
