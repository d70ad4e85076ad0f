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

import functools
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..formats.layout import LayerExtent
from .direct_io import MAX_ALIGN, open_uncached, staging_size
from .landing import (
    Fetched,
    aligned,
    bytes_of,
    cut_runs,
    direct_calls,
    gather,
    read_calls,
    read_chunks,
)
from .stats import ReadStats
from .uring import open_ring, ring_runs

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


def _checked_ids(ids, extent: LayerExtent) -> np.ndarray:
    """`ids` as int64, or ValueError unless sorted, unique and in the layer."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) and (
        ids[0] < 0 or ids[-1] >= extent.neurons or np.any(np.diff(ids) <= 0)
    ):
        raise ValueError(f"ids must be sorted, unique and in [0, {extent.neurons})")
    return ids


class FlashReader:
    """Reads neuron bundles of one layer from the FFN file, bypassing the page cache.

    Reads land where the caller wants them: `read(layer, ids, into)` writes piece p of
    the i-th neuron into `into[p][i]` (the neuron cache's rows, say), one copy from
    the aligned staging buffer the disk fills. Without `into`, the bundles come back
    as uint8 rows of a buffer this reader reuses (valid until the next call).

    The staging buffer has a fixed size, allocated once (`staging_bytes`, counted in
    the memory plan): a read needing more goes in rounds. One reader serves one
    thread at a time.

    Args:
        path: the FFN file.
        layers: offset and neuron count of each layer.
        bundle_bytes: bytes of one neuron's bundle.
        threads: reader threads.
        max_gap_bytes: gaps up to this size between wanted bundles are read through.
        mode: "auto", "direct", "nocache" or "buffered" (see `open_uncached`).
        chunk_bytes: long runs are split into reads of this size, over the threads.
        parts: the parts a bundle splits into (gate, up, down).
        fields: per part, the bytes of the fields it splits into, in order (a
            quantized part: packed integers, scales, biases; default: parts of
            equal size, each whole). The pieces of a bundle, the unit of `into`,
            are its parts' fields, part-major.
        separate: the parts of a layer lie in separate regions (the unbundled
            arrangement of the paper's ablation), not side by side in each bundle.
        staging_bytes: size of the staging buffer (default: `staging_size`).
        land_direct: read whole bundles straight into the rows of `into` where
            they and the rows sit on the alignment (`landing.direct_calls`): for
            bundles of megabytes (experts), where no gap is worth reading through
            and the copy from staging would cost about what the disk does.
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
        separate: bool = False,
        staging_bytes: int | None = None,
        fields: list[tuple[int, ...]] | None = None,
        land_direct: bool = False,
    ):
        if not isinstance(threads, (int, np.integer)) or not 1 <= threads <= 256:
            raise ValueError(f"threads must be 1..256, got {threads}")
        if not isinstance(max_gap_bytes, (int, np.integer)) or max_gap_bytes < 0:
            raise ValueError(f"max_gap_bytes must be >= 0, got {max_gap_bytes}")
        if parts < 1 or (fields is None and bundle_bytes % parts):
            raise ValueError(
                f"bundle_bytes {bundle_bytes} not divisible in {parts} parts"
            )
        if bundle_bytes < 1 or chunk_bytes < 4096 or chunk_bytes % 4096:
            raise ValueError(
                f"bad bundle_bytes {bundle_bytes} or chunk_bytes {chunk_bytes}"
            )
        fields = [tuple(f) for f in fields or [(bundle_bytes // parts,)] * parts]
        if len(fields) != parts or sum(map(sum, fields)) != bundle_bytes:
            raise ValueError(f"fields {fields} do not split a bundle of {bundle_bytes}")
        self.path = str(path)
        self.layers = list(layers)
        self.bundle_bytes = bundle_bytes
        self.parts = parts
        self.part_bytes = [sum(f) for f in fields]
        self.part_offsets = np.cumsum([0] + self.part_bytes[:-1]).tolist()
        # per part, (offset in the part, bytes) of each of its fields; the pieces
        # of part p are into[first_piece[p] : first_piece[p] + len(fields[p])]
        self.fields = [
            list(zip(np.cumsum((0,) + f[:-1]).tolist(), f, strict=True)) for f in fields
        ]
        self.first_piece = np.cumsum([0] + [len(f) for f in fields]).tolist()
        self.pieces = self.first_piece[-1]
        self.regions = parts if separate else 1  # file regions per layer
        # bytes of each region's pieces on disk: a bundle, or one part (separate)
        self.region_bytes = self.part_bytes if separate else [bundle_bytes]
        self.threads = threads
        self.land_direct = land_direct
        self.max_gap_bytes = max_gap_bytes
        self.chunk_bytes = chunk_bytes
        self.stats = ReadStats()
        largest = max(self.region_bytes)
        smallest = largest + 2 * MAX_ALIGN  # one piece's read
        if staging_bytes is None:
            staging_bytes = staging_size(layers, bundle_bytes, largest)
        elif staging_bytes < smallest:
            raise ValueError(
                f"staging_bytes {staging_bytes} cannot hold one piece's read "
                f"({smallest} bytes)"
            )
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
        self._rings, self._opened = threading.local(), []  # a ring per thread
        # page-aligned (mmap), so O_DIRECT reads can land in it
        self._staging = mmap.mmap(-1, staging_bytes)
        self.staging_bytes = staging_bytes
        self._out = np.empty((0, bundle_bytes), np.uint8)

    @property
    def align(self) -> int:
        """Reads start, end and land in memory on multiples of this (O_DIRECT)."""
        return self._align

    # -- public -----------------------------------------------------------------------
    def read(
        self,
        layer: int,
        ids: np.ndarray,
        into: list | None = None,
        *,
        slots: np.ndarray | None = None,
    ):
        """Bundles `ids` (sorted, unique neuron ids) of `layer`.

        Args:
            layer: the layer.
            ids: sorted unique neuron ids.
            into: optional, one array per piece (see `fields`) of shape (len(ids),
                ...) whose rows are contiguous and as long as the piece (any dtype,
                any row stride): piece p of neuron ids[i] is written to into[p][i].
            slots: optional, with `into`: the row of `into` each id lands in
                (piece p of ids[i] to into[p][slots[i]]; `into` then any length),
                for a cache whose free rows are not consecutive.

        Returns:
            `into`, or without it uint8 rows (len(ids), bundle_bytes), a view valid
            until the next call.
        """
        began = time.perf_counter()
        extent = self._extent(layer)
        ids = _checked_ids(ids, extent)
        n = len(ids)
        if into is None:
            if len(self._out) < n:
                self._out = np.empty(
                    (max(n, 2 * len(self._out)), self.bundle_bytes), np.uint8
                )
            out = self._out[:n]
            dest = [
                out[:, start + at : start + at + size]
                for start, fields in zip(self.part_offsets, self.fields, strict=True)
                for at, size in fields
            ]
        else:
            dest = [np.asarray(d) for d in into]
            if slots is not None:
                slots = np.asarray(slots, dtype=np.int64).reshape(-1)
            rows = n if slots is None else len(slots)
            short = slots is not None and n and min(len(d) for d in dest) <= slots.max()
            if len(dest) != self.pieces or rows != n or short:
                raise ValueError(
                    f"into must be {self.pieces} arrays of {n} rows (or holding "
                    f"`slots`), got {[len(d) for d in dest]}"
                )
        reads = got = 0
        if n:
            dest = [bytes_of(d) for d in dest]
            # whole bundles straight into their rows where all sits on the alignment
            direct = self.land_direct and self.regions == 1 and into is not None
            if direct and aligned(extent.offset, self.bundle_bytes, dest, self._align):
                rows = np.arange(n) if slots is None else slots
                calls = direct_calls(
                    extent.offset + ids * self.bundle_bytes,
                    dest,
                    rows,
                    self.chunk_bytes,
                )
                read = functools.partial(read_calls, self._fd, path=self.path)
                reads, got = self._spread(read, calls)
            else:
                reads, got = self._read_pieces(extent, ids, dest, slots)
        self._finish(layer, reads, got, n * self.bundle_bytes, began)
        return out if into is None else into

    def fetch(self, layer: int, ids: np.ndarray) -> Fetched:
        """Read bundles `ids` (sorted, unique) of `layer` into the staging buffer and
        keep them there, for `Fetched.take` to land later: the read of a prefetch,
        done ahead of knowing which of the bundles will be wanted. Only what fits one
        round of the staging buffer is fetched (`Fetched.ids`, a prefix of `ids`);
        the bundles stay valid until this reader's next call."""
        began = time.perf_counter()
        extent = self._extent(layer)
        ids = self._fitting(extent, _checked_ids(ids, extent))
        at, reads, got = np.empty(0, np.int64), 0, 0
        if len(ids):
            ((_, _, at, reads, got),) = self._rounds(extent, ids)  # one round: fits
        self._finish(layer, reads, got, len(ids) * self.bundle_bytes, began)
        at = at.reshape(self.regions, len(ids))
        return Fetched(self, ids, at, reads, got, time.perf_counter() - began)

    def read_range(self, layer: int, start: int, stop: int, into: list | None = None):
        """Bundles [start, stop) of `layer`, with large sequential reads; as `read`."""
        extent = self._extent(layer)
        if not 0 <= start <= stop <= extent.neurons:
            raise ValueError(f"range [{start}, {stop}) not in [0, {extent.neurons}]")
        return self.read(layer, np.arange(start, stop), into)

    def read_span(self, layer: int, start: int, stop: int, buffer, at: int):
        """Bundles [start, stop) of `layer` as one span of file bytes, read straight
        into `buffer` (page-aligned memory, e.g. an mmap) from byte `at`, in chunks
        over the threads: no staging, no copy (the streamed placement's ring).
        Returns (offset of bundle `start` in `buffer`, syscalls, bytes read);
        ValueError for a separate arrangement, a range outside the layer, or a span
        not aligned or past the buffer's end."""
        began = time.perf_counter()
        extent = self._extent(layer)
        if self.regions > 1:
            raise ValueError("read_span reads bundled layouts only")
        if not 0 <= start < stop <= extent.neurons:
            raise ValueError(f"range [{start}, {stop}) not in [0, {extent.neurons})")
        first = extent.offset + start * self.bundle_bytes
        lo = self._align_down(first)
        hi = self._align_up(extent.offset + stop * self.bundle_bytes)
        if at % self._align or at + (hi - lo) > len(buffer):
            raise ValueError(
                f"span of {hi - lo} bytes at {at} does not fit a buffer of "
                f"{len(buffer)} aligned on {self._align}"
            )
        reads, got = self._read_runs([lo], [hi], [at], buffer)
        self._finish(layer, reads, got, (stop - start) * self.bundle_bytes, began)
        return at + first - lo, reads, got

    def close(self) -> None:
        """Release the file and the threads (idempotent)."""
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown()
            self._pool = None
        for ring in getattr(self, "_opened", ()):
            ring.close()
        self._opened = []
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

    def _runs(self, extent: LayerExtent, ids):
        """The file pieces of `ids` in file order, grouped into runs to read.

        Returns (starts, first, last, run_lo, run_hi): each piece's file offset, the
        first and last piece of each run, and each run's aligned byte range."""
        # On disk, in file order: one piece per neuron (bundled), or per part and
        # neuron, part-major (separate: region r holds every neuron's part r).
        region_start = extent.offset + extent.neurons * np.cumsum(
            [0] + self.region_bytes[:-1]
        )
        starts = np.concatenate(
            [
                a + ids * size
                for a, size in zip(region_start, self.region_bytes, strict=True)
            ]
        )
        size = np.repeat(self.region_bytes, len(ids))  # of each file piece
        lo, hi = self._align_down(starts), self._align_up(starts + size)
        # A new run begins where the (aligned) gap to the previous piece is too big
        # to read through; aligned ranges that touch or overlap always merge.
        new_run = np.empty(len(starts), dtype=bool)
        new_run[0] = True
        new_run[1:] = lo[1:] - hi[:-1] > self.max_gap_bytes
        # Runs longer than the staging buffer are cut at piece boundaries (streaming
        # a whole layer, say): a cut starts where a piece ends `most` bytes further,
        # so it spans less than `most` + one aligned piece.
        most = max(1, len(self._staging) - max(self.region_bytes) - 2 * self._align)
        run_lo = lo[np.maximum.accumulate(np.where(new_run, np.arange(len(lo)), 0))]
        cut = (hi - run_lo) // most
        new_run[1:] |= cut[1:] != cut[:-1]
        first = np.flatnonzero(new_run)
        last = np.append(first[1:] - 1, len(starts) - 1)
        return starts, first, last, lo[first], hi[last]

    def _rounds(self, extent: LayerExtent, ids):
        """Read the pieces of `ids` round by round, each round filling the staging
        buffer at most; yields (j0, j1, at, syscalls, bytes read) per round: file
        pieces j0..j1 (in file order) now sit at staging offsets `at`."""
        starts, first, last, run_lo, run_hi = self._runs(extent, ids)
        ends = np.cumsum(run_hi - run_lo)  # staging bytes up to each run's end
        begin = 0  # first run of this round
        while begin < len(first):
            base = ends[begin - 1] if begin else 0
            end = int(np.searchsorted(ends, base + len(self._staging), "right"))
            pos = ends[begin:end] - (run_hi - run_lo)[begin:end] - base
            reads, got = self._read_runs(run_lo[begin:end], run_hi[begin:end], pos)
            # piece j of this round sits at pos[its run] + (start - its run's lo)
            j0, j1 = first[begin], last[end - 1] + 1
            counts = last[begin:end] - first[begin:end] + 1
            run_of = np.repeat(np.arange(end - begin), counts)
            at = pos[run_of] + (starts[j0:j1] - run_lo[begin:end][run_of])
            yield j0, j1, at, reads, got
            begin = end

    def _read_pieces(
        self, extent: LayerExtent, ids, dest, slots=None
    ) -> tuple[int, int]:
        """Read the file pieces of `ids` and copy piece p of ids[i] to dest[p][i]
        (uint8 rows; dest[p][slots[i]] with `slots`); in rounds that each fit the
        staging buffer. Returns (syscalls, bytes read)."""
        n = len(ids)

        def rows_of(d, lo: int, hi: int):  # (rows, where) of ids [lo, hi)
            return (d[lo:hi], None) if slots is None else (d, slots[lo:hi])

        reads = got = 0
        for j0, j1, at, r, g in self._rounds(extent, ids):
            reads, got = reads + r, got + g
            for p in range(self.parts):
                rows = dest[self.first_piece[p] : self.first_piece[p + 1]]
                if self.regions > 1:  # file pieces of part p: j in [p n, (p + 1) n)
                    a, b = max(j0, p * n), min(j1, (p + 1) * n)
                    if a < b:
                        self._gather_fields(
                            p,
                            at[a - j0 : b - j0],
                            [rows_of(d, a - p * n, b - p * n) for d in rows],
                        )
                else:
                    self._gather_fields(
                        p, at + self.part_offsets[p], [rows_of(d, j0, j1) for d in rows]
                    )
        return reads, got

    def _gather_fields(self, part: int, offsets, rows: list) -> None:
        """Copy the fields of `part` whose first byte sits at staging `offsets` into
        `rows` (per field, a uint8 array and the rows to write, None: all)."""
        for (at, size), (dest, where) in zip(self.fields[part], rows, strict=True):
            gather(self._staging, offsets + at, dest, size, where)

    def _fitting(self, extent: LayerExtent, ids) -> np.ndarray:
        """The longest prefix of `ids` whose runs fit the staging buffer at once
        (bisection: the bytes of a prefix's runs grow with its length)."""

        def fits(k: int) -> bool:
            _, _, _, run_lo, run_hi = self._runs(extent, ids[:k])
            return int((run_hi - run_lo).sum()) <= len(self._staging)

        if not len(ids) or fits(len(ids)):
            return ids
        good, bad = 0, len(ids)  # fits(good) (the empty prefix), not fits(bad)
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if fits(mid) else (good, mid)
        return ids[:good]

    def _read_runs(self, lo, hi, pos, buffer=None) -> tuple[int, int]:
        """Read file bytes [lo[i], hi[i]) to buffer[pos[i]:] (default: the staging
        buffer) for every run, in chunks through this thread's io_uring or over the
        thread pool; returns (syscalls or ring reads, bytes read)."""
        buffer = self._staging if buffer is None else buffer
        offset, at, length = cut_runs(lo, hi, pos, self.chunk_bytes)
        # a lone read goes without the ring: ~35 us of CPU, a ring's call ~50
        if len(offset) > 1 and (ring := self._ring()):
            reads, got, short = ring_runs(
                ring, self._fd, offset, at, length, buffer, self._size
            )
            more = self._read_chunks(short, buffer) if short else (0, 0)
            return reads + more[0], got + more[1]
        chunks = list(zip(offset.tolist(), at.tolist(), length.tolist(), strict=True))
        return self._spread(self._read_chunks, chunks, buffer)

    def _spread(self, read, tasks: list, *args) -> tuple[int, int]:
        """read(tasks, *args) over the thread pool; the summed (syscalls, bytes)."""
        workers = min(self.threads, len(tasks))
        if workers <= 1:
            return read(tasks, *args)
        # One task per worker, taking every workers-th chunk: one future per chunk
        # measured 20-30% slower here (thousands of small reads/s on two cores).
        done = self._pool.map(
            read,
            [tasks[w::workers] for w in range(workers)],
            *[[a] * workers for a in args],
        )
        counts = list(done)
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def _ring(self):
        """This thread's io_uring (`uring.py`), or None: the thread pool reads."""
        if not hasattr(self._rings, "ring"):
            self._rings.ring = open_ring()
            self._opened += [self._rings.ring] if self._rings.ring else []
        return self._rings.ring

    def _read_chunks(self, chunks, buffer) -> tuple[int, int]:
        return read_chunks(self._fd, chunks, buffer, self._size, self._align, self.path)

    def _finish(self, layer: int, reads: int, got: int, useful: int, began: float):
        if self.mode == "buffered" and hasattr(os, "posix_fadvise"):
            # Drop what these reads put in the page cache, so it does not serve later
            # reads (and hide the disk's cost) or eat the memory budget.
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.stats.record(layer, reads, got, useful, time.perf_counter() - began)
