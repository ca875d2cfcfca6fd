"""How far does a floating cue carry its class when it is moved whole? The ceiling of any paste test.

The mask-free local test pastes the window a probe's map credits most into a probe of another
class. On floating cues (a stamp, a text tag, a ruler at no fixed place) it finds nothing (the
reference, "Mask-free shortcut discovery", item 2). This script asks what the best possible paste
test would see: it reads the zoo's true cue masks (which the monitor never has) and, for pairs of
correctly classified probes of different classes whose cues have the same size, moves each cue
whole over the other's:

- ``recipient_follows``: the recipient with the source's cue over its own is classified as the
  source's class (the class follows the cue);
- ``recipient_keeps``: it keeps its own class (the class stays with the object);
- ``source_keeps`` / ``source_follows``: the same for the source with the recipient's cue;
- ``oracle wins:losses``: the paste test with a perfect window and a fair control, the source's
  cue pasted over the recipient's against a box of the same size from elsewhere in the source
  (clear of its cue) pasted at the same place, and the exact sign test's p-value.

On a control model (cue independent of the label) the class should follow the cue about as often
as chance; on a shortcut model ``recipient_follows`` is the share of conflicts the cue wins, and a
paste test cannot flip more recipients than that however well it finds the cue.

    python benchmarks/bench_cue_transplant.py --specs digits:interior_patch:shortcut:0,digits:interior_patch:control:0

Prints one row per model and epoch, writes ``benchmarks/results/cue_transplant_cpu.json``
(``--out`` for another file). Models are trained once per spec and cached (the local test
benchmark's cache).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import machine, write_json  # noqa: E402
from bench_local_test import cached_models_parser, trained_models  # noqa: E402

from cam_monitor.demo.zoo import truth_probes  # noqa: E402
from cam_monitor.engine import predict_classes  # noqa: E402
from cam_monitor.evidence import sign_test_p  # noqa: E402
from cam_monitor.interventions import Box, Paste, pasted_images  # noqa: E402


def cue_boxes(masks: torch.Tensor) -> list[Box | None]:
    """Each (H, W) mask's bounding box (y0, x0, y1, x1) in pixels; None where a probe has no cue."""
    out: list[Box | None] = []
    for mask in masks:
        ys, xs = torch.where(mask)
        out.append(None if len(ys) == 0 else (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1))
    return out


def _size(box: Box) -> tuple[int, int]:
    return box[2] - box[0], box[3] - box[1]


def transplant_pairs(labels: torch.Tensor, preds: torch.Tensor, boxes: list[Box | None], num: int,
                     gen: torch.Generator) -> list[tuple[int, int]]:
    """Up to ``num`` (source, recipient) pairs, drawn in a seeded order from every pair of correctly
    classified probes of different classes whose cues have boxes of the same size."""
    ok = [i for i in (preds == labels).nonzero().flatten().tolist() if boxes[i] is not None]
    pairs = [(a, r) for a in ok for r in ok
             if labels[a] != labels[r] and _size(boxes[a]) == _size(boxes[r])]  # type: ignore[arg-type]
    order = torch.randperm(len(pairs), generator=gen)[:num].tolist()
    return [pairs[i] for i in order]


def elsewhere(box: Box, image_size: tuple[int, int], gen: torch.Generator, tries: int = 100) -> Box | None:
    """A box of ``box``'s size at a random place of the image that does not overlap ``box``
    (None where none was found in ``tries`` draws)."""
    (h, w), (height, width) = _size(box), image_size
    for _ in range(tries):
        y = int(torch.randint(0, height - h + 1, (1,), generator=gen))
        x = int(torch.randint(0, width - w + 1, (1,), generator=gen))
        if y >= box[2] or y + h <= box[0] or x >= box[3] or x + w <= box[1]:
            return y, x, y + h, x + w
    return None


def measure(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, num: int,
            seed: int) -> dict:
    """The swap and oracle rates of :mod:`this benchmark <bench_cue_transplant>` on one model."""
    preds = predict_classes(model, images)
    boxes = cue_boxes(masks)
    gen = torch.Generator().manual_seed(seed)
    pairs = transplant_pairs(labels, preds, boxes, num, gen)
    row = {"accuracy": float((preds == labels).float().mean()), "pairs": len(pairs)}
    if not pairs:
        return {**row, "recipient_follows": None, "recipient_keeps": None, "source_keeps": None,
                "source_follows": None, "oracle_pairs": 0, "oracle_wins": 0, "oracle_losses": 0, "oracle_p": 1.0}
    moved = [Paste(a, boxes[a], r, boxes[r]) for a, r in pairs]  # type: ignore[arg-type]
    back = [Paste(r, boxes[r], a, boxes[a]) for a, r in pairs]  # type: ignore[arg-type]
    fair = [(p, elsewhere(boxes[p.source], tuple(images.shape[-2:]), gen)) for p in moved]  # type: ignore[arg-type]
    fair = [(p, box) for p, box in fair if box is not None]
    controls = [p._replace(box=box) for p, box in fair]
    out = predict_classes(model, pasted_images(images, moved + back + [p for p, _ in fair] + controls))
    source = labels[[a for a, _ in pairs]]
    recipient = labels[[r for _, r in pairs]]
    k, m = len(pairs), len(fair)
    test_out, back_out = out[:k], out[k:2 * k]
    rate = lambda hit: float(hit.float().mean())  # noqa: E731
    row.update(recipient_follows=rate(test_out == source), recipient_keeps=rate(test_out == recipient),
               source_keeps=rate(back_out == source), source_follows=rate(back_out == recipient))
    fair_source = labels[[p.source for p, _ in fair]]
    flips, control_flips = out[2 * k:2 * k + m] == fair_source, out[2 * k + m:] == fair_source
    wins, losses = int((flips & ~control_flips).sum()), int((~flips & control_flips).sum())
    return {**row, "oracle_pairs": m, "oracle_wins": wins, "oracle_losses": losses, "oracle_p": sign_test_p(wins, losses)}


def main() -> None:
    p = cached_models_parser(__doc__, "cue_transplant")
    p.add_argument("--pairs", type=int, default=200, help="swaps per model and epoch")
    args = p.parse_args()
    specs = args.specs
    records = []
    print("| model | epoch | accuracy | pairs | recipient follows the cue | keeps its class | source keeps its class "
          "| follows the cue | oracle wins:losses | p |\n|---|---|---|---|---|---|---|---|---|---|")
    for spec, probes, epoch, model in trained_models(specs, args.epochs, args.cache):
        truth = truth_probes(spec.cue, spec.seed, 64, spec.base)
        if not torch.equal(truth.images, probes.images):
            raise RuntimeError(f"{spec.name}: the truth probes are not the mask-free probes")
        row = measure(model, truth.images, truth.labels, truth.spurious_masks, args.pairs, epoch)
        records.append({"model": spec.name, "variant": spec.variant, "epoch": epoch, **row})
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {spec.name} | {epoch} | {row['accuracy']:.2f} | {row['pairs']} | {fmt(row['recipient_follows'])} | "
              f"{fmt(row['recipient_keeps'])} | {fmt(row['source_keeps'])} | {fmt(row['source_follows'])} | "
              f"{row['oracle_wins']}:{row['oracle_losses']} | {row['oracle_p']:.2g} |", flush=True)
    write_json({"machine": machine(), "epochs": args.epochs, "pairs": args.pairs, "specs": [s.text for s in args.specs],
                "records": records}, args.out)


if __name__ == "__main__":
    main()
