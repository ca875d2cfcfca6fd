"""The demo's Lightning pieces: a small CNN classifier and the Decoy Digits data module.

Both take plain typed arguments so they work from a LightningCLI YAML (``configs/demo.yaml``).
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .data import BASES, NUM_CLASSES, DecoyDigits, DecoySplit, check_cue, check_degradation, make_decoy_digits


class SmallCNN(nn.Module):
    """Conv blocks down to an 8x8 grid (32 -> 16 -> 8 px for the digits; one more stride-2 block
    per doubling of ``image_size``), global average pooling, one linear layer.

    ``features`` ends on an 8x8 grid (stride 4 at 32 px, 8 at 64): the layer the demo explains. BatchNorm uses
    momentum 0.3 so its running statistics keep up with the weights in runs of a few epochs
    (with the default 0.1 the eval-mode model is still at chance after the first epoch).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = NUM_CLASSES, width: int = 16,
                 image_size: int = 32) -> None:
        super().__init__()
        bn = lambda c: nn.BatchNorm2d(c, momentum=0.3)  # noqa: E731
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1), bn(width), nn.ReLU()]
        channels, size = width, image_size
        while size > 8:
            layers += [nn.Conv2d(channels, 2 * channels, 3, padding=1, stride=2), bn(2 * channels), nn.ReLU()]
            channels, size = 2 * channels, size // 2
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def digit_resnet18(num_classes: int = NUM_CLASSES, in_channels: int = 1) -> nn.Module:
    """torchvision's ResNet-18 (random weights) for 1-channel 32 px digits: a 3x3 stride-1 stem and
    no max-pool, so ``layer4`` ends on a 4x4 grid (stride 8), as a ResNet-18 adapted to small
    images; BatchNorm momentum 0.3 as in :class:`SmallCNN`."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.3
    return net


#: The demo's architectures and the layer each explains.
ARCHS = {"cnn": "net.features", "resnet18": "net.layer4"}


class DigitClassifier(L.LightningModule):
    """Cross-entropy training of :class:`SmallCNN` (``arch="cnn"``) or :func:`digit_resnet18`
    (``arch="resnet18"``) with Adam; logs ``train/loss``, ``val/loss``, ``val/acc``."""

    def __init__(self, lr: float = 3e-3, width: int = 16, arch: str = "cnn", in_channels: int = 1,
                 image_size: int = 32) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
        self.save_hyperparameters()
        self.net = (SmallCNN(in_channels, width=width, image_size=image_size) if arch == "cnn"
                    else digit_resnet18(in_channels=in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @staticmethod
    def unpack(batch: dict[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) from a Decoy Digits dict batch or an (x, y) tuple batch."""
        if isinstance(batch, dict):
            return batch["image"], batch["label"]
        return batch[0], batch[1]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = self.unpack(batch)
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x, y = self.unpack(batch)
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class EpochSeededSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): Lightning calls ``set_epoch`` every epoch, so a
    run resumed from a checkpoint sees exactly the batches an uninterrupted run would."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class DecoyDigitsDataModule(L.LightningDataModule):
    """Decoy Digits for Lightning: ``variant="shortcut"`` (the cue codes the label) or ``"control"``;
    ``cue`` picks the zoo task (:data:`~cam_monitor.demo.data.CUES`, default the corner patch) and
    ``base`` the images it goes over (:data:`~cam_monitor.demo.data.BASES`: the digits, or Drawn
    Shapes in colour at 64 px, which need ``DigitClassifier(in_channels=3)``); ``degradation``
    puts every image through sensor noise or JPEG (:func:`~cam_monitor.demo.data.degraded`).

    Validation always uses matched decoys (the realistic case where validation shares the bias).
    Batches are dicts (``image``, ``label``, ``spurious_mask``, ``object_mask``), so a monitor
    that picks its probes from the validation set gets the masks too. ``data`` holds every split,
    including the ground-truth test splits, after :meth:`setup`.
    """

    def __init__(self, variant: str = "shortcut", batch_size: int = 64, seed: int = 0, correlation: float = 1.0,
                 num_workers: int = 0, cue: str = "corner_patch", base: str = "digits",
                 degradation: str = "clean") -> None:
        super().__init__()
        if variant not in ("shortcut", "control"):
            raise ValueError(f"variant must be 'shortcut' or 'control', got {variant!r}")
        if base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {base!r}")
        check_cue(cue)
        check_degradation(degradation)
        self.variant, self.batch_size, self.seed, self.cue, self.base = variant, batch_size, seed, cue, base
        self.degradation = degradation
        self.correlation, self.num_workers = correlation, num_workers
        self.data: DecoyDigits | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = make_decoy_digits(self.seed, self.correlation, cue=self.cue, base=self.base,
                                          degradation=self.degradation)

    def _loader(self, split: DecoySplit, shuffle: bool) -> DataLoader:
        sampler = EpochSeededSampler(len(split), self.seed) if shuffle else None
        return DataLoader(split, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        assert self.data is not None
        split = self.data.train_shortcut if self.variant == "shortcut" else self.data.train_control
        return self._loader(split, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        assert self.data is not None
        return self._loader(self.data.val, shuffle=False)
