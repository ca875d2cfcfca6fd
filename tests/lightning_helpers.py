"""Small Lightning runs on Decoy Digits shared by the callback tests (CPU, seconds each)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

import cam_monitor as cm
from cam_monitor.demo.model import DecoyDigitsDataModule, DigitClassifier
from cam_monitor.engine import default_output_transform

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")

LAYER = "net.features"


def fit(tmp_path: Path, monitor: cm.CAMMonitor | None = None, *, epochs: int = 2, variant: str = "shortcut",
        seed: int = 0, model: L.LightningModule | None = None, callbacks: list | None = None,
        ckpt_path: str | None = None, **trainer_kwargs: Any) -> tuple[L.Trainer, L.LightningModule]:
    """Train the demo CNN for a few small epochs with ``monitor`` attached; return (trainer, model)."""
    L.seed_everything(seed, verbose=False)
    data = DecoyDigitsDataModule(variant, seed=seed, batch_size=64)
    model = model or DigitClassifier()
    kwargs: dict[str, Any] = dict(max_epochs=epochs, default_root_dir=str(tmp_path), enable_progress_bar=False,
                                  enable_model_summary=False, limit_train_batches=8, num_sanity_val_steps=0,
                                  logger=False, enable_checkpointing=False, deterministic=True)
    kwargs.update(trainer_kwargs)
    trainer = L.Trainer(callbacks=[c for c in [monitor, *(callbacks or [])] if c is not None], **kwargs)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model


def quick_monitor(**kwargs: Any) -> cm.CAMMonitor:
    """A monitor on the demo CNN with small defaults for tests."""
    kwargs.setdefault("target_layer", LAYER)
    kwargs.setdefault("probe_settings", cm.ProbeSettings(num_probes=20))
    kwargs.setdefault("alerting", cm.AlertSettings(action="log"))
    return cm.CAMMonitor(**kwargs)


def cam_scalars(monitor: cm.CAMMonitor) -> list[dict[str, float]]:
    """History rows without NaN-unfriendly comparisons: NaN -> None, floats rounded."""
    def clean(v):
        return v if isinstance(v, str) else (None if v != v else round(float(v), 6))
    return [{k: clean(v) for k, v in h.items()} for h in monitor.history]


def tensor_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0)))


class Classifier(L.LightningModule):
    """Any image classifier (a tensor, or an output with ``.logits``) trained with cross-entropy."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)

    def step(self, batch):
        x, y = batch
        return F.cross_entropy(default_output_transform(self(x)), y)

    def training_step(self, batch, _idx):
        return self.step(batch)

    def validation_step(self, batch, _idx):
        self.log("val/loss", self.step(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def random_loader(n: int, size: int, seed: int, num_classes: int) -> torch.utils.data.DataLoader:
    """``n`` random RGB images of ``size`` px with balanced labels, in batches of 8."""
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % num_classes)
    return torch.utils.data.DataLoader(data, batch_size=8)


def fit_classifier(tmp_path: Path, model: nn.Module, monitor: cm.CAMMonitor, size: int, num_classes: int,
                   train: int = 16, val: int = 8) -> L.Trainer:
    """Two epochs of :class:`Classifier` on random RGB images of ``size`` px, warnings silenced."""
    trainer = L.Trainer(max_epochs=2, default_root_dir=str(tmp_path), enable_progress_bar=False, logger=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        callbacks=[monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Classifier(model), random_loader(train, size, 0, num_classes), random_loader(val, size, 1, num_classes))
    return trainer
