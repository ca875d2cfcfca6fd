"""Does a floating cue recur where an object part does not? Measured on zoo models, per epoch.

A cue that sits anywhere (a stamp, a text tag, a ruler) is the same pixels in every image of its
class; the mask-free tests cannot tell it from an object part of its size (see the reference,
"a cue wider than one cell is missed"). This script measures whether recurrence tells them apart,
on the window each correctly classified probe's Grad-CAM map credits most (``--box`` cells a side,
around the map's peak cell):

- ``pixel``: the window's best normalised cross-correlation anywhere in every other correctly
  classified probe, averaged over the probes predicted as the same class and over the others, and
  the share of those probes holding a near-copy (correlation above ``--copy``);
- ``feature``: the cosine between the peak cells' activation vectors at the monitored layer (the
  model's own view of the window), same class against other classes, and the share above 0.95;
- ``on_cue``: how many of those windows lie on the true cue (the zoo's masks, which nothing
  else here reads).

A recurrence signal would be one whose same-class excess is larger on the shortcut models than on
their controls. Models are trained once per ``base:cue:variant:seed`` spec and cached (the local
test benchmark's cache).

    python benchmarks/bench_recurrence.py --specs digits:text_tag:shortcut:0,digits:text_tag:control:0
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import machine, write_json  # noqa: E402
from bench_local_test import Spec, cached_models_parser, trained_states  # noqa: E402

from cam_monitor.demo.model import ARCHS  # noqa: E402
from cam_monitor.demo.zoo import truth_probes  # noqa: E402
from cam_monitor.engine import compute_cams, predict_classes  # noqa: E402
from cam_monitor.interventions import cell_size  # noqa: E402


def peak_windows(maps: torch.Tensor, box: int, image_size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Per map, the ``box`` x ``box`` cell window centred on its peak cell (moved inside the grid),
    in image pixels."""
    n, h, w = maps.shape
    ch, cw = cell_size(image_size, (h, w))
    peak = maps.flatten(1).argmax(1)
    out = []
    for y, x in zip((peak // w).tolist(), (peak % w).tolist()):
        y0, x0 = min(max(y - box // 2, 0), h - box), min(max(x - box // 2, 0), w - box)
        out.append((y0 * ch, x0 * cw, (y0 + box) * ch, (x0 + box) * cw))
    return out


def best_correlation(template: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(N,): the highest normalised cross-correlation of ``template`` (C, h, w) over every position
    in each of ``images`` (N, C, H, W); 0 for a flat template (nothing to match)."""
    t = template - template.mean()
    if float(t.norm()) < 1e-6:
        return torch.zeros(len(images))
    ones = torch.ones(1, *template.shape)
    total, squares = F.conv2d(images, ones), F.conv2d(images ** 2, ones)
    spread = (squares - total ** 2 / template.numel()).clamp_min(1e-8).sqrt()
    return (F.conv2d(images, t[None]) / (t.norm() * spread)).flatten(1).amax(1)


def same_and_other(preds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the (i, j) pairs of the same predicted class (i != j) and of different classes."""
    same = preds[:, None] == preds[None]
    return same & ~torch.eye(len(preds), dtype=torch.bool), ~same


def measure(model: torch.nn.Module, spec: Spec, box: int, copy: float) -> dict:
    """The recurrence of each correctly classified probe's most-credited window (:mod:`this module <bench_recurrence>`)."""
    probes = truth_probes(spec.cue, spec.seed, 64, spec.base)
    layer = ARCHS[spec.arch]
    images = probes.images
    preds = predict_classes(model, images)
    keep = (preds == probes.labels).nonzero()[:, 0]
    images, preds, cue = images[keep], preds[keep], probes.spurious_masks[keep]
    acts: dict[str, torch.Tensor] = {}
    hook = model.get_submodule(layer).register_forward_hook(lambda m, i, o: acts.__setitem__("a", o.detach()))
    try:
        with torch.no_grad():
            model(images)
    finally:
        hook.remove()
    maps = compute_cams(model, images, layer, preds)
    windows = peak_windows(maps, box, probes.image_size)
    pixel = torch.stack([best_correlation(images[i, :, y0:y1, x0:x1], images)
                         for i, (y0, x0, y1, x1) in enumerate(windows)])
    peak = maps.flatten(1).argmax(1)
    vectors = F.normalize(acts["a"].flatten(2)[torch.arange(len(images)), :, peak], dim=1)
    feature = vectors @ vectors.T
    same, other = same_and_other(preds)
    on_cue = sum(bool(cue[i, y0:y1, x0:x1].float().mean() > 0.25) for i, (y0, x0, y1, x1) in enumerate(windows))
    return {"probes": len(images), "windows_on_cue": on_cue,
            "pixel_same": float(pixel[same].mean()), "pixel_other": float(pixel[other].mean()),
            "copies_same": float((pixel[same] > copy).float().mean()),
            "copies_other": float((pixel[other] > copy).float().mean()),
            "feature_same": float(feature[same].mean()), "feature_other": float(feature[other].mean()),
            "feature_close_same": float((feature[same] > 0.95).float().mean()),
            "feature_close_other": float((feature[other] > 0.95).float().mean())}


def main() -> None:
    p = cached_models_parser(__doc__, "recurrence")
    p.add_argument("--box", type=int, default=2, help="window side in grid cells")
    p.add_argument("--copy", type=float, default=0.9, help="correlation above which a window counts as a copy")
    args = p.parse_args()
    specs = args.specs
    print("| model | epoch | probes | windows on cue | pixel corr. same / other | copies same / other | "
          "feature cos. same / other | close same / other |\n|---|---|---|---|---|---|---|---|")
    records = []
    for spec in specs:
        model = spec.model(truth_probes(spec.cue, spec.seed, 64, spec.base)).eval()
        for epoch, state in enumerate(trained_states(spec, args.epochs, args.cache)):
            model.load_state_dict(state)
            r = {"model": spec.name, "variant": spec.variant, "epoch": epoch, **measure(model, spec, args.box, args.copy)}
            records.append(r)
            print(f"| {spec.name} | {epoch} | {r['probes']} | {r['windows_on_cue']} | {r['pixel_same']:.2f} / "
                  f"{r['pixel_other']:.2f} | {r['copies_same']:.2f} / {r['copies_other']:.2f} | "
                  f"{r['feature_same']:.2f} / {r['feature_other']:.2f} | {r['feature_close_same']:.2f} / "
                  f"{r['feature_close_other']:.2f} |", flush=True)
    write_json({"machine": machine(), "epochs": args.epochs, "box": args.box, "copy": args.copy,
                "specs": [s.text for s in args.specs], "records": records}, args.out)


if __name__ == "__main__":
    main()
