"""Persistent threads that run the compiled kernels (which release the GIL) on the
parts of one job, the calling thread among them.

Not numba's parallel=True: its OpenMP threads spin between kernels, and beside
OpenBLAS's threads (the large-T paths alternate widening and BLAS) a 4096 x 4096
float16 x @ w.T at T = 16 took 260-330 ms instead of 5-13 ms on 2 cores. These
threads sleep on a queue instead, which leaves the cores to BLAS and to the flash
reader's I/O threads between kernels. Waking one takes 40-55 us here (a 2-vCPU VM),
so a job is cut into more parts than threads and every thread takes the next part
when done with one: the late starter takes fewer.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence

_inboxes: list[queue.SimpleQueue] = []  # one per worker thread
_busy = threading.Lock()  # one job at a time on the workers


def run(kernel: Callable, parts: Sequence[tuple], threads: int) -> list:
    """kernel(*args) for each args in parts, on up to `threads` threads.

    Args:
        kernel: a compiled kernel that releases the GIL.
        parts: one argument tuple per part, in any order of completion.
        threads: the calling thread and up to threads - 1 workers.

    Returns:
        The kernel's return value for each part, in the order of parts.

    Raises:
        Whatever a part raised (the first, after every part has finished).
    """
    helpers = min(threads, len(parts)) - 1
    if helpers < 1 or not _busy.acquire(blocking=False):
        # one thread, or another thread's job holds the workers: run here in turn
        return [kernel(*args) for args in parts]
    try:
        while len(_inboxes) < helpers:
            _start_worker()
        job = _Job(kernel, parts)
        for inbox in _inboxes[:helpers]:
            inbox.put(job)
        job.work()
        for _ in range(helpers):
            job.finished.get()
        if job.failures:
            raise job.failures[0]
        return job.results
    finally:
        _busy.release()


class _Job:
    """The parts of one `run`, handed out one at a time to whichever thread asks."""

    def __init__(self, kernel: Callable, parts: Sequence[tuple]):
        self.kernel = kernel
        self.parts = parts
        self.results: list = [None] * len(parts)
        self.failures: list[BaseException] = []
        self.finished: queue.SimpleQueue = queue.SimpleQueue()  # one put per helper
        self._next = iter(range(len(parts)))
        self._lock = threading.Lock()

    def work(self) -> None:
        while True:
            with self._lock:
                index = next(self._next, None)
            if index is None:
                return
            try:
                self.results[index] = self.kernel(*self.parts[index])
            except BaseException as err:
                self.failures.append(err)


def _serve(inbox: queue.SimpleQueue) -> None:
    while True:
        job = inbox.get()
        try:
            job.work()
        finally:
            job.finished.put(None)


def _start_worker() -> None:
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_serve, args=(inbox,), daemon=True).start()
    _inboxes.append(inbox)


def _forget_workers() -> None:
    """In a forked child: the parent's threads did not come along."""
    global _busy
    _inboxes.clear()
    _busy = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)
