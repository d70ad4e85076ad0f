"""Read FFN neuron bundles from flash, bypassing the page cache (paper section 3).

Each decoded token needs a few percent of a layer's bundles, scattered over the layer.
Flash rewards large and parallel reads, so `FlashReader.read` turns the sorted neuron
ids into runs of adjacent bundles, reads small gaps through rather than issuing another
read, splits long runs into chunks and spreads the reads over a pool of threads
(`os.preadv` releases the GIL). The page cache is bypassed (O_DIRECT on Linux,
F_NOCACHE on macOS) so that the measured I/O is the disk's, and the neuron cache in
DRAM is the only cache: the memory budget stays honest.

Backend-free: numpy and the standard library only.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np

from .layout import LayerExtent

# The defaults are measured on the project's dev VM (2 cores, flash-like virtio disk)
# with `tools/disk_probe.py --reader`: random sorted ids of 3% / 10% of a layer per
# token, on a 30 x 1536 x 3456 B (SmolLM2-135M) and a 4 x 16384 x 16384 B (OPT-6.7B
# shape) file. Useful MB/s at max_gap 16 KiB, median of 3 runs, 3% / 10%:
#   small: 8 threads 130 / 208, 16 threads 124 / 208, 32 threads 105 / 194
#   OPT:   8 threads 525 / 554, 16 threads 594 / 675, 32 threads 550 / 716
# 16 is best or within 6% everywhere (1 -> 4 threads doubles throughput); more threads
# only cost CPU on few cores.
DEFAULT_THREADS = 16
# Up to 16 KiB a read costs about what a 4 KiB read costs here (probe, 1 thread: 57 us
# at 4 KiB, 61 us at 16 KiB, 97 us at 64 KiB), so reading a gap that small through
# beats issuing another read: vs max_gap 0, small model -5..+36% useful MB/s (mostly
# gains, largest at 10%), OPT shape -8..+12%. 64 KiB reads 5-6x the useful bytes and
# loses 10-25% on the OPT shape.
DEFAULT_MAX_GAP = 16 * 1024
# Long runs are split so threads share them. Streaming whole layers (read_range) gave
# 1.4-1.9 GB/s with 1 MiB chunks, the disk's large-read rate; 256-512 KiB was as good
# or up to 25% slower.
DEFAULT_CHUNK = 1 << 20
MODES = ("auto", "direct", "nocache", "buffered")
_F_NOCACHE = 48  # macOS <sys/fcntl.h>; Python's fcntl module may lack the name


def open_uncached(path: str | os.PathLike, mode: str = "auto") -> tuple[int, str, int]:
    """Open `path` read-only, bypassing the page cache as far as this system allows.

    Returns (fd, mode, alignment): mode is "direct", "nocache" or "buffered", and
    reads must start, end and land in memory on multiples of `alignment` bytes.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown mode, or an explicit mode this system cannot do.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    os.close(os.open(path, os.O_RDONLY))  # a missing file fails here, plainly
    for candidate in ("direct", "nocache", "buffered"):
        if mode in ("auto", candidate):
            opened, reason = _OPENERS[candidate](path)
            if opened is not None:
                return opened[0], candidate, opened[1]
    raise ValueError(f"{path}: mode {mode!r} is not available here ({reason})")


def _open_direct(path) -> tuple[tuple[int, int] | None, str]:
    if not hasattr(os, "O_DIRECT"):
        return None, "no O_DIRECT on this platform"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        return None, "the filesystem refuses O_DIRECT"
    # Some filesystems accept the flag at open and fail the first read instead; the
    # device's logical block size (512 or 4096) decides which alignment works.
    buffer = mmap.mmap(-1, 8192)
    for align in (512, 4096):
        try:
            with memoryview(buffer) as view:
                os.preadv(fd, [view[align : 2 * align]], 0)
            return (fd, align), ""
        except OSError as err:
            if err.errno != errno.EINVAL:
                os.close(fd)
                raise
    os.close(fd)
    return None, "O_DIRECT reads fail with EINVAL"


def _open_nocache(path) -> tuple[tuple[int, int] | None, str]:
    if sys.platform != "darwin":
        return None, "F_NOCACHE is macOS only"
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", _F_NOCACHE), 1)
    return (fd, 4096), ""  # page-aligned reads are the ones that skip the cache


def _open_buffered(path) -> tuple[tuple[int, int] | None, str]:
    return (os.open(path, os.O_RDONLY), 1), ""


_OPENERS = {
    "direct": _open_direct,
    "nocache": _open_nocache,
    "buffered": _open_buffered,
}


@dataclass
class ReadTotals:
    calls: int = 0  # read / read_range calls
    reads: int = 0  # syscalls issued
    bytes_read: int = 0  # what the disk delivered, with alignment and read-through gaps
    bytes_useful: int = 0  # bundles asked for
    seconds: float = 0.0  # wall time inside read / read_range

    def add(self, reads: int, bytes_read: int, bytes_useful: int, seconds: float):
        self.calls += 1
        self.reads += reads
        self.bytes_read += bytes_read
        self.bytes_useful += bytes_useful
        self.seconds += seconds

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(ReadTotals)}


@dataclass
class ReadStats(ReadTotals):
    """Running totals of a FlashReader, overall and per layer."""

    per_layer: dict[int, ReadTotals] = field(default_factory=dict)

    def record(self, layer: int, *counts) -> None:
        self.add(*counts)
        self.per_layer.setdefault(layer, ReadTotals()).add(*counts)

    def snapshot(self) -> dict:
        """The totals as a plain dict, with "per_layer": {layer: totals}."""
        snap = self.as_dict()
        snap["per_layer"] = {k: v.as_dict() for k, v in sorted(self.per_layer.items())}
        return snap

    def reset(self) -> None:
        for f in fields(ReadTotals):
            setattr(self, f.name, f.default)
        self.per_layer.clear()


class FlashReader:
    """Reads neuron bundles of one layer from the FFN file, bypassing the page cache.

    The arrays returned by `read` and `read_range` are views into buffers this reader
    reuses: they are valid until the next call (copy them to keep them). One reader
    serves one thread at a time.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layers: list[LayerExtent],
        bundle_bytes: int,
        threads: int = DEFAULT_THREADS,
        max_gap_bytes: int = DEFAULT_MAX_GAP,
        mode: str = "auto",
        chunk_bytes: int = DEFAULT_CHUNK,
        parts: int = 1,
    ):
        if not isinstance(threads, (int, np.integer)) or not 1 <= threads <= 256:
            raise ValueError(f"threads must be 1..256, got {threads}")
        if not isinstance(max_gap_bytes, (int, np.integer)) or max_gap_bytes < 0:
            raise ValueError(f"max_gap_bytes must be >= 0, got {max_gap_bytes}")
        if parts < 1 or bundle_bytes % parts:
            raise ValueError(
                f"bundle_bytes {bundle_bytes} not divisible in {parts} parts"
            )
        if bundle_bytes < 1 or chunk_bytes < 4096 or chunk_bytes % 4096:
            raise ValueError(
                f"bad bundle_bytes {bundle_bytes} or chunk_bytes {chunk_bytes}"
            )
        self.path = str(path)
        self.layers = list(layers)
        self.bundle_bytes = bundle_bytes
        # parts > 1: an unbundled layout, each bundle part of a layer in its own region
        # (the "before bundling" rows of the paper's ablation): one piece per part.
        self.parts = parts
        self.threads = threads
        self.max_gap_bytes = max_gap_bytes
        self.chunk_bytes = chunk_bytes
        self.stats = ReadStats()
        self._fd, self.mode, self._align = open_uncached(path, mode)
        self._size = os.fstat(self._fd).st_size
        for i, extent in enumerate(self.layers):
            end = extent.offset + extent.neurons * bundle_bytes
            if end > self._size:
                self.close()
                raise ValueError(
                    f"{self.path}: {self._size} bytes, but layer {i} ends at byte "
                    f"{end} (truncated, or not this model's FFN file)"
                )
        self._pool = ThreadPoolExecutor(int(threads)) if threads > 1 else None
        self._staging = mmap.mmap(-1, mmap.PAGESIZE)
        self._out = np.empty((0, bundle_bytes), np.uint8)

    # -- public -----------------------------------------------------------------------
    def read(self, layer: int, ids: np.ndarray) -> np.ndarray:
        """Bundles `ids` (sorted, unique neuron ids) of `layer` as uint8 rows of
        shape (len(ids), bundle_bytes); a view valid until the next call."""
        began = time.perf_counter()
        extent = self._extent(layer)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n, size = len(ids), self.bundle_bytes // self.parts  # size of one piece
        if n and (ids[0] < 0 or ids[-1] >= extent.neurons or np.any(np.diff(ids) <= 0)):
            raise ValueError(f"ids must be sorted, unique and in [0, {extent.neurons})")
        if n == 0:
            self._finish(layer, 0, 0, 0, began)
            return self._out[:0]
        region = extent.neurons * size  # bytes of one part's region (parts > 1)
        starts = np.concatenate(
            [extent.offset + p * region + ids * size for p in range(self.parts)]
        )
        lo, hi = self._align_down(starts), self._align_up(starts + size)
        # A new run begins where the (aligned) gap to the previous bundle is too big
        # to read through; aligned ranges that touch or overlap always merge.
        new_run = np.empty(len(starts), dtype=bool)
        new_run[0] = True
        new_run[1:] = lo[1:] - hi[:-1] > self.max_gap_bytes
        first = np.flatnonzero(new_run)
        last = np.append(first[1:] - 1, len(starts) - 1)
        run_lo, run_hi = lo[first], hi[last]
        run_pos = np.concatenate(([0], np.cumsum(run_hi - run_lo)[:-1]))
        run_of = np.cumsum(new_run) - 1
        reads, got = self._read_runs(run_lo, run_hi, run_pos)

        if len(self._out) < n:
            self._out = np.empty(
                (max(n, 2 * len(self._out)), self.bundle_bytes), np.uint8
            )
        out = self._out[:n]
        pos = run_pos[run_of] + (starts - run_lo[run_of])
        # Copying in 8-byte words when offsets allow is about twice as fast as bytes.
        word = next(w for w in (8, 4, 2, 1) if size % w == 0 and not np.any(pos % w))
        words = np.frombuffer(self._staging, dtype=f"u{word}")
        rows = np.lib.stride_tricks.as_strided(
            words, (len(words) - size // word + 1, size // word), (word, word)
        )
        pieces = out.view(f"u{word}").reshape(n, self.parts, size // word)
        pieces[:] = rows[(pos // word).reshape(self.parts, n).T]
        self._finish(layer, reads, got, n * self.bundle_bytes, began)
        return out

    def read_range(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Bundles [start, stop) of `layer` with large sequential reads, shape
        (stop - start, bundle_bytes); a view valid until the next call."""
        began = time.perf_counter()
        extent = self._extent(layer)
        if not 0 <= start <= stop <= extent.neurons:
            raise ValueError(f"range [{start}, {stop}) not in [0, {extent.neurons}]")
        n, size = stop - start, self.bundle_bytes
        if n == 0:
            self._finish(layer, 0, 0, 0, began)
            return self._out[:0]
        if self.parts > 1:  # one sequential run per part region, then interleave
            return self.read(layer, np.arange(start, stop))
        first = extent.offset + start * size
        lo, hi = self._align_down(first), self._align_up(first + n * size)
        reads, got = self._read_runs(np.array([lo]), np.array([hi]), np.array([0]))
        rows = np.frombuffer(self._staging, np.uint8, n * size, first - lo)
        self._finish(layer, reads, got, n * size, began)
        return rows.reshape(n, size)

    def close(self) -> None:
        """Release the file and the threads (idempotent)."""
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown()
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FlashReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------
    def _extent(self, layer: int) -> LayerExtent:
        if self._fd < 0:
            raise ValueError(f"{self.path}: reader is closed")
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer {layer} not in [0, {len(self.layers)})")
        return self.layers[layer]

    def _align_down(self, x):
        return x // self._align * self._align

    def _align_up(self, x):
        return -(-x // self._align) * self._align

    def _read_runs(self, lo, hi, pos) -> tuple[int, int]:
        """Read file bytes [lo[i], hi[i]) to staging[pos[i]:] for every run, in
        chunks over the thread pool; returns (syscalls, bytes read)."""
        total = int(pos[-1] + hi[-1] - lo[-1])
        if len(self._staging) < total:
            # Grows rarely: doubling keeps a steady decode loop allocation-free.
            pages = -(-max(total, 2 * len(self._staging)) // mmap.PAGESIZE)
            self._staging = mmap.mmap(-1, pages * mmap.PAGESIZE)
        chunks = [
            (offset, p + offset - a, min(self.chunk_bytes, b - offset))
            for a, b, p in zip(lo.tolist(), hi.tolist(), pos.tolist(), strict=True)
            for offset in range(a, b, self.chunk_bytes)
        ]
        workers = min(self.threads, len(chunks))
        if workers == 1:
            return self._read_chunks(chunks)
        # One task per worker, taking every workers-th chunk: one future per chunk
        # measured 20-30% slower here (thousands of small reads/s on two cores).
        done = self._pool.map(
            self._read_chunks, [chunks[w::workers] for w in range(workers)]
        )
        counts = list(done)
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def _read_chunks(self, chunks) -> tuple[int, int]:
        reads = got = 0
        with memoryview(self._staging) as view:
            for offset, at, length in chunks:
                # Near the end of the file an aligned read may ask past it.
                need = min(length, self._size - offset)
                done = 0
                while done < need:
                    n = os.preadv(
                        self._fd, [view[at + done : at + length]], offset + done
                    )
                    reads += 1
                    if n == 0 or (n % self._align and done + n < need):
                        raise ValueError(
                            f"{self.path}: got {done + n} of {need} bytes at offset "
                            f"{offset}: the file changed or was truncated after "
                            "loading (reopen the model, or re-convert it)"
                        )
                    done += n
                got += done
        return reads, got

    def _finish(self, layer: int, reads: int, got: int, useful: int, began: float):
        if self.mode == "buffered" and hasattr(os, "posix_fadvise"):
            # Drop what these reads put in the page cache, so it does not serve later
            # reads (and hide the disk's cost) or eat the memory budget.
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.stats.record(layer, reads, got, useful, time.perf_counter() - began)
