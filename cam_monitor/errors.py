"""Exception types raised by cam_monitor.

Each subclasses the built-in exception a caller would naturally catch (``ValueError``,
``RuntimeError``, ``IndexError``) so that generic handlers keep working, and all share
:class:`CAMError` so one ``except`` can catch everything the package raises on purpose.
"""
from __future__ import annotations


class CAMError(Exception):
    """Base class of every error cam_monitor raises deliberately."""


class LayerNotFoundError(CAMError, ValueError):
    """The target layer name does not name a submodule of the model."""


class LayerNotSpatialError(CAMError, ValueError):
    """The target layer's output has no spatial grid a CAM can live on."""


class LayoutError(CAMError, ValueError):
    """A 4-D layer output whose channel axis cannot be told (channels-first or channels-last)."""


class HookNotFiredError(CAMError, RuntimeError):
    """The forward pass never ran the target layer, so no activation was captured."""


class TargetError(CAMError, IndexError):
    """Class targets are out of range or do not match the batch of images."""


class InputError(CAMError, ValueError):
    """Images, masks or labels have the wrong shape, dtype or values."""


class OutputError(CAMError, TypeError):
    """The model's output holds no logits the engine can find: pass ``output_transform=``."""


class NonFiniteOutputError(CAMError, FloatingPointError):
    """The model produced NaN or inf logits for some probes, so their maps mean nothing."""


class CAMAlertError(CAMError, RuntimeError):
    """Raised by an alert whose action is ``"raise"``."""


class ScheduleError(CAMError, ValueError):
    """The monitor's wiring into the Trainer cannot work (a schedule that never fires, a name clash)."""
