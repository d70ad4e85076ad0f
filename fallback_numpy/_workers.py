"""Persistent threads that run the compiled kernels (which release the GIL) on the
parts of one job; the calling thread runs the first part itself.

Not numba's parallel=True: its OpenMP threads spin between kernels, and beside
OpenBLAS's threads (the large-T paths alternate widening and BLAS) a 4096 x 4096
float16 x @ w.T at T = 16 took 260-330 ms instead of 13 ms on 2 cores. These threads
sleep on a queue instead, which leaves the cores to BLAS and to the flash reader's
I/O threads between kernels; waking one costs some tens of microseconds, so callers
keep small jobs on one thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

_inboxes: list[queue.SimpleQueue] = []  # one per worker thread
_results: queue.SimpleQueue = queue.SimpleQueue()  # (part, ok, value) from workers
_busy = threading.Lock()  # one job at a time on the workers


def run(kernel: Callable, parts: Sequence[tuple]) -> list:
    """kernel(*args) for each args in parts, side by side; their results in order.

    Args:
        kernel: a compiled kernel that releases the GIL.
        parts: one argument tuple per part; parts[0] runs on the calling thread.

    Returns:
        The kernel's return value for each part.

    Raises:
        Whatever a part raised (the first, after every part has finished).
    """
    if len(parts) == 1 or not _busy.acquire(blocking=False):
        # one part, or another thread's job holds the workers: run here in turn
        return [kernel(*args) for args in parts]
    try:
        while len(_inboxes) < len(parts) - 1:
            _start_worker()
        for part, args in enumerate(parts[1:], start=1):
            _inboxes[part - 1].put((kernel, args, part))
        results = [None] * len(parts)
        failures = []
        try:
            results[0] = kernel(*parts[0])
        except BaseException as err:  # still wait for the workers' parts
            failures.append(err)
        for _ in parts[1:]:
            part, ok, value = _results.get()
            results[part] = value
            if not ok:
                failures.append(value)
        if failures:
            raise failures[0]
        return results
    finally:
        _busy.release()


def _start_worker() -> None:
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_serve, args=(inbox,), daemon=True).start()
    _inboxes.append(inbox)


def _serve(inbox: queue.SimpleQueue) -> None:
    while True:
        kernel, args, part = inbox.get()
        try:
            _results.put((part, True, kernel(*args)))
        except BaseException as err:
            _results.put((part, False, err))
