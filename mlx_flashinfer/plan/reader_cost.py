"""The flash reader's own work, measured: what one `FlashReader.read` call costs the
CPU apart from the disk. A call hands its reads to the reader's threads, makes one
syscall per read and lands the bundles in their rows; on a few cores, with Python
threads that share one interpreter lock, that is a large part of a small model's
I/O (the default model at 60% of its size: 3.2 of the 8.7 ms a layer's reads took,
the rest the disk's; docs/planner.md).

Measured on a file in memory (tmpfs), where a read is a copy: for one reader thread
and for `DEFAULT_THREADS`, a call's fixed cost, each read's and each byte's, fitted
to three patterns of reads. The kernel's copy out of tmpfs is measured apart and
taken off each byte's cost: from a disk, DMA lands the bytes (here the copy was
about a third of it: 0.36-0.38 ns a byte in all, 0.25-0.27 without). Where no tmpfs
exists (macOS) the probe keeps nothing and `costs.py` falls back on constants
measured here.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
import time

import numpy as np

from ..flash.reader import DEFAULT_THREADS, FlashReader
from ..formats.layout import LayerExtent

PIECE = 4096  # a bundle of the test file
NEURONS = 16384  # one layer of them: 64 MiB
# (reads, neurons a read) of each pattern: few small reads, many small, few large;
# runs far enough apart that no gap is read through
PATTERNS = ((16, 1), (64, 1), (16, 64))
TMPFS = "/dev/shm"


def measure_reader(seconds: float = 0.15) -> dict:
    """{"1": coefficients, str(DEFAULT_THREADS): coefficients}, each {"call_s",
    "read_s", "byte_s"}: a call's seconds = call_s + reads x read_s + bytes x
    byte_s, on that many reader threads; {} where there is no tmpfs."""
    if not os.path.isdir(TMPFS) or not os.access(TMPFS, os.W_OK):
        return {}
    with tempfile.NamedTemporaryFile(dir=TMPFS, prefix="flashinfer-reader-") as f:
        f.write(np.random.default_rng(0).bytes(NEURONS * PIECE))
        f.flush()
        layers = [LayerExtent(0, NEURONS)]
        copy_s = _copy_seconds(f.fileno(), NEURONS * PIECE, seconds)
        out = {}
        for threads in (1, DEFAULT_THREADS):
            with FlashReader(
                f.name,
                layers,
                PIECE,
                threads=threads,
                mode="buffered",
                staging_bytes=8 << 20,
            ) as reader:
                rows, times = [], []
                for reads, run in PATTERNS:
                    rows.append([1.0, reads, reads * run * PIECE])
                    times.append(_call_seconds(reader, reads, run, seconds))
            coef = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)[0]
            call_s, read_s, byte_s = (max(float(c), 0.0) for c in coef)
            byte_s = max(byte_s - copy_s, 0.0)
            out[str(threads)] = {"call_s": call_s, "read_s": read_s, "byte_s": byte_s}
        return out


def _copy_seconds(fd: int, size: int, seconds: float, block: int = 1 << 20) -> float:
    """Seconds a byte of the kernel's copy out of the tmpfs file: 1 MiB `preadv`s
    into one buffer, the fastest pass of several."""
    buffer = mmap.mmap(-1, block)
    best, began = math.inf, time.perf_counter()
    while time.perf_counter() - began < seconds or best == math.inf:
        t = time.perf_counter()
        for offset in range(0, size, block):
            os.preadv(fd, [buffer], offset)
        best = min(best, (time.perf_counter() - t) / size)
    return best


def _call_seconds(reader: FlashReader, reads: int, run: int, seconds: float) -> float:
    """Median seconds of a read of `reads` runs of `run` neighbouring bundles, at
    random places, spaced so that none merge."""
    rng = np.random.default_rng(1)
    stride = NEURONS // reads
    times = []
    began = time.perf_counter()
    while time.perf_counter() - began < seconds or len(times) < 5:
        starts = np.arange(reads) * stride + rng.integers(0, stride - run - 8, reads)
        ids = (starts[:, None] + np.arange(run)).reshape(-1)
        t = time.perf_counter()
        reader.read(0, ids)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def call_seconds(
    reader: dict,
    threads: int,
    reads: float,
    nbytes: float,
    fallback: tuple,
    per_read: bool = True,
) -> float:
    """A read call's CPU seconds for `reads` reads of `nbytes` in all, on a reader
    of `threads` threads, from `measure_reader`'s coefficients: those of one
    thread when one read needs no pool, of `DEFAULT_THREADS` when every thread
    has a read, between them by log(threads used). `fallback`: (call_s, read_s,
    byte_s) where the probe has none. `per_read`: False leaves each read's own
    cost out (counted elsewhere: the disk's cells time it)."""
    if reads <= 0:
        return 0.0
    scale = reads if per_read else 0.0
    if not reader:
        call_s, read_s, byte_s = fallback
        return call_s + scale * read_s + nbytes * byte_s

    def cost(c: dict) -> float:
        return c["call_s"] + scale * c["read_s"] + nbytes * c["byte_s"]

    one, many = reader["1"], reader.get(str(DEFAULT_THREADS), reader["1"])
    used = min(threads, reads)
    w = min(1.0, math.log(used) / math.log(DEFAULT_THREADS)) if used > 1 else 0.0
    return (1 - w) * cost(one) + w * cost(many)
