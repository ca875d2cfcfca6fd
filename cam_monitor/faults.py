"""The fault guard: a failure inside the monitor must not end the training it watches, unless the
user asked for that (``on_error="raise"``). Lightning-free."""
from __future__ import annotations

import logging
from typing import Callable, Literal, TypeVar

log = logging.getLogger("cam_monitor")
T = TypeVar("T")
OnError = Literal["warn", "raise"]


class FaultGuard:
    """Runs the monitor's steps; a step that fails is re-raised (``"raise"``) or reported once per
    kind of fault with ``warn`` and counted in :attr:`counts` (``"warn"``), and training goes on.

    Args:
        on_error: ``"warn"`` or ``"raise"``.
        warn: how a fault is told to the user (once per ``<kind>:<exception type>``).
        tag: the monitor's name in messages (``"[layer3]"``), empty for an unnamed one.
    """

    def __init__(self, on_error: OnError, warn: Callable[[str], None], tag: str = "") -> None:
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        self.on_error, self.warn, self.tag = on_error, warn, tag
        self.counts: dict[str, int] = {}

    def run(self, kind: str, fn: Callable[[], T]) -> T | None:
        """``fn()``, or None after reporting its failure as a fault of ``kind``."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - the monitor must never kill training unless asked
            self.report(kind, err)
            return None

    def report(self, kind: str, err: BaseException) -> None:
        """Re-raise ``err`` (``on_error="raise"``) or count it and warn the first time of its kind."""
        if self.on_error == "raise":
            raise err
        key = f"{kind}:{type(err).__name__}"
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] == 1:
            self.warn(f"CAMMonitor{self.tag}: {kind} failed ({type(err).__name__}: {err}); training goes on, the next "
                      "evaluation retries (reported once per kind)")
        log.debug("CAMMonitor %s failed", kind, exc_info=err)

    def reset(self) -> None:
        """Forget the counts (a new run)."""
        self.counts = {}


