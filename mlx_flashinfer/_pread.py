"""A batch of positioned reads in one call without the GIL (numba over libc's
pread), so reader threads cost the computing thread nothing but the syscalls.

Each read in Python (`os.preadv` plus the loop around it) holds the GIL for about
6 us; a decoded token of an OPT-6.7B-shaped model issues ~14k reads, and while reads
ahead run beside compute those GIL hand-offs slowed the computing thread 2-3x on two
cores (measured: benchmarks/lookahead.py). `read_batch` loops in machine code and
releases the GIL for the whole batch.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

try:
    from numba import njit

    _libc = ctypes.CDLL(None, use_errno=True)
    _pread = _libc.pread
    # the buffer is passed as an address: a pointer-sized integer in the C ABI
    _pread.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int64]
    _pread.restype = ctypes.c_ssize_t
    _get_errno = ctypes.get_errno
except (ImportError, OSError, AttributeError):  # no numba or no libc pread
    njit = None


def _loop(fd, base, chunks, file_size, align, done):
    """Read chunks[i, 2] bytes at file offset chunks[i, 0] to address base +
    chunks[i, 1] (less near the end of the file); done[i] = bytes read. Returns
    (syscalls, index of a failed read or -1, its return value)."""
    reads = 0
    for i in range(chunks.shape[0]):
        offset, at, length = chunks[i, 0], chunks[i, 1], chunks[i, 2]
        need = min(length, file_size - offset)
        got = 0
        while got < need:
            n = _pread(fd, base + at + got, length - got, offset + got)
            reads += 1
            if n <= 0 or (n % align != 0 and got + n < need):
                return reads, i, n
            got += n
        done[i] = got
    return reads, -1, 0


# compiled on first use (about a second); not cached on disk: numba cannot cache a
# function that calls a ctypes pointer
_compiled = njit(nogil=True)(_loop) if njit is not None else None


AVAILABLE = _compiled is not None


def read_batch(fd, address, chunks, file_size, align):
    """Run one thread's share of reads: `chunks` rows (file offset, offset from
    `address`, length), int64. Returns (syscalls, bytes read).

    Raises:
        OSError: a read failed (errno), or ValueError: the file ended early.
    """
    done = np.zeros(len(chunks), dtype=np.int64)
    reads, failed, value = _compiled(fd, address, chunks, file_size, align, done)
    if failed >= 0:
        if value < 0:
            err = _get_errno()
            raise OSError(err, os.strerror(err))
        offset, _, length = chunks[failed]
        raise ValueError(f"got {done[failed]} of {length} bytes at offset {offset}")
    return reads, int(done.sum())
