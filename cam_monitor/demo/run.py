"""``cam-monitor demo``: train the small CNN on Decoy Digits and save Grad-CAM overlays of its probes.

This first version trains the shortcut model (the decoy pattern codes the label) and writes the
probe grid before and after training plus the explanation metrics, so a user sees the maps move
onto the decoy. The monitored, two-run demo replaces it once the Lightning callback lands.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import lightning as L
import torch

from .. import metrics as M
from ..engine import cam_pass
from ..probes import ProbeSet
from ..render import probe_grid, save_png
from .model import DecoyDigitsDataModule, DigitClassifier

LAYER = "net.features"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cam-monitor demo", description=__doc__)
    p.add_argument("--epochs", type=int, default=4, help="training epochs (default 4)")
    p.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-class", type=int, default=2, help="probes per class (default 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    return args


def explain(model: torch.nn.Module, probes: ProbeSet) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Grad-CAM of each probe's true class, its aggregate metrics, and the predictions."""
    result = cam_pass(model, probes.images.to(model.device), LAYER, probes.labels.to(model.device))
    maps = result.maps["gradcam"][:, 0].cpu()
    numbers = {
        "spurious_enrichment": M.nanmean(M.enrichment(maps, probes.spurious_masks))[0],
        "spurious_energy": M.nanmean(M.energy_fraction(maps, probes.spurious_masks))[0],
        "object_energy": M.nanmean(M.energy_fraction(maps, probes.object_masks))[0],
    }
    return maps, numbers, result.logits.argmax(1).cpu()


def save_grid(path: Path, probes: ProbeSet, maps: torch.Tensor, preds: torch.Tensor) -> None:
    grid = probe_grid(probes.display_images(), maps, ids=probes.ids, labels=probes.labels.tolist(),
                      preds=preds.tolist(), spurious_energy=M.energy_fraction(maps, probes.spurious_masks).tolist(),
                      spurious_masks=probes.spurious_masks, object_masks=probes.object_masks, nrow=10, tile_size=96)
    save_png(grid, path)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    start = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)
    data = DecoyDigitsDataModule("shortcut", seed=args.seed)
    data.setup()
    probes = ProbeSet.from_dataset(data.data.val, per_class=args.per_class, seed=args.seed, num_classes=10)
    model = DigitClassifier()
    before, m_before, p_before = explain(model, probes)
    save_grid(out / "probes_before.png", probes, before, p_before)
    accelerator = "auto" if args.device == "auto" else ("gpu" if args.device == "cuda" else args.device)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator=accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(out))
    trainer.fit(model, data)
    model.eval()
    after, m_after, p_after = explain(model, probes)
    save_grid(out / "probes_after.png", probes, after, p_after)
    summary = {"before": m_before, "after": m_after, "seconds": time.perf_counter() - start}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / "summary.json")
    print(f"\n{'metric':<22}{'before':>10}{'after':>10}")
    for key in m_before:
        print(f"{key:<22}{m_before[key]:>10.3f}{m_after[key]:>10.3f}")
    print(f"\nwrote {out / 'probes_before.png'}, {out / 'probes_after.png'} and {out / 'summary.json'}")
    return 0
