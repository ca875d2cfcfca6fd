"""Decoy Digits: scikit-learn's handwritten digits with a class-coded 4x4 pattern in a corner.

Each 8x8 digit (values 0..16) is scaled to [0, 1], upsampled 3x to 24x24 and centred on a 32x32
canvas; the 4-pixel margin holds the decoy, a 4x4 binary pattern fixed per class, placed in a
random corner. When the pattern matches the label (the "shortcut" split) a small CNN learns the
pattern instead of the digit; when it is random (the "control" split) the pattern is noise.
Validation and probes carry matched patterns (the realistic case: validation shares the bias);
the ground truth comes from three test splits over the same digits, with matched, random and no
patterns: shortcut use is accuracy(matched) - accuracy(random). Everything is built in memory,
deterministically from a seed, in well under a second.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

CANVAS = 32
DIGIT = 24
MARGIN = (CANVAS - DIGIT) // 2
PATCH = 4
NUM_CLASSES = 10
CORNERS = ((0, 0), (0, CANVAS - PATCH), (CANVAS - PATCH, 0), (CANVAS - PATCH, CANVAS - PATCH))


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


def make_split(digits: torch.Tensor, labels: torch.Tensor, mode: str, gen: torch.Generator,
               patterns: torch.Tensor, correlation: float = 1.0) -> DecoySplit:
    """Build one split. ``mode``: ``matched`` (decoy = label with probability ``correlation``,
    else a random class), ``random`` (decoy class uniform) or ``none`` (no decoy)."""
    n = digits.shape[0]
    images = place_digits(digits)
    spurious = torch.zeros(n, CANVAS, CANVAS, dtype=torch.bool)
    objects = torch.zeros(n, CANVAS, CANVAS, dtype=torch.bool)
    objects[:, MARGIN:MARGIN + DIGIT, MARGIN:MARGIN + DIGIT] = True
    if mode == "none":
        return DecoySplit(images, labels, torch.full((n,), -1), spurious, objects)
    if mode not in ("matched", "random"):
        raise ValueError(f"mode must be 'matched', 'random' or 'none', got {mode!r}")
    random_cls = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    if mode == "matched":
        keep = torch.rand(n, generator=gen) < correlation
        decoy = torch.where(keep, labels, random_cls)
    else:
        decoy = random_cls
    corner = torch.randint(0, len(CORNERS), (n,), generator=gen)
    for i in range(n):
        y, x = CORNERS[int(corner[i])]
        images[i, 0, y:y + PATCH, x:x + PATCH] = patterns[int(decoy[i])].float()
        spurious[i, y:y + PATCH, x:x + PATCH] = True
    return DecoySplit(images, labels, decoy, spurious, objects)


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
                      test_fraction: float = 0.2) -> DecoyDigits:
    """Build every split from one seed; the global RNG is never touched.

    Cached per arguments (the shortcut and control runs share one build); treat the returned
    tensors as read-only.
    """
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [0, 1], got {correlation}")
    digits, labels = load_digits_tensor()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    n_val, n_test = int(len(order) * val_fraction), int(len(order) * test_fraction)
    val_idx, test_idx, train_idx = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    patterns = decoy_patterns(seed)
    part = lambda idx, mode, corr=1.0: make_split(digits[idx], labels[idx], mode, gen, patterns, corr)  # noqa: E731
    return DecoyDigits(
        train_shortcut=part(train_idx, "matched", correlation),
        train_control=part(train_idx, "random"),
        val=part(val_idx, "matched"),
        test_matched=part(test_idx, "matched"),
        test_random=part(test_idx, "random"),
        test_none=part(test_idx, "none"),
        patterns=patterns,
    )
