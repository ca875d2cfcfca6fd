"""Pictures and dashboard writes off the training thread: one worker, a bounded queue, in order.

Rendering (matplotlib, tiles), PNG encoding and writing to TensorBoard / W&B / files are host work
that training need not wait for. :class:`Publisher` runs such jobs on one background thread, in
the order they were submitted. The queue is bounded: when it is full, :meth:`submit` waits for
the oldest job, so a slow dashboard slows the monitor instead of piling up memory. A job's
exception is kept and handed back to the caller's thread by :meth:`faults`, so faults are reported
where the rest of the monitor reports them. ``background=False`` runs every job at once, inline:
the same jobs, the same order. The worker thread runs at a lower scheduling priority (``nice``
+10, where the OS allows it per thread, as Linux does), so on a busy host the training threads get
the cores first. No Lightning.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Callable


class Publisher:
    """Runs jobs (``kind``, ``fn``) on one worker thread, or inline with ``background=False``."""

    def __init__(self, background: bool = True, max_pending: int = 2) -> None:
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        self.background, self.max_pending = background, max_pending
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()
        self._faults: list[tuple[str, BaseException]] = []
        self._lock = threading.Lock()

    def submit(self, kind: str, fn: Callable[[], object]) -> None:
        """Queue ``fn``; with ``max_pending`` jobs queued, first wait for the oldest one."""
        if not self.background:
            self._run(kind, fn)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cam_monitor", initializer=lower_priority)
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._run, kind, fn))

    def _run(self, kind: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - handed back to the caller's thread by faults()
            self.record_fault(kind, err)
        finally:
            if self.background:
                release_freed_memory()

    def record_fault(self, kind: str, err: BaseException) -> None:
        """Keep a fault a job caught itself (e.g. one sink of several failed)."""
        with self._lock:
            self._faults.append((kind, err))

    def faults(self) -> list[tuple[str, BaseException]]:
        """The ``(kind, exception)`` of every job that failed since the last call, in order."""
        with self._lock:
            out, self._faults = self._faults, []
        return out

    def drain(self) -> None:
        """Wait until every queued job has run."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Drain, then stop the worker thread (a later :meth:`submit` starts a new one)."""
        self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


@lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the heap memory freed by a job back to the OS (glibc's ``malloc_trim``). A picture's
    large short-lived buffers are allocated in the worker thread's own malloc arena, which
    otherwise stays fragmented: over hundreds of evaluations resident memory crept up by about
    0.3 MB per evaluation, against a flat line when drawing on the training thread. A no-op where
    the C library has no ``malloc_trim`` (not glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def background_worker(setting: bool | str, device_type: str) -> bool:
    """Whether a monitor's pictures go to the worker thread. ``"auto"`` says yes where training
    runs on an accelerator, whose host thread mostly waits for the device, and no on a CPU, where
    the worker would compete with training for the same cores and the GIL: measured on the 2-core
    CPU, a step of the demo CNN took 2x as long while the worker drew, and the demo fit came out
    slower with the worker than without it (docs/benchmarks.md)."""
    return device_type != "cpu" if setting == "auto" else bool(setting)


#: How much nicer than the training threads the worker thread runs.
WORKER_NICENESS = 10


def lower_priority() -> None:
    """Make the calling thread ``WORKER_NICENESS`` nicer (Linux applies niceness per thread); a
    no-op where the OS has no per-thread priority or refuses it."""
    native_id = getattr(threading, "get_native_id", None)
    if not hasattr(os, "setpriority") or native_id is None:
        return
    try:
        tid = native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICENESS))
    except OSError:
        pass
