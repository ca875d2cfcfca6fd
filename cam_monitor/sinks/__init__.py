"""Where an evaluation goes: one module per destination, chosen from the user's loggers.

A sink takes the already-rendered :class:`~cam_monitor.report.Panel` (rendered once, shared by
every sink) and the alert events. Which sink serves which logger is one registry,
:func:`register_sink`: the callback layer registers Lightning's TensorBoard and W&B loggers, and a
user can register their own logger type the same way. This package knows nothing of Lightning.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from ..evaluation import Evaluation
from ..report import Panel
from .alert_log import AlertLog
from .files import FileSink
from .tensorboard import TensorBoardSink
from .wandb import WandbSink


@runtime_checkable
class Sink(Protocol):
    """A destination for pictures and alert events."""

    name: str

    def log_evaluation(self, ev: Evaluation, panel: Panel) -> None:
        """Send one evaluation's pictures (and tables) at ``ev.global_step``."""

    def log_alert(self, event: dict[str, Any]) -> None:
        """Send one alert event (fired or cleared)."""

# A sink may also have ``where()``, the destination in words for the fit-start line; ``close()``: the callback calls it at teardown (after the background worker
# has drained), for sinks that keep a file of their own open; and ``draws_curves = True`` when it
# plots ``Panel.curves`` itself (the trends figure is then rendered only for the sinks that need it).


#: ``factory(logger, prefix) -> Sink``: builds the sink for one logger; ``prefix`` starts its tags.
SinkFactory = Callable[[Any, str], Sink]
_REGISTRY: list[tuple[type, SinkFactory]] = []


def register_sink(logger_type: type, factory: SinkFactory) -> None:
    """Serve loggers of ``logger_type`` (and its subclasses) with ``factory(logger, prefix)``.

    A later registration for the same type replaces the earlier one.
    """
    _REGISTRY[:] = [(t, f) for t, f in _REGISTRY if t is not logger_type]
    _REGISTRY.append((logger_type, factory))


def sinks_for(loggers: list[Any], prefix: str, folder: Path) -> list[Sink]:
    """One sink per logger that has a registered factory; PNG files in ``folder`` when none has."""
    sinks: list[Sink] = []
    for logger in loggers:
        factory = next((f for t, f in reversed(_REGISTRY) if isinstance(logger, t)), None)
        if factory is not None:
            sinks.append(factory(logger, prefix))
    return sinks or [FileSink(folder)]


__all__ = ["AlertLog", "FileSink", "Sink", "SinkFactory", "TensorBoardSink", "WandbSink", "register_sink", "sinks_for"]
