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

Prints one row per model and epoch (wins:losses per design), then per design the worst control
evaluation and the shortcut models' median wins; writes ``benchmarks/results/detail_test_cpu.json``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import default_result_path, machine, write_json  # noqa: E402
from bench_local_test import Spec, design_summary, trained_states  # noqa: E402

from cam_monitor.demo.model import ARCHS  # noqa: E402
from cam_monitor.demo.zoo import mask_free_probes  # noqa: E402
from cam_monitor.engine import compute_cams, predict_classes  # noqa: E402
from cam_monitor.evidence import sign_test_p  # noqa: E402
from cam_monitor.interventions import blurred_cells, shuffled_cells  # noqa: E402

def layer_grid(model: torch.nn.Module, layer: str, images: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """The grid of ``layer`` (its maps' height and width) on these images."""
    return tuple(compute_cams(model, images[:1], layer, labels[:1]).shape[-2:])


def score(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, designs: list[tuple[int, float]],
          seed: int, grid: tuple[int, int]) -> list[dict]:
    """Per design (cells per shuffled tile, blur in cells), the wins and losses over the probes
    classified right, on the layer's ``grid``."""
    right = predict_classes(model, images) == labels
    x, y = images[right], labels[right]
    rows = []
    for tile, blur in designs:
        tiles = (grid[0] // tile, grid[1] // tile)
        kept = predict_classes(model, shuffled_cells(x, tiles, torch.Generator().manual_seed(seed))) == y
        control = predict_classes(model, blurred_cells(x, grid, blur)) == y
        wins, losses = int((kept & ~control).sum()), int((~kept & control).sum())
        rows.append({"tile_cells": tile, "blur_cells": blur, "grid": list(grid), "pairs": len(y), "wins": wins,
                     "losses": losses, "p": sign_test_p(wins, losses), "accuracy": float(right.float().mean())})
    return rows


def summarise(records: list[dict]) -> list[dict]:
    """Per design (tile, blur): the control evaluations with p < 0.01 and the worst one; the shortcut
    models' median wins (:func:`bench_local_test.design_summary`)."""
    return [row for row, _ in design_summary(records, ("tile_cells", "blur_cells"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--specs", required=True, help="comma-separated base:cue:variant:seed[:arch]")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--tiles", default="1,2", help="shuffled tiles' side in grid cells (the monitor: 1)")
    p.add_argument("--blurs", default="0.25,0.5,1.0", help="the blur's standard deviation in cells (the monitor: 0.5)")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "cam_monitor_zoo_states"),
                   help="where each model's per-epoch weights are kept (shared with bench_local_test.py)")
    p.add_argument("--out", default=default_result_path("detail_test", torch.device("cpu")))
    args = p.parse_args()
    specs = [Spec.parse(s) for s in args.specs.split(",")]
    designs = list(itertools.product([int(t) for t in args.tiles.split(",")], [float(b) for b in args.blurs.split(",")]))
    os.makedirs(args.cache, exist_ok=True)
    records = []
    print("| model | epoch | accuracy | " + " | ".join(f"tile {t}, blur {b}" for t, b in designs) + " |")
    print("|---|---|---|" + "---|" * len(designs))
    for spec in specs:
        probes = mask_free_probes(spec.cue, spec.seed, 64, spec.base)
        model = spec.model(probes).eval()
        for epoch, state in enumerate(trained_states(spec, args.epochs, args.cache)):
            model.load_state_dict(state)
            grid = layer_grid(model, ARCHS[spec.arch], probes.images, probes.labels)
            rows = score(model, probes.images, probes.labels, designs, epoch, grid)
            records += [{"model": spec.name, "variant": spec.variant, "epoch": epoch, **r} for r in rows]
            print(f"| {spec.name} | {epoch} | {rows[0]['accuracy']:.2f} | "
                  + " | ".join(f"{r['wins']}:{r['losses']}" for r in rows) + " |", flush=True)
    summary = summarise(records)
    print("\n| tile (cells) | blur (cells) | control evaluations | with p < 0.01 | worst control wins:losses | "
          "shortcut median wins |\n|---|---|---|---|---|---|")
    for r in summary:
        print(f"| {r['tile_cells']} | {r['blur_cells']} | {r['control_evaluations']} | {r['control_p_below_0.01']} | "
              f"{r['worst_control']} | {r['shortcut_median_wins']} |")
    write_json({"machine": machine(), "epochs": args.epochs, "specs": args.specs.split(","), "summary": summary,
                "records": records}, args.out)


if __name__ == "__main__":
    main()
