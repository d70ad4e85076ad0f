"""Many small reads in one system call: Linux's io_uring, driven from NumPy.

Sparse reads are bound by their count, not their bytes: a q4 OPT-6.7B token reads
~10,000 bundles of 7 KiB. Through a thread pool each read is a `preadv` call, a GIL
hand-over and a thread wake-up: 20-33 us of CPU a read on two cores, taken from the
products. Here a call's reads are written into the submission ring as one NumPy
assignment per field and submitted (and waited for) in one `io_uring_enter`.
Measured with `benchmarks/uring_reads.py` (the reader, 2% of a layer a call, Intel
Xeon, 2 vCPU, virtio disk): OPT-6.7B q4 bundles of 6.5 KiB, thread pool 0.26-0.36
GB/s at 23-25 us of CPU a read, this ring (256 deep) 0.63-0.68 GB/s at 3.6-3.8 us;
float16 bundles of 16 KiB, 0.65-0.73 against 0.92-1.02 GB/s, 22-25 against 6 us.

No binding is needed: two system calls through libc and the rings mapped as NumPy
arrays. (`liburing` on PyPI reads only into Python bytearrays, which O_DIRECT
refuses: they are not 512-byte aligned.) The kernel takes the submitted entries
inside `io_uring_enter` on the calling thread, so writing the entries before the
tail, in program order, is all the ordering submission needs. A ring serves one
thread at a time: the reader keeps one per calling thread.

`open_ring` returns None where io_uring is missing, refused or cannot read (not
Linux, a kernel before 5.6, `kernel.io_uring_disabled`, a container's seccomp
filter: it tries one read), or when
MLX_FLASHINFER_URING=0: the reader then keeps its thread pool.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys
import tempfile

import numpy as np

DISABLE_ENV = "MLX_FLASHINFER_URING"  # "0": never use a ring
RING_ENTRIES = 256  # reads in flight: 64-1024 read as fast here, 16 half as fast
_SYSCALLS = {"x86_64": (425, 426), "aarch64": (425, 426)}  # setup, enter
_OP_READ = 22  # IORING_OP_READ
_ENTER_GETEVENTS = 1
_FEAT_SINGLE_MMAP = 1
_OFF_CQ_RING, _OFF_SQES = 0x8000000, 0x10000000

# struct io_uring_sqe is 64 bytes, written as 8 little-endian words: opcode, flags,
# ioprio and fd; file offset; address; length and read flags; user data; 0, 0, 0.
# struct io_uring_cqe is 16 bytes, read as 4 words of 32 bits: user data (low,
# high), result, flags.
_SQE_WORDS, _CQE_BYTES = 8, 16


def _u32s(*names: str) -> list:
    return [(n, ctypes.c_uint32) for n in names]


class _SQOffsets(ctypes.Structure):  # struct io_sqring_offsets
    _fields_ = _u32s("head", "tail", "mask", "entries", "flags", "dropped", "array")
    _fields_ += _u32s("resv") + [("user_addr", ctypes.c_uint64)]


class _CQOffsets(ctypes.Structure):  # struct io_cqring_offsets
    _fields_ = _u32s("head", "tail", "mask", "entries", "overflow", "cqes", "flags")
    _fields_ += _u32s("resv") + [("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):  # struct io_uring_params
    _fields_ = _u32s("sq_entries", "cq_entries", "flags", "cpu", "idle", "features")
    _fields_ += [("resv", ctypes.c_uint32 * 4)]
    _fields_ += [("sq_off", _SQOffsets), ("cq_off", _CQOffsets)]


class Ring:
    """One io_uring instance with its rings mapped (raises OSError where the
    kernel refuses it)."""

    def __init__(self, entries: int = RING_ENTRIES):
        setup, self._enter = _SYSCALLS[platform.machine()]
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        p = _Params()
        fd = self._libc.syscall(setup, entries, ctypes.byref(p))
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"io_uring_setup: {os.strerror(code)}")
        self.fd, self.entries = fd, p.sq_entries
        sq, cq = p.sq_off, p.cq_off
        sq_size = sq.array + p.sq_entries * 4
        cq_size = cq.cqes + p.cq_entries * _CQE_BYTES
        single = p.features & _FEAT_SINGLE_MMAP
        self._sq = mmap.mmap(fd, max(sq_size, cq_size) if single else sq_size)
        self._cq = self._sq if single else mmap.mmap(fd, cq_size, offset=_OFF_CQ_RING)
        self._sqes_map = mmap.mmap(fd, p.sq_entries * 64, offset=_OFF_SQES)

        def u32(where, offset, count=1):
            return np.frombuffer(where, np.uint32, count, offset)

        self._sq_tail = u32(self._sq, sq.tail)
        self._sq_mask = int(u32(self._sq, sq.mask)[0])
        # entry j of the submission ring is always SQE j: written once
        u32(self._sq, sq.array, p.sq_entries)[:] = np.arange(p.sq_entries)
        self._cq_head, self._cq_tail = u32(self._cq, cq.head), u32(self._cq, cq.tail)
        self._cq_mask = int(u32(self._cq, cq.mask)[0])
        self._cqes = u32(self._cq, cq.cqes, p.cq_entries * 4).reshape(-1, 4)
        self._sqes = np.frombuffer(self._sqes_map, np.uint64).reshape(-1, _SQE_WORDS)
        self._sqes[:] = 0

    def read(self, fd: int, offsets, addresses, lengths) -> np.ndarray:
        """Read lengths[i] bytes at file offset offsets[i] to memory at addresses[i]
        for every i, RING_ENTRIES at a time; returns each read's byte count (short
        near the end of a file; the caller finishes short reads).

        Raises:
            OSError: a read failed (its errno), or the kernel refused the call.
        """
        got = np.zeros(len(offsets), np.int64)
        for start in range(0, len(offsets), self.entries):
            count = min(self.entries, len(offsets) - start)
            tail = int(self._sq_tail[0])
            first = tail & self._sq_mask
            # the ring's next `count` entries: a slice, or by index where it wraps
            rows = (
                slice(first, first + count)
                if first + count <= self.entries
                else (first + np.arange(count)) & self._sq_mask
            )
            sqes = self._sqes[rows]
            sqes[:, 0] = _OP_READ | (fd << 32)
            sqes[:, 1] = offsets[start : start + count]
            sqes[:, 2] = addresses[start : start + count]
            sqes[:, 3] = lengths[start : start + count]
            sqes[:, 4] = np.arange(start, start + count)
            if not isinstance(rows, slice):
                self._sqes[rows] = sqes  # fancy indexing wrote a copy
            self._sq_tail[0] = (tail + count) & 0xFFFFFFFF  # entries written first
            self._wait(count, got)
        if (got < 0).any():
            code = -int(got[got < 0][0])
            raise OSError(code, f"io_uring read: {os.strerror(code)}")
        return got

    def _wait(self, count: int, got: np.ndarray) -> None:
        """Submit `count` entries and take their completions into `got`."""
        submit, done = count, 0
        while done < count:
            r = self._libc.syscall(
                self._enter, self.fd, submit, count - done, _ENTER_GETEVENTS, None, 0
            )
            if r < 0:
                code = ctypes.get_errno()
                if code == errno.EINTR:
                    continue
                raise OSError(code, f"io_uring_enter: {os.strerror(code)}")
            submit -= min(r, submit)
            head, tail = int(self._cq_head[0]), int(self._cq_tail[0])
            ready = (tail - head) & 0xFFFFFFFF
            cqes = self._cqes[(head + np.arange(ready)) & self._cq_mask]
            got[cqes[:, 0]] = cqes[:, 2].view(np.int32)  # user data: the read's index
            self._cq_head[0] = tail
            done += ready

    def close(self) -> None:
        for name in ("_sqes", "_cqes", "_sq_tail", "_cq_head", "_cq_tail"):
            setattr(self, name, None)  # NumPy views hold the maps open
        if self._cq is not self._sq:
            self._cq.close()
        self._sq.close()
        self._sqes_map.close()
        os.close(self.fd)


def open_ring(entries: int = RING_ENTRIES) -> Ring | None:
    """A ring, or None where io_uring is unavailable or turned off (module doc)."""
    if os.environ.get(DISABLE_ENV) == "0" or not sys.platform.startswith("linux"):
        return None
    if platform.machine() not in _SYSCALLS:
        return None
    try:
        ring = Ring(entries)
    except OSError:
        return None
    try:  # a kernel before 5.6 makes the ring but has no IORING_OP_READ
        with tempfile.TemporaryFile() as f:
            f.write(b"io_uring")
            f.flush()
            into = np.zeros(8, np.uint8)
            if ring.read(f.fileno(), [0], [into.ctypes.data], [8])[0] == 8:
                return ring
    except OSError:
        pass
    ring.close()
    return None


def ring_runs(ring: Ring, fd: int, offset, at, length, buffer, size: int):
    """Reads (`landing.cut_runs`) through `ring`: length[i] bytes at file byte
    offset[i] to buffer[at[i]:], from a file of `size` bytes; returns (reads, bytes
    read, the unfinished reads' (offset, position, length) for
    `landing.read_chunks` to finish).

    Raises:
        ValueError: a read would land past the buffer's end.
    """
    target = np.frombuffer(buffer, np.uint8)
    if len(at) and (at + length).max() > len(target):
        raise ValueError("a read would land past the end of its buffer")
    got = ring.read(fd, offset, target.ctypes.data + at, length)
    need = np.minimum(length, size - offset)  # an aligned read may ask past the end
    short = np.flatnonzero(got < need)
    rest = [
        (int(offset[i] + got[i]), int(at[i] + got[i]), int(length[i] - got[i]))
        for i in short
    ]
    return len(offset), int(got.sum()), rest
