"""The detail test's design, scored on zoo models: the shuffled cells' size and the blur's width.

The monitor's detail arm asks whether a model keeps a probe's class when the probe's grid cells are
shuffled (what lies inside a cell kept, the arrangement lost) more often than when the probe is
blurred at the scale of a cell (the arrangement kept, the detail lost). Its null hypothesis ("the
classes are told by shapes spanning several cells") must hold on models that read the object.
This script measures that, design by design, on the same models as ``bench_local_test.py`` (whose
per-epoch weights it shares through ``--cache``): per evaluation, every probe the model classifies
correctly is one pair, a win when only the shuffled image keeps its class, a loss when only the
blurred one does.

    python benchmarks/bench_detail_test.py --specs digits:background_texture:shortcut:0,digits:corner_patch:control:0
    python benchmarks/bench_detail_test.py --specs ... --tiles 1 --blurs 0.5 --controls blur,matched,decoy

``--controls`` tries other controls beside the monitor's blur (``blur``): ``matched``, the blur
with each image's per-channel mean and standard deviation put back (the shuffle keeps the pixels'
histogram, the blur lowers their contrast), and ``decoy``, the blur with a keep counted only where
the same transform does not also send a probe of another class (one per pair, seeded) to that
class (a model that sends every shuffled or blurred image to one default class keeps that class
on it without reading anything).

Prints one row per model and epoch (wins:losses per design), then per design the worst control
evaluation, how many control evaluations passed the detail arm's margin (an excess of wins over
losses above 0.2 of the pairs) and the shortcut models' median wins; writes
``benchmarks/results/detail_test_cpu.json``.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import machine, write_json  # noqa: E402
from bench_local_test import cached_models_parser, design_summary, trained_models  # noqa: E402

from cam_monitor.demo.model import ARCHS  # noqa: E402
from cam_monitor.discovery import DiscoverySettings  # noqa: E402
from cam_monitor.engine import compute_cams, predict_classes  # noqa: E402
from cam_monitor.evidence import sign_test_p  # noqa: E402
from cam_monitor.interventions import blurred_cells, matched_statistics, shuffled_cells  # noqa: E402

def layer_grid(model: torch.nn.Module, layer: str, images: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """The grid of ``layer`` (its maps' height and width) on these images."""
    return tuple(compute_cams(model, images[:1], layer, labels[:1]).shape[-2:])


#: The detail arm's margin, the monitor's default: the excess of wins over losses its null allows.
DETAIL_MARGIN = DiscoverySettings().detail_min_effect

#: The controls ``--controls`` can name (the module docstring says what each is).
CONTROLS = ("blur", "matched", "decoy")


def decoys(labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each probe, the index of a probe of another class drawn at random (itself where every
    probe has its class)."""
    out = torch.arange(len(labels))
    for i in range(len(labels)):
        others = (labels != labels[i]).nonzero().flatten()
        if len(others):
            out[i] = others[torch.randint(len(others), (1,), generator=gen)]
    return out


def top_share(predicted: torch.Tensor) -> float:
    """The share of ``predicted`` that is its most common class (1.0: one default answer for all)."""
    return float(torch.bincount(predicted).max()) / len(predicted) if len(predicted) else math.nan


def wins_losses(labels: torch.Tensor, shuffled: torch.Tensor, control: torch.Tensor,
                other: torch.Tensor | None = None) -> tuple[int, int]:
    """The pairs where only the shuffle keeps the class (wins) and only the control does (losses),
    from the predicted classes of each probe's shuffle and control; with ``other`` (each probe's
    decoy, :func:`decoys`), a keep counts only where the decoy's image is not sent to that class too."""
    kept, held = shuffled == labels, control == labels
    if other is not None:
        kept, held = kept & (shuffled[other] != labels), held & (control[other] != labels)
    return int((kept & ~held).sum()), int((~kept & held).sum())


def score(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, designs: list[tuple[int, float]],
          seed: int, grid: tuple[int, int], controls: tuple[str, ...] = ("blur",)) -> list[dict]:
    """Per design (cells per shuffled tile, blur in cells) and control, the wins and losses over the
    probes classified right, on the layer's ``grid``."""
    right = predict_classes(model, images) == labels
    x, y = images[right], labels[right]
    other = decoys(y, torch.Generator().manual_seed(seed)) if "decoy" in controls else None
    rows = []
    for tile, blur in designs:
        tiles = (grid[0] // tile, grid[1] // tile)
        shuffled = predict_classes(model, shuffled_cells(x, tiles, torch.Generator().manual_seed(seed)))
        blurred_images = blurred_cells(x, grid, blur)
        blurred = predict_classes(model, blurred_images)
        for name in controls:
            if name == "matched":
                wins, losses = wins_losses(y, shuffled, predict_classes(model, matched_statistics(blurred_images, x)))
            else:
                wins, losses = wins_losses(y, shuffled, blurred, other if name == "decoy" else None)
            rows.append({"tile_cells": tile, "blur_cells": blur, "control": name, "grid": list(grid),
                         "pairs": len(y), "wins": wins, "losses": losses, "p": sign_test_p(wins, losses),
                         "accuracy": float(right.float().mean()), "shuffled_top_class": top_share(shuffled),
                         "blurred_top_class": top_share(blurred)})
    return rows


def above_margin(record: dict, margin: float = DETAIL_MARGIN) -> bool:
    """Whether an evaluation's wins exceed its losses by more than ``margin`` of its pairs."""
    return record["pairs"] > 0 and (record["wins"] - record["losses"]) / record["pairs"] > margin


def summarise(records: list[dict]) -> list[dict]:
    """Per design (tile, blur, control): the control evaluations with p < 0.01, the worst one and
    those above the detail arm's margin; the shortcut models' median wins
    (:func:`bench_local_test.design_summary`)."""
    records = [{"control": "blur", **r} for r in records]  # records written before --controls
    fields = ("tile_cells", "blur_cells", "control")
    out = []
    for row, _ in design_summary(records, fields):
        mine = [r for r in records if r["variant"] == "control" and all(r[f] == row[f] for f in fields)]
        out.append({**row, "control_above_margin": sum(above_margin(r) for r in mine)})
    return out


def main() -> None:
    p = cached_models_parser(__doc__, "detail_test")
    p.add_argument("--tiles", default="1,2", help="shuffled tiles' side in grid cells (the monitor: 1)")
    p.add_argument("--blurs", default="0.25,0.5,1.0", help="the blur's standard deviation in cells (the monitor: 0.5)")
    p.add_argument("--controls", default="blur", help=f"comma-separated, of {', '.join(CONTROLS)} (the monitor: blur)")
    args = p.parse_args()
    specs = args.specs
    designs = list(itertools.product([int(t) for t in args.tiles.split(",")], [float(b) for b in args.blurs.split(",")]))
    controls = tuple(args.controls.split(","))
    if unknown := set(controls) - set(CONTROLS):
        p.error(f"unknown --controls {sorted(unknown)}; choose from {', '.join(CONTROLS)}")
    columns = [f"tile {t}, blur {b}, {c}" for t, b in designs for c in controls]
    os.makedirs(args.cache, exist_ok=True)
    records = []
    print("| model | epoch | accuracy | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for spec, probes, epoch, model in trained_models(specs, args.epochs, args.cache):
        grid = layer_grid(model, ARCHS[spec.arch], probes.images, probes.labels)
        rows = score(model, probes.images, probes.labels, designs, epoch, grid, controls)
        records += [{"model": spec.name, "variant": spec.variant, "epoch": epoch, **r} for r in rows]
        print(f"| {spec.name} | {epoch} | {rows[0]['accuracy']:.2f} | "
              + " | ".join(f"{r['wins']}:{r['losses']}" for r in rows) + " |", flush=True)
    summary = summarise(records)
    print(f"\n| tile (cells) | blur (cells) | control | control evaluations | with p < 0.01 | above the margin "
          f"({DETAIL_MARGIN}) | worst control wins:losses | shortcut median wins |\n|---|---|---|---|---|---|---|---|")
    for r in summary:
        print(f"| {r['tile_cells']} | {r['blur_cells']} | {r['control']} | {r['control_evaluations']} | "
              f"{r['control_p_below_0.01']} | {r['control_above_margin']} | {r['worst_control']} | "
              f"{r['shortcut_median_wins']} |")
    write_json({"machine": machine(), "epochs": args.epochs, "specs": [s.text for s in args.specs], "summary": summary,
                "records": records}, args.out)


if __name__ == "__main__":
    main()
