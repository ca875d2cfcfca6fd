"""A conflict test for textures, scored on zoo models beside the monitor's detail and spectrum arms.

The detail arm takes detail away from one probe (cells shuffled against a blur) and asks whether
its class stays; a model that reads a texture *and* the object keeps its class on the blur too,
and the arm sees little (a ResNet-18 on Drawn Shapes: 4:2 to 13:1 pairs an evaluation while its
gap was 0.7-0.9). This script scores a test that puts the texture against the object instead:

- **test**: a probe of another class (the recipient) blurred at half a cell (its own fine detail,
  a texture among it, gone; its shapes kept), plus the candidate's fine detail (the candidate
  minus its own blur) from outside the quarter of its pixels its map credits most (its
  background, as the map sees it);
- **control**: the same blurred recipient plus the candidate's fine detail from inside that
  quarter (its object's).

A flip is the recipient taking the candidate's class. A model that reads the object finds more of
the candidate's class in its object's detail (the control); one that reads a texture finds three
times as much texture in the background as in the quarter (the test). The assumption is the
spectrum arm's: the map covers the object. Per evaluation ``--pairs`` (candidate, recipient)
pairs of correctly classified probes of different classes; the same pairs for the spectrum arm;
every correctly classified probe once for the detail arm (as the monitor pairs it).

    python benchmarks/bench_background_detail.py --specs digits:background_texture:shortcut:0,digits:background_texture:control:0

Prints one row per model and epoch, then per test the worst control evaluation (by the exact sign
test) and the shortcut models' median wins; writes ``benchmarks/results/background_detail_cpu.json``.
Weights are shared with ``bench_local_test.py`` through ``--cache``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import machine, write_json  # noqa: E402
from bench_local_test import cached_models_parser, design_summary, trained_models  # noqa: E402

from cam_monitor.demo.model import ARCHS  # noqa: E402
from cam_monitor.engine import compute_cams, predict_classes  # noqa: E402
from cam_monitor.evidence import sign_test_p  # noqa: E402
from cam_monitor.interventions import (background_detail_images, detail_images, object_regions,  # noqa: E402
                                       spectrum_images)

TESTS = ("background_detail", "detail", "spectrum")


def draw_pairs(preds: torch.Tensor, labels: torch.Tensor, num: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Up to ``num`` (candidate, recipient) pairs of correctly classified probes predicted as different classes."""
    ok = (preds == labels).nonzero()[:, 0]
    sources, recipients = [], []
    for _ in range(num if len(ok) else 0):
        a = int(ok[torch.randint(len(ok), (1,), generator=gen)])
        others = ok[preds[ok] != preds[a]]
        if len(others):
            sources.append(a)
            recipients.append(int(others[torch.randint(len(others), (1,), generator=gen)]))
    return sources, recipients


def outcome(test: torch.Tensor, control: torch.Tensor) -> dict:
    """Wins (only the test flipped), losses (only the control did), pairs and the exact one-sided p."""
    wins, losses = int((test & ~control).sum()), int((~test & control).sum())
    return {"wins": wins, "losses": losses, "pairs": len(test), "p": sign_test_p(wins, losses)}


def score(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, layer: str, pairs: int,
          seed: int) -> tuple[float, dict[str, dict]]:
    """One evaluation of ``model``: its accuracy on ``images`` and the three tests (see the module docstring)."""
    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([predict_classes(model, x[i:i + 128]) for i in range(0, len(x), 128)])

    preds = predict(images)
    maps = compute_cams(model, images, layer, preds)
    grid, size = tuple(maps.shape[-2:]), tuple(images.shape[-2:])
    gen = torch.Generator().manual_seed(seed)
    objects = object_regions(maps, size)
    sources, recipients = draw_pairs(preds, labels, pairs, gen)
    cls, n = preds[sources], len(sources)
    out = {}
    for name, make in (("background_detail", lambda: background_detail_images(images, objects, grid, sources, recipients)),
                       ("spectrum", lambda: spectrum_images(images, objects, sources, recipients))):
        flips = predict(make()) == cls.repeat(2) if n else torch.zeros(0, dtype=torch.bool)
        out[name] = outcome(flips[:n], flips[n:])
    correct = (preds == labels).nonzero()[:, 0]
    kept = preds[correct].repeat(2)
    flips = predict(detail_images(images, correct.tolist(), grid, gen)) == kept
    out["detail"] = outcome(flips[:len(correct)], flips[len(correct):])
    return float((preds == labels).float().mean()), out


def main() -> None:
    p = cached_models_parser(__doc__, "background_detail")
    p.add_argument("--pairs", type=int, default=200, help="(candidate, recipient) pairs per model and epoch")
    args = p.parse_args()
    print("| model | epoch | accuracy | " + " | ".join(TESTS) + " |\n|---|---|---|" + "---|" * len(TESTS))
    records = []
    for spec, probes, epoch, model in trained_models(args.specs, args.epochs, args.cache):
        accuracy, scored = score(model, probes.images, probes.labels, ARCHS[spec.arch], args.pairs, epoch)
        records += [{"model": spec.name, "variant": spec.variant, "epoch": epoch, "accuracy": accuracy,
                     "test": name, **row} for name, row in scored.items()]
        print(f"| {spec.name} | {epoch} | {accuracy:.2f} | " + " | ".join(
            f"{scored[t]['wins']}:{scored[t]['losses']} of {scored[t]['pairs']}" for t in TESTS) + " |", flush=True)
    summary = [row for row, _ in design_summary(records, ("test",))]
    print("\n| test | control evaluations | with p < 0.01 | worst control wins:losses | shortcut median wins |\n"
          "|---|---|---|---|---|")
    for r in summary:
        print(f"| {r['test']} | {r['control_evaluations']} | {r['control_p_below_0.01']} | {r['worst_control']} | "
              f"{r['shortcut_median_wins']} |")
    write_json({"machine": machine(), "epochs": args.epochs, "pairs": args.pairs, "specs": [s.text for s in args.specs],
                "summary": summary, "records": records}, args.out)


if __name__ == "__main__":
    main()
