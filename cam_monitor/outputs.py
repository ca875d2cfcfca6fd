"""One owner of where a monitor's results go: the sinks (dashboards, PNG files), the durable alert
log (``alerts.jsonl``) and the background worker that draws and sends pictures.

An evaluation's pictures are drawn once, from a snapshot, on the worker (or inline), and handed
to every sink; an alert is written to ``alerts.jsonl`` at once (durability first), then sent to
the sinks in order. A failing sink is a fault of its own kind (``sink:<name>``) and the other
sinks still get what it missed. Lightning-free.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .faults import FaultGuard
from .publisher import Publisher
from .records import AlertEvent, Evaluation, Panel
from .sinks import AlertLog, FileSink, Sink

log = logging.getLogger("cam_monitor")
#: ``draw(trends)`` -> the panel of one evaluation; ``trends``: whether a sink needs the trends figure.
Draw = Callable[[bool], Panel]


class Outputs:
    """The sinks, the alert log and the worker of one run.

    Args:
        folder: where ``alerts.jsonl`` (and, without a dashboard, the PNG files) go.
        sinks: the sinks, or a function that builds them on first use (so a logger's files are
            created only once something is sent); None: PNG files in ``folder``.
        background: draw and send on a worker thread (True) or inline (False).
        guard: reports the faults of the worker's jobs and of the sinks.
    """

    def __init__(self, folder: str | Path, sinks: list[Sink] | Callable[[], list[Sink]] | None = None,
                 background: bool = False, guard: FaultGuard | None = None) -> None:
        self.folder = Path(folder)
        self._make_sinks = sinks if callable(sinks) else (lambda: list(sinks) if sinks is not None
                                                          else [FileSink(self.folder)])
        self._sinks: list[Sink] | None = None
        self.alert_log = AlertLog(self.folder / "alerts.jsonl")
        self.publisher = Publisher(background)
        self.guard = guard or FaultGuard("warn", log.warning)

    @property
    def sinks(self) -> list[Sink]:
        """The sinks, built on first use."""
        if self._sinks is None:
            self._sinks = self._make_sinks()
        return self._sinks

    def where(self) -> str:
        """Where alerts and pictures go, in words (the fit-start line)."""
        places = "; ".join(sink.where() for sink in self.sinks)
        return f"alerts go to {self.alert_log.path}; pictures to {places}"

    def publish(self, ev: Evaluation, draw: Draw) -> None:
        """Queue one evaluation's pictures: drawn once (with the trends figure only when a sink
        does not plot the curves itself), then sent to every sink."""
        sinks = self.sinks
        trends = any(not sink.draws_curves for sink in sinks)

        def job() -> None:
            panel = draw(trends)
            self._send(sinks, lambda sink: sink.log_evaluation(ev, panel))

        self.publisher.submit("render", job)

    def alert(self, event: AlertEvent) -> None:
        """Write ``event`` to ``alerts.jsonl`` now (skipped if a resumed run already wrote it), then
        queue it for the sinks."""
        written = self.alert_log.append(event)
        if self.alert_log.repaired:
            self.guard.warn(f"CAMMonitor: dropped a torn last line from {self.alert_log.path} (a process died "
                            "mid-write)")
            self.alert_log.repaired = False
        if written:
            sinks = self.sinks
            self.publisher.submit("alert", lambda: self._send(sinks, lambda sink: sink.log_alert(event)))

    def _send(self, sinks: list[Sink], send: Callable[[Sink], None]) -> None:
        for sink in sinks:
            try:
                send(sink)
            except Exception as err:  # noqa: BLE001 - reported on the caller's thread by report_faults
                self.publisher.record_fault(f"sink:{sink.name}", err)

    def report_faults(self) -> None:
        """Report the faults of the jobs that finished since the last call, as any other fault."""
        for kind, err in self.publisher.faults():
            self.guard.report(kind, err)

    def close(self) -> None:
        """Finish every queued job, report their faults, then close every sink (a failing close is
        a fault of that sink)."""
        self.publisher.close()
        self.report_faults()
        self._close_sinks(lambda sink, err: self.guard.report(f"sink:{sink.name}", err))

    def abort(self) -> None:
        """As :meth:`close`, for a run that is already failing: faults go to the debug log only."""
        self.publisher.close()
        for kind, err in self.publisher.faults():
            log.debug("CAMMonitor %s failed while the fit was failing: %r", kind, err)
        self._close_sinks(lambda sink, err: log.debug("CAMMonitor could not close sink %s while the fit was failing: "
                                                      "%r", sink.name, err))

    def _close_sinks(self, on_fault: Callable[[Sink, Exception], None]) -> None:
        for sink in self._sinks or []:
            try:
                sink.close()
            except Exception as err:  # noqa: BLE001 - reported by on_fault; the other sinks still close
                on_fault(sink, err)
