"""The durable alert record: ``alerts.jsonl``, one JSON object a line.

Each line is flushed and fsync'd before training goes on; an event re-emitted after a resume is
not written twice; a torn last line from a killed process is detected and dropped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_path


def alert_key(event: dict[str, Any]) -> tuple:
    """Identity of an alert line: the same event re-emitted after a resume has the same key; the
    metric (``<prefix>/<metric>``) keeps two monitors' events apart."""
    return (event.get("event"), event.get("rule"), event.get("metric"), int(event.get("global_step", -1)),
            int(event.get("epoch", -1)))


class AlertLog:
    """Append-only ``alerts.jsonl``: one flushed JSON object a line, never a duplicate.

    On first use the existing file is read; a torn last line (from a process killed mid-write)
    is detected, reported through :attr:`repaired` and dropped by rewriting the file atomically.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._keys: set[tuple] | None = None
        self.repaired = False

    def _load(self) -> set[tuple]:
        if self._keys is not None:
            return self._keys
        keys: set[tuple] = set()
        if self.path.exists():
            raw = self.path.read_bytes()
            lines = raw.split(b"\n")
            good: list[bytes] = []
            for line in lines:
                if not line.strip():
                    continue
                try:
                    keys.add(alert_key(json.loads(line)))
                    good.append(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self.repaired = True
            if self.repaired or (raw and not raw.endswith(b"\n")):
                with atomic_path(self.path) as tmp:
                    tmp.write_bytes(b"".join(g + b"\n" for g in good))
        self._keys = keys
        return keys

    def read(self) -> list[dict[str, Any]]:
        """Every intact line of the file, in order."""
        self._load()
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def append(self, event: dict[str, Any]) -> bool:
        """Write ``event`` unless an identical one is already there; return whether it was written."""
        keys = self._load()
        key = alert_key(event)
        if key in keys:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\n")
            f.flush()
            os.fsync(f.fileno())
        keys.add(key)
        return True
