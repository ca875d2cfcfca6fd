"""The colour test's design, scored on zoo models: which colour statistics a recipient is given.

The monitor's colour arm gives a probe of another class (the recipient) a candidate's per-channel
colour statistics and, as the control, gives the candidate the recipient's; a flip is an image
taking the candidate's class. Which statistics is the design:

- ``robust``: the monitor's design (:func:`~cam_monitor.interventions.colour_images`): each
  image shifted per channel so its median takes the other's and scaled so its spread between the
  1st and 99th percentiles does. The median is the background's level wherever the background
  is most of the image, and the spread moves with the object's extremes, not its size: a cast
  moves, how much of the image the object fills does not. No map.
- ``whole`` (the monitor's until 2026-12-06): the mean and standard deviation of every pixel of
  the image. They mix the background's level with the object's size and contrast: a bright disc
  fills more of its image than a ring does, so the statistics carry the class of a model that
  reads how much bright object there is, which is no cast.
- ``background`` (measured in the monitor and not kept: see the reference): the mean and
  standard deviation of the pixels outside the quarter its map credits most
  (:func:`~cam_monitor.interventions.object_regions`, its background as its map sees it), matched
  background to background (each image shifted and scaled per channel so that its own background
  takes the other's statistics): a cast moves exactly, the object's size stays out; but the
  map's quarter rarely covers every stroke, and what it leaves out moves too.
- ``level``: the background's mean alone, each image shifted per channel so that its background
  takes the other's level (no scaling: a background with almost no spread cannot blow up the
  other image's contrast).
- ``median``: the robust design's shift alone; ``median_iqr``: its shift, scaled to the
  interquartile spread instead (which an object on more than a quarter of the image moves).

Per model and epoch: the accuracy, whether it beats chance on the probes (the monitor tests only
then: :func:`~cam_monitor.discovery.beats_chance`), and per design the wins (only the test flipped)
and losses (only the control did) over ``--pairs`` (candidate, recipient) pairs of correctly
classified probes of different classes, drawn as :mod:`bench_background_detail` draws them.

    python benchmarks/bench_colour_test.py --specs digits:background_cast:shortcut:0,digits:background_cast:control:0

Prints one row per model and epoch, then per design: the control evaluations that beat chance,
how many of them exceed the arm's margin (``DiscoverySettings.min_effect``) with p < 0.01, the
worst, and the shortcut models' median wins; writes ``benchmarks/results/colour_test_cpu.json``.
Weights are shared with ``bench_local_test.py`` through ``--cache``.
"""
from __future__ import annotations

import functools
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_background_detail import draw_pairs, outcome  # noqa: E402
from bench_engine import machine, write_json  # noqa: E402
from bench_local_test import cached_models_parser, trained_models  # noqa: E402

from cam_monitor.demo.model import ARCHS  # noqa: E402
from cam_monitor.discovery import DiscoverySettings, beats_chance  # noqa: E402
from cam_monitor.engine import compute_cams, predict_classes  # noqa: E402
from cam_monitor.interventions import (colour_images, colour_statistics, matched_levels,  # noqa: E402
                                      matched_statistics, object_regions)

Maker = Callable[[torch.Tensor, torch.Tensor, list[int], list[int]], torch.Tensor]


def region_statistics(images: torch.Tensor, region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, the mean and standard deviation of the pixels inside ``region`` (B, H, W)."""
    keep = region[:, None].to(images.dtype)
    count = keep.sum((2, 3), keepdim=True).clamp(min=1)
    mean = (images * keep).sum((2, 3), keepdim=True) / count
    std = (((images - mean) ** 2 * keep).sum((2, 3), keepdim=True) / count).sqrt()
    return mean, std


def matched_to(images: torch.Tensor, own: torch.Tensor, targets: torch.Tensor, other: torch.Tensor,
               scale: bool) -> torch.Tensor:
    """``images`` shifted (and with ``scale`` scaled) per channel so that their ``own`` region takes
    the statistics ``targets`` have inside ``other``."""
    mine, theirs = region_statistics(images, own), region_statistics(targets, other)
    return matched_levels(images, mine, theirs) if scale else images - mine[0] + theirs[0]


def swapped(match: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Maker:
    """A design from ``match(images, own_region, targets, target_region)``, which gives ``images``
    the statistics of ``targets``: each recipient given its source's (the tests), then each source
    given its recipient's (the controls)."""
    def make(images: torch.Tensor, objects: torch.Tensor, sources: list[int], recipients: list[int]) -> torch.Tensor:
        if not sources:
            return images[:0]
        src, dst = images[sources], images[recipients]
        bs, br = ~objects[sources], ~objects[recipients]
        return torch.cat([match(dst, br, src, bs), match(src, bs, dst, br)])
    return make


def background_images(scale: bool) -> Maker:
    """The ``background`` (``scale``) or ``level`` design: each image's background (outside its
    object region) given the other's background statistics."""
    return swapped(functools.partial(matched_to, scale=scale))


#: The ``whole`` design (the monitor's until 2026-12-06): each image shifted and scaled per channel
#: to the other's mean and standard deviation.
whole_images = swapped(lambda images, own, targets, other: matched_statistics(images, targets))


def quantile_images(tail: float | None) -> Maker:
    """The ``median`` (``tail`` None: a shift to the other's median per channel) or ``median_iqr``
    (0.25: also scaled to its interquartile spread) design, the monitor's statistics
    (:func:`~cam_monitor.interventions.colour_statistics`) with another spread."""
    def matched(images: torch.Tensor, own: torch.Tensor, targets: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if tail is None:
            return images - colour_statistics(images)[0] + colour_statistics(targets)[0]
        return matched_levels(images, colour_statistics(images, tail), colour_statistics(targets, tail))
    return swapped(matched)


DESIGNS: dict[str, Maker] = {
    "robust": lambda images, objects, sources, recipients: colour_images(images, sources, recipients),
    "whole": whole_images,
    "background": background_images(scale=True),
    "level": background_images(scale=False),
    "median": quantile_images(None),
    "median_iqr": quantile_images(0.25),
}


def score(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, layer: str, pairs: int, seed: int,
          designs: list[str]) -> tuple[float, bool, dict[str, dict]]:
    """One evaluation of ``model``: its accuracy, whether it beats chance, and every design's outcome."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([predict_classes(model, x[i:i + 128]) for i in range(0, len(x), 128)])

    preds = predict(images)
    maps = compute_cams(model, images, layer, preds)
    objects = object_regions(maps, tuple(images.shape[-2:]))
    sources, recipients = draw_pairs(preds, labels, pairs, torch.Generator().manual_seed(seed))
    cls, n = preds[sources], len(sources)
    out = {}
    for name in designs:
        flips = predict(DESIGNS[name](images, objects, sources, recipients)) == cls.repeat(2) if n else \
            torch.zeros(0, dtype=torch.bool)
        out[name] = outcome(flips[:n], flips[n:])
    ready = beats_chance(labels, preds, DiscoverySettings().skill_level)
    return float((preds == labels).float().mean()), ready, out


def summary(records: list[dict], margin: float) -> list[dict]:
    """Per design, over the control evaluations that beat chance: how many, how many show an excess
    above ``margin`` with p < 0.01, the worst by excess; over the shortcut models' evaluations that
    beat chance, the median wins and excess."""
    out = []
    for design in dict.fromkeys(r["design"] for r in records):
        mine = [r for r in records if r["design"] == design and r["beats_chance"]]
        controls = [r for r in mine if r["variant"] == "control"]
        shortcuts = [r for r in mine if r["variant"] == "shortcut"]
        worst = max(controls, key=lambda r: r["excess"], default=None)
        out.append({"design": design, "control_evaluations": len(controls),
                    "control_broken": sum(r["excess"] > margin and r["p"] < 0.01 for r in controls),
                    "worst_control": f"{worst['wins']}:{worst['losses']} ({worst['model']} epoch {worst['epoch']})"
                    if worst else "-",
                    "shortcut_evaluations": len(shortcuts),
                    "shortcut_median_wins": statistics.median([r["wins"] for r in shortcuts]) if shortcuts else None,
                    "shortcut_median_excess": statistics.median([r["excess"] for r in shortcuts]) if shortcuts else None})
    return out


def main() -> None:
    p = cached_models_parser(__doc__, "colour_test")
    p.add_argument("--designs", default=",".join(DESIGNS), help=f"comma-separated, of {', '.join(DESIGNS)}")
    p.add_argument("--pairs", type=int, default=200, help="(candidate, recipient) pairs per model and epoch")
    args = p.parse_args()
    designs = args.designs.split(",")
    unknown = sorted(set(designs) - set(DESIGNS))
    if unknown:
        p.error(f"unknown designs {unknown}; choose from {sorted(DESIGNS)}")
    print("| model | epoch | accuracy | beats chance | " + " | ".join(designs) + " |\n|---|---|---|---|"
          + "---|" * len(designs))
    records = []
    for spec, probes, epoch, model in trained_models(args.specs, args.epochs, args.cache):
        accuracy, ready, scored = score(model, probes.images, probes.labels, ARCHS[spec.arch], args.pairs, epoch,
                                        designs)
        records += [{"model": spec.name, "variant": spec.variant, "epoch": epoch, "accuracy": accuracy,
                     "beats_chance": ready, "design": name,
                     "excess": (row["wins"] - row["losses"]) / row["pairs"] if row["pairs"] else 0.0, **row}
                    for name, row in scored.items()]
        print(f"| {spec.name} | {epoch} | {accuracy:.2f} | {'yes' if ready else 'no'} | " + " | ".join(
            f"{scored[d]['wins']}:{scored[d]['losses']} of {scored[d]['pairs']}" for d in designs) + " |", flush=True)
    rows = summary(records, DiscoverySettings().min_effect)
    print("\n| design | control evaluations (beating chance) | above the margin, p < 0.01 | worst control | "
          "shortcut evaluations | shortcut median wins | shortcut median excess |\n|---|---|---|---|---|---|---|")
    for r in rows:
        excess = r["shortcut_median_excess"]
        print(f"| {r['design']} | {r['control_evaluations']} | {r['control_broken']} | {r['worst_control']} | "
              f"{r['shortcut_evaluations']} | {r['shortcut_median_wins']} | "
              f"{'-' if excess is None else f'{excess:.2f}'} |")
    write_json({"machine": machine(), "epochs": args.epochs, "pairs": args.pairs, "specs": [s.text for s in args.specs],
                "summary": rows, "records": records}, args.out)


if __name__ == "__main__":
    main()
