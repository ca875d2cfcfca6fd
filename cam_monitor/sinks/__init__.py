"""Where an evaluation goes: one module per destination, chosen from the user's loggers.

A sink takes the already-rendered :class:`~cam_monitor.report.Panel` (rendered once, shared by
every sink) and the alert events. Which sink serves which logger is explicit: :func:`sinks_for` takes the
built-in pairs (logger type, factory) from its caller (the callback layer passes Lightning's
TensorBoard and W&B loggers), and a user registers their own logger type with
:func:`register_sink`; a registration wins over a built-in pair. Every sink is a :class:`Sink`.
This package knows nothing of Lightning.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from .alert_log import AlertLog
from .base import Sink
from .files import FileSink
from .tensorboard import TensorBoardSink
from .wandb import WandbSink


#: ``factory(logger, prefix) -> Sink``: builds the sink for one logger; ``prefix`` starts its tags.
SinkFactory = Callable[[Any, str], Sink]
_REGISTRY: list[tuple[type, SinkFactory]] = []


def register_sink(logger_type: type, factory: SinkFactory) -> None:
    """Serve loggers of ``logger_type`` (and its subclasses) with ``factory(logger, prefix)``.

    A later registration for the same type replaces the earlier one.
    """
    _REGISTRY[:] = [(t, f) for t, f in _REGISTRY if t is not logger_type]
    _REGISTRY.append((logger_type, factory))


def sinks_for(loggers: list[Any], prefix: str, folder: Path,
              builtin: Sequence[tuple[type, SinkFactory]] = ()) -> list[Sink]:
    """One sink per logger served by a registered factory, else by a ``builtin`` one; PNG files in
    ``folder`` when no logger is served."""
    sinks: list[Sink] = []
    for logger in loggers:
        factory = next((f for t, f in [*reversed(_REGISTRY), *builtin] if isinstance(logger, t)), None)
        if factory is None:
            continue
        sink = factory(logger, prefix)
        if not isinstance(sink, Sink):
            raise TypeError(f"the sink factory for {type(logger).__name__} returned a {type(sink).__name__}, not a "
                            "cam_monitor.sinks.Sink: subclass Sink (it supplies where(), close() and draws_curves)")
        sinks.append(sink)
    return sinks or [FileSink(folder)]


__all__ = ["AlertLog", "FileSink", "Sink", "SinkFactory", "TensorBoardSink", "WandbSink", "register_sink", "sinks_for"]
