"""Mask-free shortcut discovery and its causal confirmation, from maps already computed.

Discovery (no extra backward): a probe is a *suspect* when its map puts at least
``energy_share`` of its energy into a box covering at most ``max_area`` of the image, and the
model predicts the class the map explains. The box is sized from the map itself: the smallest
rectangle of layer-grid cells holding that share (Lapuschkin et al., "Unmasking Clever Hans
predictors", Nature Communications 2019: a Clever Hans model's evidence sits on a small,
consistent region; what separates a shortcut is that a small region carries the decision).

Confirmation (forward passes only): each suspect's box is pasted, at the same place, into probes
the model assigns to other classes; a *flip* is a prediction that becomes the suspect's class.
The control pastes a box of the same size from the same suspect image at a random other place
into the same probes. A model that uses the region flips far more often than the control; a large
enough piece of the real object flips too, but then so do the control boxes of that size. The
whole budget (tests plus controls) is ``budget`` x the number of probes images, one inference
forward of the probe set at the default 1.0.

Everything here is deterministic given its inputs (a private generator seeded by the caller), so
every rank of a multi-process run plans the same tests. Lightning-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .probes import ProbeSet

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 in image pixels, half-open
Predict = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) CPU images -> (B,) predicted classes


@dataclass(frozen=True)
class DiscoverySettings:
    """How suspects are found and how many paste tests confirm them.

    Args:
        enabled: run discovery and confirmation at every evaluation.
        energy_share: share of a map's energy its suspect box must hold.
        max_area: largest box, as a fraction of the image, that still counts as a small region.
        budget: pasted images per evaluation (tests plus controls) as a multiple of the probe count.
        min_tests: fewer paste tests than this (too few suspects or recipients) give NaN rates.
        min_suspects: fewer tested suspects than this give NaN rates too: a shortcut recurs across
            probes, while one probe's small box can be a telling piece of its object.
        seed: seeds the recipients' order and the control boxes (mixed with the evaluation's step).
    """

    enabled: bool = True
    energy_share: float = 0.35
    max_area: float = 0.04
    budget: float = 1.0
    min_tests: int = 8
    min_suspects: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.energy_share < 1:
            raise ValueError(f"discovery energy_share must be in (0, 1), got {self.energy_share!r}")
        if not 0 < self.max_area < 1:
            raise ValueError(f"discovery max_area must be in (0, 1), got {self.max_area!r}")
        if not self.budget > 0:
            raise ValueError(f"discovery budget must be > 0 (pasted images per probe), got {self.budget!r}")
        for name in ("min_tests", "min_suspects"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"discovery {name} must be an int >= 1, got {value!r}")


@dataclass
class Suspect:
    """A probe whose evidence sits in a small box: its index, the class its map explains, the box
    (image pixels) and the share of the map's energy inside it."""

    probe: int
    cls: int
    box: Box
    share: float

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclass
class PasteTest:
    """One confirmation: ``suspect``'s box pasted into probe ``recipient``, and the control box."""

    suspect: int
    recipient: int
    control_box: Box


@dataclass
class Discovery:
    """What one evaluation's discovery found and its confirmation measured.

    ``flips[i]`` / ``control_flips[i]`` say whether test ``i`` (and its control) turned the
    recipient's prediction into the suspect's class.
    """

    suspects: list[Suspect]
    tests: list[PasteTest]
    flips: torch.Tensor
    control_flips: torch.Tensor
    min_tests: int
    min_suspects: int = 1

    def aggregates(self) -> dict[str, float]:
        """``shortcut_flip_rate`` and ``shortcut_flip_control`` over all tests, their difference
        ``shortcut_flip_excess`` (NaN below ``min_tests`` tests or ``min_suspects`` tested suspects)
        and the count of ``shortcut_suspects``."""
        enough = decidable(self.tests, self.min_tests, self.min_suspects)
        rate = float(self.flips.float().mean()) if enough else math.nan
        control = float(self.control_flips.float().mean()) if enough else math.nan
        return {"shortcut_flip_rate": rate, "shortcut_flip_control": control,
                "shortcut_flip_excess": rate - control, "shortcut_suspects": float(len(self.suspects))}

    def excess(self) -> dict[int, float]:
        """Probe index -> its flip rate minus its control rate, for every suspect that was tested."""
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

    def regions(self, ids: list[str], class_names: list[str] | None = None) -> list[dict[str, Any]]:
        """Per class of the tested suspects, strongest first: the flip and control rates, the number
        of tests, and each suspect's probe id and box (``[y0, x0, y1, x1]`` image pixels)."""
        by_class: dict[int, dict[str, Any]] = {}
        for s, suspect in enumerate(self.suspects):
            mine = [i for i, t in enumerate(self.tests) if t.suspect == s]
            if not mine:
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

    def masks(self, n: int, image_size: tuple[int, int], min_excess: float = 0.0) -> torch.Tensor:
        """(n, H, W) bool for the first ``n`` probes: the box of every tested suspect whose own flip
        excess is above ``min_excess`` (the inferred spurious regions), empty elsewhere."""
        out = torch.zeros(n, *image_size, dtype=torch.bool)
        excess = self.excess()
        for suspect in self.suspects:
            if suspect.probe < n and excess.get(suspect.probe, -math.inf) > min_excess:
                y0, x0, y1, x1 = suspect.box
                out[suspect.probe, y0:y1, x0:x1] = True
        return out


def decidable(tests: list[PasteTest], min_tests: int, min_suspects: int) -> bool:
    """Whether ``tests`` are enough to decide anything: ``min_tests`` tests from ``min_suspects`` suspects."""
    return len(tests) >= min_tests and len({t.suspect for t in tests}) >= min_suspects


def top_boxes(maps: torch.Tensor, share: float, max_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest box of grid cells holding ``share`` of each map's energy.

    ``maps`` (N, h, w) non-negative. Rectangles of up to ``max_cells`` cells are tried smallest
    first (equal areas: the one holding more energy). Returns ``boxes`` (N, 4) long
    ``(y0, x0, y1, x1)`` in cells, half-open, and ``held`` (N,) the share inside; rows without
    such a box (or an all-zero map) have ``held`` NaN.
    """
    n, h, w = maps.shape
    a = maps.float().clamp_min(0)[:, None]
    total = a.flatten(1).sum(1)
    best_area = torch.full((n,), math.inf)
    held = torch.full((n,), math.nan)
    boxes = torch.zeros(n, 4, dtype=torch.long)
    sizes = sorted(((bh, bw) for bh in range(1, h + 1) for bw in range(1, w + 1) if bh * bw <= max_cells),
                   key=lambda s: s[0] * s[1])
    for bh, bw in sizes:
        windows = F.avg_pool2d(a, (bh, bw), stride=1).flatten(1) * (bh * bw)
        best, idx = windows.max(1)
        frac = best / total.clamp_min(1e-30)
        area = bh * bw
        better = (total > 0) & (frac >= share) & ((area < best_area) | ((area == best_area) & (frac > held)))
        if better.any():
            ys, xs = idx // (w - bw + 1), idx % (w - bw + 1)
            new = torch.stack([ys, xs, ys + bh, xs + bw], 1)
            boxes[better] = new[better]
            held[better] = frac[better]
            best_area[better] = float(area)
    return boxes, held


def cells_to_pixels(box: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> Box:
    """A (y0, x0, y1, x1) box of grid cells as image pixels (each cell covers its stride)."""
    sy, sx = image_size[0] / grid[0], image_size[1] / grid[1]
    y0, x0, y1, x1 = box.tolist()
    return (int(math.floor(y0 * sy)), int(math.floor(x0 * sx)),
            min(image_size[0], int(math.ceil(y1 * sy))), min(image_size[1], int(math.ceil(x1 * sx))))


def find_suspects(maps: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor, image_size: tuple[int, int],
                  settings: DiscoverySettings) -> list[Suspect]:
    """Probes whose map concentrates on a small box and whose prediction is the explained class,
    most concentrated (share per area) first."""
    h, w = maps.shape[-2:]
    max_cells = max(1, int(settings.max_area * h * w))
    boxes, held = top_boxes(maps, settings.energy_share, max_cells)
    ok = ~torch.isnan(held) & (preds == targets)
    suspects = [Suspect(i, int(targets[i]), cells_to_pixels(boxes[i], (h, w), image_size), float(held[i]))
                for i in ok.nonzero()[:, 0].tolist()]
    return sorted(suspects, key=lambda s: (-s.share / s.area, s.probe))


def _random_box(size: tuple[int, int], avoid: Box, image_size: tuple[int, int], gen: torch.Generator,
                tries: int = 32) -> Box:
    """A ``size`` box at a random place not overlapping ``avoid`` (anywhere, if ``tries`` draws
    all overlap it: the suspect box then covers most of the image)."""
    bh, bw = size
    y0, x0, y1, x1 = avoid
    ys = torch.randint(image_size[0] - bh + 1, (tries,), generator=gen).tolist()
    xs = torch.randint(image_size[1] - bw + 1, (tries,), generator=gen).tolist()
    y, x = next(((y, x) for y, x in zip(ys, xs) if y + bh <= y0 or y >= y1 or x + bw <= x0 or x >= x1), (ys[0], xs[0]))
    return y, x, y + bh, x + bw


def plan_tests(suspects: list[Suspect], targets: torch.Tensor, preds: torch.Tensor, image_size: tuple[int, int],
               num_tests: int, gen: torch.Generator) -> list[PasteTest]:
    """Up to ``num_tests`` paste tests, suspects taken round-robin (one of each class before a
    second of any), each into recipients it has not been pasted into yet, in a seeded order.

    A recipient neither belongs to nor is predicted as the suspect's class, so a flip is a change.
    """
    seen: dict[int, int] = {}
    rank = []
    for suspect in suspects:
        rank.append(seen.get(suspect.cls, 0))
        seen[suspect.cls] = rank[-1] + 1
    order = sorted(range(len(suspects)), key=lambda s: (rank[s], s))[:num_tests]
    queues = {}
    for s in order:
        cls = suspects[s].cls
        ok = ((targets != cls) & (preds != cls)).nonzero()[:, 0]
        queues[s] = ok[torch.randperm(len(ok), generator=gen)].tolist()
    tests: list[PasteTest] = []
    while len(tests) < num_tests and any(queues[s] for s in order):
        for s in order:
            if len(tests) >= num_tests:
                break
            if queues[s]:
                box = suspects[s].box
                size = (box[2] - box[0], box[3] - box[1])
                tests.append(PasteTest(s, queues[s].pop(0), _random_box(size, box, image_size, gen)))
    return tests


def pasted_images(images: torch.Tensor, suspects: list[Suspect], tests: list[PasteTest]) -> torch.Tensor:
    """(2T, C, H, W): each test's recipient with the suspect's box pasted in, then each control."""
    out = []
    for use_control in (False, True):
        for t in tests:
            y0, x0, y1, x1 = t.control_box if use_control else suspects[t.suspect].box
            img = images[t.recipient].clone()
            img[:, y0:y1, x0:x1] = images[suspects[t.suspect].probe][:, y0:y1, x0:x1]
            out.append(img)
    return torch.stack(out) if out else images[:0]


def discover(maps: torch.Tensor, probes: ProbeSet, targets: torch.Tensor, preds: torch.Tensor, predict: Predict,
             settings: DiscoverySettings, step: int = 0) -> Discovery:
    """Find suspects in ``maps`` (N, h, w), plan ``budget`` x N pasted images, and run them.

    ``predict`` classifies a CPU batch of pasted images (it does the device placement, batching and
    any cross-rank sharding); it is called once, and not at all when the plan has fewer than
    ``min_tests`` tests or ``min_suspects`` suspects (its rates would be NaN anyway).
    """
    image_size = probes.image_size
    suspects = find_suspects(maps, targets, preds, image_size, settings)
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    num_tests = int(settings.budget * len(probes)) // 2
    tests = plan_tests(suspects, targets, preds, image_size, num_tests, gen)
    if not decidable(tests, settings.min_tests, settings.min_suspects):
        tests = []  # too few to decide anything: spend no forward on them
    if not tests:
        empty = torch.zeros(0, dtype=torch.bool)
        return Discovery(suspects, tests, empty, empty, settings.min_tests, settings.min_suspects)
    out = predict(pasted_images(probes.images, suspects, tests)).cpu()
    src = torch.tensor([suspects[t.suspect].cls for t in tests])
    return Discovery(suspects, tests, out[:len(tests)] == src, out[len(tests):] == src, settings.min_tests,
                     settings.min_suspects)
