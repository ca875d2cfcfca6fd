"""PNG files in a folder, for runs without an image-capable logger."""
from __future__ import annotations

import os
from pathlib import Path

from .base import Sink
from ..render import save_png
from ..records import AlertEvent, Evaluation, Panel


class FileSink(Sink):
    """``probe_grid_e<epoch>_s<step>.png`` per evaluation, and the latest ``trends.png`` and
    ``filmstrip.png``, written atomically."""

    name = "files"

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)

    def where(self) -> str:
        """Where the pictures go, for the fit-start line."""
        return f"PNG files in {self.folder}"

    def log_evaluation(self, ev: Evaluation, panel: Panel) -> None:
        save_png(panel.grid, self.folder / f"probe_grid_e{ev.epoch:03d}_s{ev.global_step:07d}.png")
        for tag, image in panel.extra_images().items():
            save_png(image, self.folder / f"{tag}.png")

    def log_alert(self, event: AlertEvent) -> None:
        """Alerts always go to :class:`~cam_monitor.sinks.AlertLog`; nothing more to write here."""
