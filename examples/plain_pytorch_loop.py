"""The whole monitor in a plain PyTorch loop, no Lightning: ``cam_monitor.Monitor``.

    python examples/plain_pytorch_loop.py [--epochs 3] [--out out/plain]

Trains the small CNN on Decoy Digits (the decoy codes the label) and, after each epoch, runs one
monitor evaluation: the CAM pass and metrics on a fixed probe set picked from the validation
loader, the alert rules (the spurious-mask rule fires: the maps sit on the decoy), mask-free
discovery, the pictures (PNG files) and ``alerts.jsonl`` under ``--out``. It prints one line per
epoch. The evaluation leaves the model's training state alone, so it can run anywhere in the loop.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import cam_monitor as cm
from cam_monitor.demo.data import make_decoy_digits
from cam_monitor.demo.model import SmallCNN


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/plain")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    data = make_decoy_digits(args.seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    monitor = cm.Monitor("features", probe_settings=cm.ProbeSettings(num_probes=20, seed=args.seed),
                         alerting=cm.AlertSettings(action="log"), pictures=cm.PictureSettings(tile_size=64))
    monitor.open(args.out)  # PNG files and alerts.jsonl; pass sinks=[...] for TensorBoard or W&B
    monitor.prepare(model, loader=torch.utils.data.DataLoader(data.val, batch_size=64), which="validation set")
    train, step, rows = data.train_shortcut, 0, []
    try:
        for epoch in range(args.epochs):
            model.train()
            for idx in torch.randperm(len(train)).split(64):
                loss = F.cross_entropy(model(train.images[idx]), train.labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
            outcome = monitor.evaluate(model, epoch=epoch, step=step)
            row = {k.removeprefix("cam/"): v for k, v in monitor.latest_metrics().items()
                   if k in ("cam/spurious_enrichment", "cam/drift_ref", "cam/shortcut_evidence")}
            rows.append({"epoch": epoch, **row})
            fired = ", ".join(a["rule"] for a in outcome.fired) if outcome else ""
            print(f"epoch={epoch} " + " ".join(f"{k}={v:.3g}" for k, v in row.items()) + f" fired=[{fired}]")
    finally:
        monitor.close()
    return rows


if __name__ == "__main__":
    main()
