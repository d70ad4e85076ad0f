"""Measure this disk's random-read throughput by read size and thread count.

Flash is only fast with large and parallel reads (the paper needs 32 KiB+ reads and
32 threads to approach its SSD's bandwidth). This probe writes a test file, then reads
random aligned blocks from it with the page cache bypassed, for a fixed time per
(read size, threads) cell, and reports MB/s: the disk curve of the cost model
(`costs.py` turns bytes and read sizes into seconds through `throughput_at`), and of
the benchmarks, which set each configuration's I/O time next to it.

    python tools/disk_probe.py /work/probe --out probe.json [--keep]

`flashinfer probe` keeps a short one per machine (`machine.py`); `flashinfer bench`
runs `short_probe` when no saved probe is given.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np

from ..flash.direct_io import open_uncached
from ..flash.uring import RING_ENTRIES, open_ring

KIB = 1024
SIZES = tuple(4 * KIB << k for k in range(9))  # 4 KiB ... 1 MiB
THREADS = (1, 2, 4, 8, 16, 32)
# The short probe of `flashinfer bench`: the read sizes and thread counts its rows use
# (16 reader threads; one for mmap faults and layer streaming), about 12 s.
SHORT_SIZES = tuple(4 * KIB << k for k in range(0, 9, 2))  # 4, 16, 64, 256 KiB, 1 MiB
SHORT_THREADS = (1, 4, 16)
# Streaming a span (the streamed placement, mmap readahead): consecutive chunks of
# these sizes, read by this many threads at once.
SEQUENTIAL_SIZES = (1 << 20, 4 << 20)
SEQUENTIAL_THREADS = (1, 16)
FILE_NAME = "disk_probe.bin"


def probe(
    path: str | Path | None = None,
    sizes: tuple[int, ...] = SIZES,
    threads: tuple[int, ...] = THREADS,
    seconds: float = 1.5,
    file_bytes: int = 2 << 30,
    keep: bool = False,
    progress: bool = True,
    sequential: bool = True,
) -> dict:
    """Random-read MB/s for every (read size, threads) cell, on a test file of
    `file_bytes` created in directory `path` (default: the current directory), and
    (`sequential`) the rate of a span read in consecutive chunks over threads.

    Where the reader uses io_uring (flash/uring.py), every size is measured through
    a ring too, as cells of RING_ENTRIES "threads" (reads in flight) with "ring".

    Returns {"mode", "file_bytes", "seconds", "sizes", "threads", "cells",
    "sequential"}, each cell {"read_size", "threads", "reads", "bytes", "seconds",
    "bytes_per_s"}.
    """
    from tqdm import tqdm

    directory = Path(path if path is not None else ".")
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / FILE_NAME
    file_bytes = file_bytes // max(sizes) * max(sizes)
    if not (file.is_file() and file.stat().st_size == file_bytes):
        _write_test_file(file, file_bytes, progress)
    fd, mode, _ = open_uncached(file)
    if mode == "buffered":
        os.close(fd)
        raise ValueError(f"{directory}: cannot bypass the page cache here; use a disk")
    cells, streams = [], []
    try:
        ring = open_ring()
        grid = [(s, t) for s in sizes for t in threads]
        ringed = sizes if ring else ()
        # a span read as FlashReader streams one: consecutive chunks over threads
        spans = [(s, t) for s in SEQUENTIAL_SIZES for t in SEQUENTIAL_THREADS]
        spans = spans if sequential else []
        total = len(grid) + len(ringed) + len(spans)
        with tqdm(total=total, desc="probe", unit="cell", disable=not progress) as bar:
            for size, count in grid:
                cells.append(_cell(fd, file_bytes, size, count, seconds))
                bar.update()
            for size in ringed:
                cells.append(_ring_cell(ring, fd, file_bytes, size, seconds))
                bar.update()
            for size, count in spans:
                streams.append(_cell(fd, file_bytes, size, count, seconds, True))
                bar.update()
    finally:
        os.close(fd)
        if ring:
            ring.close()
        if not keep:
            file.unlink()
    return {
        "mode": mode,
        "file_bytes": file_bytes,
        "seconds": seconds,
        "sizes": list(sizes),
        "threads": list(threads),
        "cells": cells,
        "sequential": streams,
    }


def short_probe(
    path: str | Path | None = None, progress: bool = True, keep: bool = False
) -> dict:
    """A quick `probe` (1 GiB file, 0.4 s per cell) for benchmarks without a saved one;
    `keep`: leave the test file (FILE_NAME in `path`) for more cells.

    Raises:
        ValueError: the directory's filesystem cannot bypass the page cache.
    """
    return probe(
        path, SHORT_SIZES, SHORT_THREADS, 0.4, 1 << 30, keep=keep, progress=progress
    )


def stream_beside(file: Path, work, seconds: float = 1.0, size: int = 8 << 20):
    """Bytes/s of a stream of `size` reads (one in flight, the streamed placement's
    pattern) while the calling thread runs `work()` over and over: the disk's rate
    when compute shares the cores (a virtual disk's completions need a core too;
    measured here 1.4-1.6 GB/s beside the FFN against 2.0-2.2 alone)."""
    fd, _, _ = open_uncached(file)
    blocks = os.fstat(fd).st_size // size
    done, stop = [0], threading.Event()

    def reader() -> None:
        buffer = mmap.mmap(-1, size)
        with memoryview(buffer) as view:
            for n in itertools.count():
                if stop.is_set():
                    return
                done[0] += os.preadv(fd, [view], n % blocks * size)

    thread = threading.Thread(target=reader)
    began = time.perf_counter()
    thread.start()
    try:
        while time.perf_counter() - began < seconds:
            work()
    finally:
        stop.set()
        thread.join()
        os.close(fd)
    return done[0] / (time.perf_counter() - began)


def throughput_at(
    result: dict, read_size: float, threads: int, sequential: bool = False
) -> float:
    """Bytes/s at `read_size` and `threads` (the nearest measured thread count),
    interpolated linearly on log2(read size). Below the smallest size the rate of
    reads per second is taken as constant; above the largest, the throughput.
    `sequential`: of a stream of consecutive reads (where the probe measured one)."""
    cells = result.get("sequential") if sequential else None
    cells = cells or result["cells"]
    counts = sorted({c["threads"] for c in cells})
    nearest = min(counts, key=lambda t: abs(math.log2(t) - math.log2(max(threads, 1))))
    row = sorted(
        (c["read_size"], c["bytes_per_s"]) for c in cells if c["threads"] == nearest
    )
    sizes = np.array([s for s, _ in row], dtype=float)
    rates = np.array([r for _, r in row], dtype=float)
    if read_size < sizes[0]:
        return float(rates[0] * read_size / sizes[0])
    return float(np.interp(math.log2(read_size), np.log2(sizes), rates))


def has_ring(result: dict) -> bool:
    """Whether the probe measured reads through an io_uring (the reader's way)."""
    return any(c.get("ring") for c in result["cells"])


def table(result: dict) -> str:
    """The result as a markdown table: rows read size, columns threads, MB/s."""
    rate = {(c["read_size"], c["threads"]): c["bytes_per_s"] for c in result["cells"]}
    columns = list(result["threads"])
    names = [f"{t} thr" for t in columns]
    if has_ring(result):
        columns, names = columns + [RING_ENTRIES], names + [f"io_uring {RING_ENTRIES}"]
    lines = [
        "| read size | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(columns),
    ]
    for size in result["sizes"]:
        cells = " | ".join(f"{rate[size, t] / 1e6:.0f}" for t in columns)
        lines.append(f"| {size // KIB} KiB | {cells} |")
    return "\n".join(lines)


def _write_test_file(file: Path, nbytes: int, progress: bool) -> None:
    from tqdm import tqdm

    # Random contents: zeros could be deduplicated or compressed by the storage layer.
    rng = np.random.default_rng(0)
    block = 64 << 20
    with (
        open(file, "wb") as f,
        tqdm(
            total=nbytes,
            desc=f"write {file.name}",
            unit="B",
            unit_scale=True,
            disable=not progress,
        ) as bar,
    ):
        for start in range(0, nbytes, block):
            # random 64-bit words: ten times as fast as rng.bytes (0.4 s a GiB here)
            size = min(block, nbytes - start)
            words = rng.integers(0, 2**64 - 1, -(-size // 8), np.uint64, endpoint=True)
            data = words.view(np.uint8)[:size]
            f.write(data)
            bar.update(len(data))
        f.flush()
        os.fsync(f.fileno())


def _ring_cell(ring, fd: int, file_bytes: int, size: int, seconds: float) -> dict:
    """Random `size`-aligned blocks read through `ring`, a ring-full a submission,
    for `seconds` (as the reader reads a call's runs)."""
    buffer = mmap.mmap(-1, size * ring.entries)
    rng = np.random.default_rng((size, ring.entries))
    address = np.frombuffer(buffer, np.uint8).ctypes.data
    addresses = address + np.arange(ring.entries, dtype=np.uint64) * size
    lengths = np.full(ring.entries, size)
    nbytes, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        offsets = rng.integers(0, file_bytes // size, ring.entries) * size
        nbytes += int(ring.read(fd, offsets, addresses, lengths).sum())
    elapsed = time.perf_counter() - began
    return {
        "read_size": size,
        "threads": ring.entries,
        "ring": True,
        "reads": nbytes // size,
        "bytes": nbytes,
        "seconds": elapsed,
        "bytes_per_s": nbytes / elapsed,
    }


def _cell(
    fd: int,
    file_bytes: int,
    size: int,
    threads: int,
    seconds: float,
    sequential: bool = False,
) -> dict:
    """`threads` threads each read `size`-aligned blocks for `seconds`: at random
    offsets, or (`sequential`) the next block of one stream through the file."""
    stop = time.perf_counter() + seconds
    totals = [0] * threads
    blocks = file_bytes // size
    start = int(np.random.default_rng((size, threads)).integers(0, blocks))
    stream = itertools.count(start)  # next() is atomic under the GIL

    def worker(i: int) -> None:
        buffer = mmap.mmap(-1, size)
        rng = np.random.default_rng((size, threads, i))  # fresh offsets every cell
        offsets = rng.integers(0, blocks, 1 << 16) * size
        n = 0
        with memoryview(buffer) as view:
            while time.perf_counter() < stop:
                at = (
                    next(stream) % blocks * size
                    if sequential
                    else offsets[n % len(offsets)]
                )
                got = os.preadv(fd, [view], int(at))
                totals[i] += got
                n += 1

    began = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - began
    nbytes = sum(totals)
    return {
        "read_size": size,
        "threads": threads,
        "reads": nbytes // size,
        "bytes": nbytes,
        "seconds": elapsed,
        "bytes_per_s": nbytes / elapsed,
    }
