"""How the monitor speaks to the user: notes (what it read or picked) and warnings (what will not
work as meant, with the fix), attributed to the user's own line. Lightning-free; the callback
layer hands a :class:`Voice` whose calls speak on rank 0 only."""
from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("cam_monitor")

#: Top-level packages whose frames a warning skips on its way to the user's code.
LIBRARY_PACKAGES = frozenset({"cam_monitor", "lightning", "lightning_fabric", "lightning_utilities", "pytorch_lightning",
                              "torch", "contextlib", "functools"})


def warn_user(message: str) -> None:
    """Warn attributed to the user's own frame (the first outside cam_monitor, Lightning and torch),
    so the console shows the message and the user's line (``trainer.fit(...)``), not the library's."""
    frame, level = inspect.currentframe(), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in LIBRARY_PACKAGES:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level)


@dataclass(frozen=True)
class Voice:
    """``info`` for notes (default: the ``cam_monitor`` logger at INFO), ``warn`` for warnings
    (default: :func:`warn_user`), ``fault`` for the monitor's own failures (default:
    :func:`warn_user`; under several processes every rank reports its own)."""

    info: Callable[[str], None] = field(default=log.info)
    warn: Callable[[str], None] = field(default=warn_user)
    fault: Callable[[str], None] = field(default=warn_user)
