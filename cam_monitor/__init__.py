"""cam_monitor: Grad-CAM monitoring for image classifiers while they train.

The engine (:func:`compute_cams`) works in any PyTorch loop; :class:`Monitor` runs the whole
monitor (probes, metrics, alerts, pictures) in any loop; :class:`CAMMonitor` is its Lightning
callback.
"""
from .engine import CAMResult, cam_pass, compute_cams, masked_scores
from .probes import ProbeSet
from .settings import AlertSettings, CAMSettings, PictureSettings, ProbeSettings
from .discovery import DiscoverySettings
from .evaluation import Placement
from .monitor import Monitor, Outcome
from .callback import CAMMonitor
from .checkpoint import GatedModelCheckpoint
from .errors import (CAMAlertError, CAMError, HookNotFiredError, InputError, LayerNotFoundError, LayerNotSpatialError,
                     LayoutError, NonFiniteOutputError, OutputError, ScheduleError, TargetError)
from .sinks import Sink, register_sink
from .methods import METHODS

__version__ = "0.2.0"

__all__ = [
    "AlertSettings", "CAMAlertError", "CAMError", "CAMMonitor", "CAMResult", "CAMSettings", "DiscoverySettings",
    "GatedModelCheckpoint", "HookNotFiredError", "InputError", "LayerNotFoundError", "LayerNotSpatialError", "LayoutError",
    "METHODS", "Monitor", "NonFiniteOutputError", "Outcome", "OutputError", "PictureSettings", "Placement", "ProbeSet",
    "ProbeSettings", "ScheduleError", "Sink", "TargetError", "cam_pass", "compute_cams", "masked_scores",
    "register_sink",
]
