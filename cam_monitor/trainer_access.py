"""What the monitor reads from a Lightning ``Trainer``: the loaders in use, the model to run the
CAM pass through, the probes' device and dtype, whether validation runs, the sinks for the
trainer's loggers, and how to speak on rank 0. Public Lightning APIs only; with :mod:`cam_monitor.callback` and
:mod:`cam_monitor.checkpoint` this is the only code that imports Lightning.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import nn

from .console import Voice, warn_user
from .errors import ScheduleError
from .evaluation import Placement
from .sinks import Sink, SinkFactory, TensorBoardSink, WandbSink, sinks_for

#: The sinks of Lightning's loggers that draw pictures (a user's own logger type: ``register_sink``).
LIGHTNING_SINKS: tuple[tuple[type, SinkFactory], ...] = (
    (TensorBoardLogger, lambda logger, prefix: TensorBoardSink(logger.experiment.get_logdir(), prefix)),
    (WandbLogger, lambda logger, prefix: WandbSink(logger.experiment, prefix)),
)

#: The trainer function whose loaders probes come from: "fit" uses validation, else training.
STAGE_LOADERS = {"fit": ("val_dataloaders", "train_dataloader"), "validate": ("val_dataloaders",),
                 "test": ("test_dataloaders",)}


rank_zero_warn_user = rank_zero_only(warn_user)


def rank_zero_voice() -> Voice:
    """Notes and warnings on rank 0 only (Lightning's console logger for notes); faults on every rank."""
    return Voice(info=rank_zero_info, warn=rank_zero_warn_user, fault=warn_user)


def validation_runs(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether ``fit`` validates at all (else the monitor evaluates at the end of training epochs)."""
    defines_step = type(pl_module).validation_step is not pl.LightningModule.validation_step
    return defines_step and trainer.limit_val_batches != 0


def first_loader(loaders: Any) -> Any:
    """The first loader of what ``trainer.val_dataloaders`` & co. return (a loader, list or dict)."""
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def probe_loader(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> tuple[Any, str] | None:
    """``(loader, which)`` to pick probes from for ``stage``, or None if the trainer has not built it yet.

    Under ``fit`` that is the first validation loader when validation runs, else the first
    training loader, whichever way they were wired (a datamodule, the model's hooks, or loaders
    passed to ``fit``).
    """
    names = STAGE_LOADERS[stage]
    if stage == "fit" and not validation_runs(trainer, pl_module):
        names = names[1:]
    loader = first_loader(getattr(trainer, names[0]))
    return None if loader is None else (loader, f"{names[0].split('_')[0]} loader 0")


def trainer_sinks(trainer: pl.Trainer, prefix: str, folder: Path) -> list[Sink]:
    """One sink per logger of the trainer that draws pictures; PNG files in ``folder`` when none does."""
    return sinks_for(trainer.loggers, prefix, folder, LIGHTNING_SINKS)


def cam_model(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
    """The module a CAM pass calls: the strategy's FSDP root when the model is sharded that way
    (its forward gathers the shards, on every rank), else the LightningModule itself (DDP keeps
    full replicas, and its wrapper would expect a gradient reduction after a grad-mode forward)."""
    model = trainer.strategy.model
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed support
        return pl_module
    return model if isinstance(model, FullyShardedDataParallel) else pl_module


def placement(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Placement:
    """Probes go to the model's device and parameter dtype, then through the precision plugin's
    input conversion; model calls run in its forward context (autocast for ``*-mixed``)."""
    dtype = next((p.dtype for p in pl_module.parameters() if p.is_floating_point()), torch.get_default_dtype())
    device, plugin = pl_module.device, trainer.precision_plugin
    world = trainer.world_size

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return plugin.convert_input(images.to(device=device, dtype=dtype, non_blocking=True))

    def gather(t: torch.Tensor) -> torch.Tensor:
        return trainer.strategy.all_gather(t.to(device)).cpu()

    forward_context = getattr(plugin, "forward_context", contextlib.nullcontext)
    return Placement(device=device, prepare=prepare, forward_context=forward_context, rank=trainer.global_rank,
                     world=world, gather=gather if world > 1 else None)


def steps_before_first_evaluation(trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
    """Optimizer steps the fit takes before the monitor's first evaluation (the first validation, or
    the end of the first training epoch without one); None where the loop cannot say (an iterable
    loader of unknown length). Read once the training loader is set up (``on_train_start``)."""
    batches = trainer.num_training_batches
    if not isinstance(batches, int) or batches <= 0:
        return None
    accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
    per_epoch = -(-batches // accumulate)
    if not validation_runs(trainer, pl_module):
        return per_epoch
    every = trainer.check_val_every_n_epoch
    val_batch = getattr(trainer, "val_check_batch", None)
    if every is None:  # val_check_interval counts training batches across epochs
        return int(val_batch) // accumulate if isinstance(val_batch, (int, float)) and math.isfinite(val_batch) else None
    within = min(int(val_batch), batches) if isinstance(val_batch, (int, float)) and math.isfinite(val_batch) else batches
    return (every - 1) * per_epoch + -(-within // accumulate)


def schedule_findings(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
    """The schedule settings under which the monitor will never evaluate in this fit, each with its fix
    (a ``max_steps`` that ends the fit before the first validation)."""
    needed, max_steps = steps_before_first_evaluation(trainer, pl_module), trainer.max_steps
    if needed is None or max_steps is None or max_steps < 0 or max_steps >= needed:
        return []
    when = "first validation" if validation_runs(trainer, pl_module) else "end of the first training epoch"
    return [f"Trainer(max_steps={max_steps}) ends the fit before the monitor's first evaluation (the {when}, after "
            f"{needed} optimizer steps): nothing will be measured; raise max_steps, or validate earlier "
            "(val_check_interval, check_val_every_n_epoch)"]


def check_schedule(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Refuse a fit in which the trainer never validates although the model has a validation loop:
    the monitor evaluates at validations, so it would never run."""
    every, max_epochs = trainer.check_val_every_n_epoch, trainer.max_epochs
    if not validation_runs(trainer, pl_module) or every is None or max_epochs is None or max_epochs < 0:
        return
    if every > max_epochs:
        raise ScheduleError(
            f"CAMMonitor would never evaluate: Trainer(check_val_every_n_epoch={every}) first validates after epoch "
            f"{every} but max_epochs={max_epochs}; lower check_val_every_n_epoch or raise max_epochs")
