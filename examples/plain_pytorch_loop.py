"""The engine and metrics in a plain PyTorch loop, no Lightning.

    python examples/plain_pytorch_loop.py [--epochs 3]

Trains the small CNN on Decoy Digits (decoy codes the label) and, after each epoch, explains a
fixed probe set with one CAM pass, then prints how much of each map sits on the decoy and the
digit, and the drift from the first epoch. The pass leaves the model's training state alone, so
it can run anywhere in the loop.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import cam_monitor as cm
from cam_monitor import metrics
from cam_monitor.demo.data import make_decoy_digits
from cam_monitor.demo.model import SmallCNN


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    data = make_decoy_digits(args.seed)
    probes = cm.ProbeSet.from_dataset(data.val, per_class=2, seed=args.seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = data.train_shortcut
    reference, rows = None, []
    for epoch in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(train)).split(64):
            loss = F.cross_entropy(model(train.images[idx]), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        maps = cm.compute_cams(model, probes.images, "features", targets=probes.labels)
        row = {
            "epoch": epoch,
            "spurious_enrichment": metrics.nanmean(metrics.enrichment(maps, probes.spurious_masks))[0],
            "object_energy": metrics.nanmean(metrics.energy_fraction(maps, probes.object_masks))[0],
            "drift_from_first": 0.0 if reference is None else metrics.nanmean(1 - metrics.spearman(maps, reference))[0],
        }
        reference = maps if reference is None else reference
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return rows


if __name__ == "__main__":
    main()
