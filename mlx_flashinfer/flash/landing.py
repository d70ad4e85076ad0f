"""Landing: copy bundle pieces from the reader's staging buffer into the rows a cache
gives them (the one copy a read makes, `reader.py`), and hold a prefetch's bundles
until their rows are known (`Fetched`).

Backend-free: numpy only.
"""

from __future__ import annotations

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
