"""The "compute-only" row's reader: every bundle already in DRAM, so a token costs
what the flash method computes and moves, with no I/O (issue 13's yardstick: the
paper's CPU row spent 669 ms per token against 506 of compute, 1.32x)."""

from __future__ import annotations

import numpy as np

from ..flash.reader import FlashReader


class InMemoryReader(FlashReader):
    """A FlashReader whose "disk" is a copy of the FFN file in memory: the same
    runs, rounds and landing in rows, with memcpy where the disk would read."""

    def __init__(self, path, layers, bundle_bytes, **options):
        super().__init__(path, layers, bundle_bytes, **options)
        self.mode = "in memory"
        self._image = np.fromfile(path, dtype=np.uint8)

    def _read_runs(self, lo, hi, pos, buffer=None) -> tuple[int, int]:
        staging = np.frombuffer(
            self._staging if buffer is None else buffer, dtype=np.uint8
        )
        got = 0
        for a, b, p in zip(
            np.asarray(lo).tolist(),
            np.asarray(hi).tolist(),
            np.asarray(pos).tolist(),
            strict=True,
        ):
            b = min(b, len(self._image))  # aligned reads may ask past the end
            staging[p : p + b - a] = self._image[a:b]
            got += b - a
        return len(lo), got
