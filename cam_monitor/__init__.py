"""cam_monitor: Grad-CAM monitoring for image classifiers while they train.

The engine (:func:`compute_cams`) works in any PyTorch loop; :class:`CAMMonitor` wires it into
PyTorch Lightning.
"""
from .engine import CAMResult, cam_pass, compute_cams, masked_scores
from .probes import ProbeSet
from .callback import CAMMonitor
from .checkpoint import GatedModelCheckpoint
from .discovery import DiscoverySettings
from .errors import (CAMAlertError, CAMError, HookNotFiredError, InputError, LayerNotFoundError, LayerNotSpatialError,
                     LayoutError,
                     NonFiniteOutputError, OutputError, ScheduleError, TargetError)
from .sinks import register_sink
from .methods import METHODS

__version__ = "0.1.0"

__all__ = [
    "CAMAlertError", "CAMError", "CAMMonitor", "CAMResult", "DiscoverySettings", "GatedModelCheckpoint", "HookNotFiredError", "InputError",
    "LayerNotFoundError", "LayerNotSpatialError", "LayoutError", "METHODS", "NonFiniteOutputError", "OutputError", "ProbeSet", "ScheduleError", "TargetError",
    "cam_pass", "compute_cams", "masked_scores", "register_sink",
]
