"""The monitor in a Lightning Fabric loop: ``cam_monitor.Monitor`` driven by hand.

    python examples/fabric_loop.py [--epochs 2] [--out out/fabric]

Fabric sets up the model and optimizer; the monitor is told where the model runs (a
``cm.Placement``: the device, and the precision's input conversion and forward context) and
evaluates after each epoch on rank 0's process group. Pictures and ``alerts.jsonl`` go under
``--out`` on rank 0 only; every rank computes the same metrics.
"""
from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F

import cam_monitor as cm
from cam_monitor.demo.data import make_decoy_digits
from cam_monitor.demo.model import SmallCNN


def placement(fabric: L.Fabric) -> cm.Placement:
    """Where the probes go for this Fabric: its device, its precision's input conversion and
    forward context, and its process group (every rank evaluates a shard, the shards are gathered)."""
    return cm.Placement(device=fabric.device, prepare=lambda x: fabric.to_device(x), rank=fabric.global_rank,
                        world=fabric.world_size, forward_context=fabric.autocast,
                        gather=(lambda t: fabric.all_gather(t.to(fabric.device)).cpu()) if fabric.world_size > 1 else None)


def main(argv: list[str] | None = None) -> cm.Monitor:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/fabric")
    p.add_argument("--accelerator", default="cpu")
    args = p.parse_args(argv)

    fabric = L.Fabric(accelerator=args.accelerator, devices=1)
    fabric.seed_everything(args.seed)
    data = make_decoy_digits(args.seed)
    model = SmallCNN()
    model, opt = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=3e-3))
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(data.train_shortcut, batch_size=64, shuffle=True))
    monitor = cm.Monitor("features", probe_settings=cm.ProbeSettings(num_probes=20), alerting=cm.AlertSettings(action="log"))
    if fabric.is_global_zero:
        monitor.open(args.out)
    where = placement(fabric)
    # target_layer names a module of the user's model; the pass calls Fabric's wrapper around it
    monitor.prepare(model.module, where, loader=torch.utils.data.DataLoader(data.val), which="validation set",
                    runner=model)
    step = 0
    try:
        for epoch in range(args.epochs):
            model.train()
            for batch in loader:
                loss = F.cross_entropy(model(batch["image"]), batch["label"])
                opt.zero_grad()
                fabric.backward(loss)
                opt.step()
                step += 1
            monitor.evaluate(model.module, where, epoch=epoch, step=step, runner=model)
            fabric.print(f"epoch {epoch}: spurious_enrichment={monitor.latest_metrics()['cam/spurious_enrichment']:.2f}, "
                         f"alerts so far: {[a['rule'] for a in monitor.alerts]}")
    finally:
        monitor.close()
    return monitor


if __name__ == "__main__":
    main()
