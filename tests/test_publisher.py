"""Publisher: jobs run in order on one worker, the queue is bounded, faults come back to the caller."""
from __future__ import annotations

import threading
import time

import pytest

from cam_monitor.publisher import Publisher


def test_jobs_run_in_order_off_the_calling_thread() -> None:
    pub, seen = Publisher(background=True), []
    for i in range(5):
        pub.submit("job", lambda i=i: seen.append((i, threading.current_thread().name)))
    pub.close()
    assert [i for i, _ in seen] == list(range(5))
    assert all(name.startswith("cam_monitor") for _, name in seen)


def test_inline_mode_runs_the_same_jobs_at_once() -> None:
    pub, seen = Publisher(background=False), []
    pub.submit("job", lambda: seen.append(threading.current_thread().name))
    assert seen == [threading.current_thread().name]


def test_a_full_queue_makes_submit_wait_for_the_oldest_job() -> None:
    pub = Publisher(background=True, max_pending=1)
    gate = threading.Event()
    pub.submit("slow", gate.wait)
    started = time.perf_counter()
    threading.Timer(0.3, gate.set).start()
    pub.submit("next", lambda: None)  # waits until the first job is done
    assert time.perf_counter() - started >= 0.25
    pub.close()


def test_faults_are_kept_in_order_and_handed_back_once() -> None:
    pub = Publisher(background=True)
    pub.submit("render", lambda: 1 / 0)
    pub.submit("ok", lambda: None)
    pub.record_fault("sink:x", OSError("disk full"))
    pub.drain()
    faults = pub.faults()
    assert {k for k, _ in faults} == {"render", "sink:x"} and pub.faults() == []
    assert isinstance(dict(faults)["render"], ZeroDivisionError)
    with pytest.raises(ValueError, match="max_pending"):
        Publisher(max_pending=0)


@pytest.mark.skipif(not hasattr(__import__("os"), "setpriority"), reason="no per-thread priority on this OS")
def test_the_worker_runs_nicer_than_the_training_thread() -> None:
    import os

    seen = []
    pub = Publisher(background=True)
    pub.submit("x", lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
    pub.close()
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [min(19, mine + 10)]


def test_the_worker_hands_freed_memory_back_after_each_job(monkeypatch) -> None:
    """Each background job is followed by malloc_trim (glibc), so a long run's resident memory stays
    flat (the soak test in test_trust.py measures it); inline jobs leave the allocator alone."""
    import cam_monitor.publisher as publisher

    calls = []
    monkeypatch.setattr(publisher, "release_freed_memory", lambda: calls.append(threading.get_ident()))
    pub = Publisher(background=True)
    for _ in range(3):
        pub.submit("x", lambda: None)
    pub.close()
    assert len(calls) == 3 and threading.get_ident() not in calls
    Publisher(background=False).submit("x", lambda: None)
    assert len(calls) == 3


def test_release_freed_memory_runs_here() -> None:
    from cam_monitor.publisher import release_freed_memory

    release_freed_memory()  # glibc here: malloc_trim; elsewhere a no-op, never an error


def test_auto_puts_the_worker_where_training_runs_on_an_accelerator() -> None:
    from cam_monitor.publisher import background_worker

    assert background_worker("auto", "cuda") and background_worker("auto", "mps")
    assert not background_worker("auto", "cpu")
    assert background_worker(True, "cpu") and not background_worker(False, "cuda")
