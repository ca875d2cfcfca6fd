"""A plain Lightning Trainer on your own image folder, monitored by CAMMonitor.

    python examples/train_imagefolder.py --data DATA --probes PROBES [--epochs 5] [--size 224] [--out runs/imagefolder]

DATA holds ``train/<class>/*.png`` and ``val/<class>/*.png`` (torchvision ImageFolder layout);
PROBES is a probe folder (docs/reference.md, "Probe folders") with the same class sub-folders and optional
``<stem>.spurious.png`` / ``<stem>.object.png`` masks. The model is a torchvision ResNet-18 with
random weights (``weights=None``); swap in your own. Checkpoints are kept only while the maps stay
off the spurious regions (``GatedModelCheckpoint``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader
from torchvision.transforms import v2

import cam_monitor as cm

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageClassifier(L.LightningModule):
    """ResNet-18 classifier; ``self.net.layer4`` is the layer the monitor explains."""

    def __init__(self, num_classes: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torchvision.models.resnet18(weights=None, num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def preprocess(size: int) -> v2.Compose:
    """Resize and normalise; the same transform for data and probes (no random crops for probes)."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize((size, size), antialias=True),
                       v2.Normalize(MEAN, STD)])


def main(argv: list[str] | None = None) -> L.Trainer:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--probes", required=True, type=Path)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="runs/imagefolder")
    args = p.parse_args(argv)

    tf = preprocess(args.size)
    train = torchvision.datasets.ImageFolder(str(args.data / "train"), transform=tf)
    val = torchvision.datasets.ImageFolder(str(args.data / "val"), transform=tf)
    # Probe images are read as [0, 1] tensors; apply the model's resize + normalisation to them.
    probe_tf = v2.Compose([v2.Resize((args.size, args.size), antialias=True), v2.Normalize(MEAN, STD)])
    probes = cm.ProbeSet.from_folder(args.probes, transform=probe_tf, mean=MEAN, std=STD,
                                     num_classes=len(train.classes))

    monitor = cm.CAMMonitor("net.layer4", probes, alerting=cm.AlertSettings(action="warn"))
    keep = cm.GatedModelCheckpoint(monitor="cam/quality", mode="max", gate={"cam/spurious_enrichment": "<= 2.0"})
    trainer = L.Trainer(max_epochs=args.epochs, callbacks=[monitor, keep], default_root_dir=args.out,
                        logger=TensorBoardLogger(args.out, name="imagefolder"))
    trainer.fit(ImageClassifier(num_classes=len(train.classes)),
                DataLoader(train, batch_size=args.batch_size, shuffle=True),
                DataLoader(val, batch_size=args.batch_size))
    print(f"alerts: {monitor.alerts}\nbest checkpoint: {keep.best_model_path or 'none passed the gate'}")
    print(f"dashboard: tensorboard --logdir {args.out}")
    return trainer


if __name__ == "__main__":
    main()
