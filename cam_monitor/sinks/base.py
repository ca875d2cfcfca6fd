"""The base of every sink: a destination for one evaluation's pictures and for alert events."""
from __future__ import annotations

from ..records import AlertEvent, Evaluation, Panel


class Sink:
    """A destination for pictures and alert events; subclass it and override what you send.

    Attributes:
        name: short name, used in fault reports (``sink:<name>``).
        draws_curves: True when the destination plots ``Panel.curves`` itself (a dashboard);
            the trends figure is then drawn only for the sinks that need it.
    """

    name: str = "sink"
    draws_curves: bool = False

    def where(self) -> str:
        """Where this sink's pictures go, in words, for the fit-start line."""
        return self.name

    def log_evaluation(self, ev: Evaluation, panel: Panel) -> None:
        """Send one evaluation's pictures (and tables) at ``ev.global_step``."""

    def log_alert(self, event: AlertEvent) -> None:
        """Send one alert event (fired or cleared)."""

    def close(self) -> None:
        """Release what the sink keeps open (called once, after every queued job has run)."""
