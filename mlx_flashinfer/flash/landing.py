"""Landing: where a read's bytes go. Whole bundles whose pieces and rows sit on the
alignment O_DIRECT asks are read straight into their rows (`direct_calls`: no
staging, no copy; an expert's gate, up and down rows, say); otherwise the reader's
staging buffer takes the disk's reads and each piece is copied into its row
(`gather`, the one copy a read makes). A prefetch's bundles stay in the staging
buffer until their rows are known (`Fetched`).

Reading experts straight into their rows instead of through the staging buffer:
OLMoE-shaped q4 experts (4.6 MB), 1, 2 and 8 a call, alternating runs on this VM's
disk: 1.35-1.49 GB/s against 0.97-1.39 (the copy out of staging runs at about 3 GB/s
on one core, as long as the disk's read of the same bytes); at 50%, window 4, 268 ->
221 ms a token.

Backend-free: numpy only.
"""

from __future__ import annotations

import os

import numpy as np


def bytes_of(rows: np.ndarray) -> np.ndarray:
    """Rows (n, ...) with contiguous rows -> their bytes, (n, row bytes) uint8."""
    rows = rows.reshape(len(rows), -1)
    if rows.shape[1] and rows.strides[1] != rows.itemsize:
        raise ValueError("the rows of `into` must be contiguous")
    return rows.view(np.uint8)


def gather(staging, offsets, rows: np.ndarray, piece: int, where=None) -> None:
    """Copy the `piece` bytes at each byte offset of `staging` into `rows` (uint8),
    or into rows[where] (a cache's free rows, in any order)."""
    if not len(offsets):
        return
    # 8-byte words where offsets allow: about twice as fast as bytes
    word = next(
        w
        for w in (8, 4, 2, 1)
        if piece % w == 0 and not np.any(offsets % w) and rows.strides[0] % w == 0
    )
    words = np.frombuffer(staging, dtype=f"u{word}")
    pieces = np.lib.stride_tricks.as_strided(
        words, (len(words) - piece // word + 1, piece // word), (word, word)
    )
    target = rows.view(f"u{word}")
    target[slice(None) if where is None else where] = pieces[offsets // word]


def aligned(offset: int, bundle_bytes: int, dest: list, align: int) -> bool:
    """Whether bundles of `bundle_bytes` from file byte `offset` can be read
    straight into the rows of `dest` (uint8 views of every piece): bundles, pieces
    and rows all on the alignment O_DIRECT asks (any, through the page cache)."""
    if offset % align or bundle_bytes % align:
        return False
    return all(
        d.shape[1] % align == 0
        and d.ctypes.data % align == 0
        and d.strides[0] % align == 0
        for d in dest
    )


def lands_direct(layout, align: int) -> bool:
    """Whether a layout's bundles can land straight in cache rows (`aligned` for
    the caches both backends allocate, page-aligned from 64 KiB): the bundle and
    every piece of it (a part's values, or its packed integers, scales, biases)
    whole multiples of the alignment."""
    pieces = [b for part in layout.field_bytes for b in part]
    return layout.bundle_bytes % align == 0 and all(b % align == 0 for b in pieces)


def direct_calls(starts, dest: list, rows, chunk: int) -> list:
    """The `preadv` calls that read whole bundles straight into their rows: bundle
    i starts at file byte starts[i], its pieces in order go to dest[p][rows[i]]
    (uint8 row views). Returns [(file offset, [memoryviews])], each call at most
    `chunk` bytes over a contiguous file range (a piece longer than that is cut),
    so the reader's threads share a large bundle as they share a long run."""
    calls, offset, views, size = [], -1, [], 0
    starts, rows = np.asarray(starts).tolist(), np.asarray(rows).tolist()
    for start, row in zip(starts, rows, strict=True):
        at = start
        for d in dest:
            piece = memoryview(d[row])
            for cut in range(0, len(piece), chunk):
                part = piece[cut : cut + chunk]
                if at != offset + size or size + len(part) > chunk:
                    if views:
                        calls.append((offset, views))
                    offset, views, size = at, [], 0
                views.append(part)
                size += len(part)
                at += len(part)
    if views:
        calls.append((offset, views))
    return calls


def cut_runs(lo, hi, pos, chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """File runs [lo[i], hi[i]), to land at pos[i] of a buffer, cut in reads of at
    most `chunk` bytes (so threads, or a ring, share a long run): each read's
    (file offset, buffer position, length), as arrays."""
    lo, hi, pos = (np.asarray(x, np.int64) for x in (lo, hi, pos))
    pieces = -(-(hi - lo) // chunk)  # reads per run
    run = np.repeat(np.arange(len(lo)), pieces)
    first = np.cumsum(pieces) - pieces
    offset = lo[run] + (np.arange(len(run)) - first[run]) * chunk
    return offset, pos[run] + offset - lo[run], np.minimum(chunk, hi[run] - offset)


def read_chunks(fd: int, chunks, buffer, size: int, align: int, path: str):
    """`preadv` each (file offset, buffer position, length) of `chunks` in full,
    into `buffer` (a file of `size` bytes: an aligned read may ask past its end);
    returns (syscalls, bytes read)."""
    reads = got = 0
    with memoryview(buffer) as view:
        for offset, at, length in chunks:
            need = min(length, size - offset)
            counts = read_full(fd, offset, [view[at : at + length]], need, align, path)
            reads, got = reads + counts[0], got + counts[1]
    return reads, got


def read_calls(fd: int, calls: list, path: str) -> tuple[int, int]:
    """`preadv` each (file offset, [row views]) of `calls` in full; returns
    (syscalls, bytes read)."""
    reads = got = 0
    for offset, views in calls:
        need = sum(len(v) for v in views)
        counts = read_full(fd, offset, views, need, 1, path)
        reads, got = reads + counts[0], got + counts[1]
    return reads, got


def read_full(fd: int, offset: int, views: list, need: int, align: int, path: str):
    """`preadv` into `views` from file byte `offset` until `need` bytes came, going
    on after short reads (ones of whole `align` blocks: O_DIRECT's); returns
    (syscalls, bytes read).

    Raises:
        ValueError: the file ended or a read broke a block: it changed under us.
    """
    reads = done = 0
    while done < need:
        n = os.preadv(fd, views, offset + done)
        reads += 1
        if n == 0 or (n % align and done + n < need):
            raise ValueError(
                f"{path}: got {done + n} of {need} bytes at offset {offset}: the "
                "file changed or was truncated after loading (reopen the model, or "
                "re-convert it)"
            )
        done += n
        views = skip_bytes(views, n)
    return reads, done


def skip_bytes(views: list, n: int) -> list:
    """`views` without their first n bytes (after a short `preadv`)."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views = views[1:]
    return [views[0][n:], *views[1:]] if views and n else views


class Fetched:
    """Bundles a `FlashReader.fetch` left in the reader's staging buffer.

    `take(ids, into)` lands the bundles of `ids` (a sorted subset of `ids` fetched)
    into rows, as `read` would have; valid until the reader's next call.
    """

    def __init__(self, reader, ids, at, reads: int, bytes_read: int, seconds: float):
        self.reader = reader
        self.ids = ids  # the neurons fetched, sorted
        self._at = at  # (regions, len(ids)): staging offset of each file piece
        self.reads, self.bytes_read = reads, bytes_read  # syscalls and bytes read
        self.seconds = seconds  # the fetch's wall time

    def take(self, ids: np.ndarray, into: list, *, slots=None) -> list:
        """Copy piece p of neuron ids[i] to into[p][i], or into[p][slots[i]]
        (pieces and slots as for `FlashReader.read`)."""
        r = self.reader
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not len(ids):
            return into
        where = np.searchsorted(self.ids, ids)
        if where[-1] >= len(self.ids) or np.any(self.ids[where] != ids):
            raise ValueError("take: some ids were not fetched")
        for p in range(r.parts):
            if r.regions > 1:
                offsets = self._at[p, where]
            else:
                offsets = self._at[0, where] + r.part_offsets[p]
            rows = into[r.first_piece[p] : r.first_piece[p + 1]]
            dest = [(bytes_of(np.asarray(d)), slots) for d in rows]
            r._gather_fields(p, offsets, dest)
        return into
