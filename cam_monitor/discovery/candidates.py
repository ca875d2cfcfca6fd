"""The candidates and the pairs each arm tests: the probes the model gets right with their
best-credited windows, the local paste tests (over the recipient's most-credited window, against
the candidate's next one) and the recipients of every other arm. Deterministic given a generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..interventions import Box, Paste, markable
from .allocation import share_out
from .settings import DiscoverySettings


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


def marked_pairs(suspects: list[Suspect], masks: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor,
                 num: int, gen: torch.Generator) -> list[Pair]:
    """Up to ``num`` pairs of the marked arm: the suspects whose probe's mark is
    :func:`~cam_monitor.interventions.markable`, each into recipients of another class
    (:func:`recipients_of`); indices into ``suspects``."""
    usable = markable(masks)
    keep = [i for i, s in enumerate(suspects) if usable[s.probe]]
    return [Pair(keep[s], r) for s, r in recipients_of([suspects[i] for i in keep], targets, preds, num, gen)]


def pastes(suspects: list[Suspect], tests: list[PasteTest]) -> list[Paste]:
    """The local tests as pastes (:func:`~cam_monitor.interventions.pasted_images`): every test's
    candidate box, then every test's control box, each at the test's place in its recipient."""
    return ([Paste(suspects[t.suspect].probe, suspects[t.suspect].box, t.recipient, t.place) for t in tests]
            + [Paste(suspects[t.suspect].probe, t.control_box, t.recipient, t.place) for t in tests])
