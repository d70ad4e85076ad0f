"""Measure this disk's random-read throughput by read size and thread count.

Flash is only fast with large and parallel reads (the paper needs 32 KiB+ reads and
32 threads to approach its SSD's bandwidth). This probe writes a test file, then reads
random aligned blocks from it with the page cache bypassed, for a fixed time per
(read size, threads) cell, and reports MB/s. The result feeds the FlashReader defaults
and the benchmarks, which set each configuration's I/O time next to
bytes / `throughput_at(result, read size, threads)`. With --reader it measures
FlashReader itself instead, on ffn.bin-like files and random sparse neuron sets.

    python tools/disk_probe.py /work/probe --out probe.json [--keep]
    python tools/disk_probe.py /work/probe --reader --out reader.json

`flashinfer bench` runs `short_probe` when no saved probe is given.
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np

from ..flash.direct_io import open_uncached
from ..flash.reader import FlashReader
from ..formats.layout import LayerExtent, align_up

KIB = 1024
SIZES = tuple(4 * KIB << k for k in range(9))  # 4 KiB ... 1 MiB
THREADS = (1, 2, 4, 8, 16, 32)
# The short probe of `flashinfer bench`: the read sizes and thread counts its rows use
# (16 reader threads; one for mmap faults and layer streaming), about 10 s.
SHORT_SIZES = tuple(4 * KIB << k for k in range(0, 9, 2))  # 4, 16, 64, 256 KiB, 1 MiB
SHORT_THREADS = (1, 4, 16)
FILE_NAME = "disk_probe.bin"
# (layers, neurons, bundle bytes): the default model, and an OPT-6.7B layer shape
# (4 of its 32 layers are enough to defeat caching).
READER_SHAPES = {"smollm2": (30, 1536, 3456), "opt-6.7b": (4, 16384, 16384)}


def probe(
    path: str | Path | None = None,
    sizes: tuple[int, ...] = SIZES,
    threads: tuple[int, ...] = THREADS,
    seconds: float = 1.5,
    file_bytes: int = 2 << 30,
    keep: bool = False,
    progress: bool = True,
) -> dict:
    """Random-read MB/s for every (read size, threads) cell, on a test file of
    `file_bytes` created in directory `path` (default: the current directory).

    Returns {"mode", "file_bytes", "seconds", "sizes", "threads", "cells"}, each cell
    {"read_size", "threads", "reads", "bytes", "seconds", "bytes_per_s"}.
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
    cells = []
    try:
        grid = [(s, t) for s in sizes for t in threads]
        for size, count in tqdm(grid, desc="probe", unit="cell", disable=not progress):
            cells.append(_cell(fd, file_bytes, size, count, seconds))
    finally:
        os.close(fd)
        if not keep:
            file.unlink()
    return {
        "mode": mode,
        "file_bytes": file_bytes,
        "seconds": seconds,
        "sizes": list(sizes),
        "threads": list(threads),
        "cells": cells,
    }


def short_probe(path: str | Path | None = None, progress: bool = True) -> dict:
    """A quick `probe` (1 GiB file, 0.5 s per cell) for benchmarks without a saved one.

    Raises:
        ValueError: the directory's filesystem cannot bypass the page cache.
    """
    return probe(
        path, SHORT_SIZES, SHORT_THREADS, 0.5, 1 << 30, keep=False, progress=progress
    )


def throughput_at(result: dict, read_size: float, threads: int) -> float:
    """Bytes/s at `read_size` and `threads` (the nearest measured thread count),
    interpolated linearly on log2(read size). Below the smallest size the rate of
    reads per second is taken as constant; above the largest, the throughput."""
    counts = sorted({c["threads"] for c in result["cells"]})
    nearest = min(counts, key=lambda t: abs(math.log2(t) - math.log2(max(threads, 1))))
    row = sorted(
        (c["read_size"], c["bytes_per_s"])
        for c in result["cells"]
        if c["threads"] == nearest
    )
    sizes = np.array([s for s, _ in row], dtype=float)
    rates = np.array([r for _, r in row], dtype=float)
    if read_size < sizes[0]:
        return float(rates[0] * read_size / sizes[0])
    return float(np.interp(math.log2(read_size), np.log2(sizes), rates))


def table(result: dict) -> str:
    """The result as a markdown table: rows read size, columns threads, MB/s."""
    rate = {(c["read_size"], c["threads"]): c["bytes_per_s"] for c in result["cells"]}
    lines = [
        "| read size | " + " | ".join(f"{t} thr" for t in result["threads"]) + " |",
        "|---:|" + "---:|" * len(result["threads"]),
    ]
    for size in result["sizes"]:
        cells = " | ".join(f"{rate[size, t] / 1e6:.0f}" for t in result["threads"])
        lines.append(f"| {size // KIB} KiB | {cells} |")
    return "\n".join(lines)


def reader_bench(
    path: str | Path | None = None,
    shapes: dict[str, tuple[int, int, int]] = READER_SHAPES,
    threads: tuple[int, ...] = (1, 4, 8, 16, 32),
    gaps: tuple[int, ...] = (0, 16 * KIB, 64 * KIB),
    densities: tuple[float, ...] = (0.03, 0.10),
    seconds: float = 1.5,
    keep: bool = False,
    progress: bool = True,
) -> list[dict]:
    """FlashReader on ffn.bin-like files: per "token", every layer reads a random
    sorted `density` fraction of its bundles, for `seconds` per configuration."""
    from tqdm import tqdm

    directory = Path(path if path is not None else ".")
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (layers, neurons, size) in shapes.items():
        extents = [
            LayerExtent(i * align_up(neurons * size), neurons) for i in range(layers)
        ]
        file = directory / f"ffn_{name}.bin"
        nbytes = layers * align_up(neurons * size)
        if not (file.is_file() and file.stat().st_size == nbytes):
            _write_test_file(file, nbytes, progress)
        grid = [(d, t, g) for d in densities for t in threads for g in gaps]
        for density, count, gap in tqdm(grid, desc=name, disable=not progress):
            _drop_caches()
            rng = np.random.default_rng(0)
            k = max(1, round(density * neurons))
            with FlashReader(file, extents, size, count, gap) as reader:
                stop = time.perf_counter() + seconds
                while time.perf_counter() < stop:
                    for layer in range(layers):
                        ids = np.sort(rng.choice(neurons, k, replace=False))
                        reader.read(layer, ids)
                s = reader.stats
                rows.append(
                    {
                        "shape": name,
                        "density": density,
                        "threads": count,
                        "max_gap": gap,
                        "mode": reader.mode,
                        "useful_bytes_per_s": s.bytes_useful / s.seconds,
                        "disk_bytes_per_s": s.bytes_read / s.seconds,
                        "mean_read_bytes": s.bytes_read / s.reads,
                        "amplification": s.bytes_read / s.bytes_useful,
                        "ms_per_layer": 1e3 * s.seconds / s.calls,
                    }
                )
        if not keep:
            file.unlink()
    return rows


def reader_table(rows: list[dict]) -> str:
    """reader_bench rows as a markdown table."""
    lines = [
        "| shape | density | threads | max_gap | useful MB/s | disk MB/s | mean read "
        "| read/useful | ms/layer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['density']:.0%} | {r['threads']} | "
            f"{r['max_gap'] // KIB} KiB | {r['useful_bytes_per_s'] / 1e6:.0f} | "
            f"{r['disk_bytes_per_s'] / 1e6:.0f} | {r['mean_read_bytes'] / KIB:.1f} KiB "
            f"| {r['amplification']:.2f} | {r['ms_per_layer']:.2f} |"
        )
    return "\n".join(lines)


def _drop_caches() -> None:
    # Only buffered reads would hit the page cache; needs root, harmless otherwise.
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


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
            data = rng.bytes(min(block, nbytes - start))
            f.write(data)
            bar.update(len(data))
        f.flush()
        os.fsync(f.fileno())


def _cell(fd: int, file_bytes: int, size: int, threads: int, seconds: float) -> dict:
    """`threads` threads each read random `size`-aligned blocks for `seconds`."""
    stop = time.perf_counter() + seconds
    totals = [0] * threads

    def worker(i: int) -> None:
        buffer = mmap.mmap(-1, size)
        rng = np.random.default_rng((size, threads, i))  # fresh offsets every cell
        offsets = rng.integers(0, file_bytes // size, 1 << 16) * size
        n = 0
        with memoryview(buffer) as view:
            while time.perf_counter() < stop:
                got = os.preadv(fd, [view], int(offsets[n % len(offsets)]))
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
