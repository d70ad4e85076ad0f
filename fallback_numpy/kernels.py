"""Matmuls over weights kept at their stored precision: float16 or bfloat16 (passed
as uint16 bit patterns) or float32, always accumulated in float32.

`matmul_t(x, w)` is x @ w.T (projections whose weight rows are the outputs);
`matmul(x, w)` is x @ w (the FFN down projection over neuron rows, skipping the zeros
of x); `widen(w)` is the exact float32 copy. A weight may be a strided view of stored
bundles: its rows must be contiguous, the row stride is free.

Small T (decode) runs compiled loops (numba, `_kernels_jit.py`) that read each weight
once and widen it in registers, on a few worker threads (`_workers.py`); large T
(prefill) widens blocks of rows into a reused float32 buffer and hands each block to
NumPy's BLAS. This module chooses the path and checks the arguments.
"""

from __future__ import annotations

import os
import threading
from itertools import pairwise

import numpy as np

from . import _kernels_jit as jit
from . import _workers

# Dispatch, chosen with `python benchmarks/kernels.py --sweep --threads 1` (AMD EPYC
# Zen 5, 4096 x 4096 weights cycled over 0.5 GB; ms per matrix, compiled loops vs
# widen-then-BLAS, bfloat16 / float16):
#   x @ w.T  T=1: 1.0 vs 2.4 / 1.0 vs 2.3   T=4: 3.8 vs 4.6 / 3.8 vs 4.8
#            T=8: 5.4 vs 5.8 / 5.3 vs 5.9   T=12: 9.8 vs 6.5 / 9.4 vs 6.7
#   x @ w    T=1: 1.1 vs 2.3 / 1.1 vs 2.4   T=4: 5.2 vs 5.0 / 5.0 vs 5.2
#   (dense)  T=6: 6.0 vs 6.9 / 6.5 vs 7.0   T=8: 8.4 vs 6.2 / 8.3 vs 6.2
# The loops of x @ w cost one pass per nonzero x[t, j], so they keep sparse x (a ReLU
# model's) up to the same number of nonzeros per active row whatever T is.
DOT_ROWS_MAX_T = 8
SUM_ROWS_MAX_TERMS = 6

# Bytes of the float32 block that the large-T paths widen and hand to BLAS (same
# sweep, float16, ms per matrix for 0.5 / 1 / 2 / 4 / 8 MB: T=16 10.1 / 8.6 / 8.0 /
# 7.9 / 8.0, T=128 42.1 / 39.3 / 38.7 / 38.4 / 39.7, T=512 174 / 164 / 153 / 148 /
# 144).
BLOCK_BYTES = 4 << 20

# Jobs that read fewer weight bytes run on the calling thread alone, larger ones in
# parts of about PART_BYTES shared by the threads. Waking a worker takes 40-55 us
# here, what one core needs for ~2 MB: float16 GEMV, us per matrix on 1 / 2 threads,
# 2 MB 73 / 92, 4 MB 148 / 171, 8 MB 257 / 226, 16 MB 571 / 433.
PARALLEL_MIN_BYTES = 8 << 20
PART_BYTES = 4 << 20
SUM_PARTS_MAX = 8  # x @ w: each part sums into its own (T, k) buffer

_BITS_DTYPE = {  # the kernels tell the kinds apart by the dtype of the bits view
    np.dtype(np.uint16): np.dtype(np.uint16),  # bfloat16 bit patterns
    np.dtype(np.float16): np.dtype(np.int16),  # float16, as its bits
    np.dtype(np.float32): np.dtype(np.float32),
}

_threads = (
    len(os.sched_getaffinity(0))
    if hasattr(os, "sched_getaffinity")
    else (os.cpu_count() or 1)
)


def set_threads(n: int) -> None:
    """Set how many threads the compiled kernels use (the caller and n - 1 workers).

    BLAS calls of the large-T paths follow the BLAS limit (threadpoolctl) instead.
    Keep BLAS on one thread while decoding: OpenBLAS's idle threads spin for a while
    after each call and take the cores from these workers (x @ w, T=4, 2 threads:
    16.9 ms beside 2 BLAS threads, 9.2 ms beside 1).

    Args:
        n: threads, at least 1 (default: the cores this process may use).

    Raises:
        ValueError: n below 1.
    """
    global _threads
    if int(n) < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    _threads = int(n)


def get_threads() -> int:
    """The compiled kernels' thread count (see `set_threads`)."""
    return _threads


def matmul_t(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x @ w.T in float32, for w stored as float32, float16 or bfloat16.

    Args:
        x: (T, k) float32.
        w: (n, k) float32, float16 or uint16 (bfloat16 bits); rows contiguous, any
            row stride (a view into interleaved bundles works).
        out: optional (T, n) float32 C-contiguous array to write into.

    Returns:
        (T, n) float32: out if given.

    Raises:
        ValueError: a dtype, shape or layout outside the above.
    """
    bits, row_stride = _weight_bits(w)
    n, k = w.shape
    x = _activations(x, k, "k = w.shape[1]")
    out = _output(out, (x.shape[0], n), x, w)
    if w.dtype == np.float32:
        with _quiet():
            return np.matmul(x, w.T, out=out)
    if out.size == 0 or k == 0:
        out.fill(0)
        return out
    if x.shape[0] <= DOT_ROWS_MAX_T:
        parts = _ranges(n, _part_count(w.itemsize * n * k))
        jobs = [(x, bits, row_stride, k, lo, hi, out) for lo, hi in parts]
        _workers.run(jit.dot_rows, jobs, _threads)
        return out
    # Blocks widen on this thread alone while BLAS uses its threads: 2 threads,
    # float16 4096 x 4096 at T=16, 5.4 ms against 5.8 ms with the widening split too
    # (float32 BLAS: 5.1 ms); fewer hand-offs between the two thread pools.
    block = _buffer("block", _block_rows(n, k), k)
    with _quiet():
        for j0 in range(0, n, len(block)):
            rows = np.arange(j0, min(n, j0 + len(block)))
            jit.widen_rows(bits, row_stride, rows, k, 0, len(rows), block)
            np.matmul(x, block[: len(rows)].T, out=out[:, j0 : j0 + len(rows)])
    return out


def matmul(x: np.ndarray, w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x @ w in float32, skipping the terms where x is exactly 0.

    A skipped term contributes nothing even when its weight is inf or nan, where
    NumPy's x @ w would give nan (0 * inf): rows of neurons that a ReLU switched off
    are never read, so whatever they hold cannot leak into the result. inf or nan in
    x itself propagate as IEEE arithmetic says.

    Args:
        x: (T, n) float32, often mostly zeros.
        w: (n, k) float32, float16 or uint16 (bfloat16 bits); rows contiguous, any
            row stride.
        out: optional (T, k) float32 C-contiguous array to write into.

    Returns:
        (T, k) float32: out if given.

    Raises:
        ValueError: a dtype, shape or layout outside the above.
    """
    bits, row_stride = _weight_bits(w)
    n, k = w.shape
    x = _activations(x, n, "n = w.shape[0]")
    out = _output(out, (x.shape[0], k), x, w)
    out.fill(0)
    if out.size == 0 or n == 0:
        return out
    rows, terms = jit.nonzero_columns(x)
    if terms <= SUM_ROWS_MAX_TERMS * len(rows):
        _sum_rows(x, bits, row_stride, rows, k, out)
        return out
    block = _buffer("block", _block_rows(len(rows), k), k)
    partial = _buffer("partial", x.shape[0], k)
    dense = len(rows) == n  # then rows[a:b] == a..b-1: x columns by slicing
    with _quiet():
        for r0 in range(0, len(rows), len(block)):
            part = rows[r0 : r0 + len(block)]
            if jit.widen_rows(bits, row_stride, part, k, 0, len(part), block):
                # inf/nan weights: BLAS would turn their zero x terms into nan
                _sum_rows(x, bits, row_stride, part, k, out)
                continue
            xs = x[:, r0 : r0 + len(part)] if dense else x[:, part]
            np.matmul(xs, block[: len(part)], out=partial)
            out += partial
    return out


def widen(w: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The exact float32 values of float16, bfloat16 (uint16 bits) or float32 rows.

    Args:
        w: (n, k) float32, float16 or uint16 (bfloat16 bits); rows contiguous, any
            row stride.
        out: optional (n, k) float32 C-contiguous array to write into.

    Returns:
        (n, k) float32: out if given. Every value keeps its value or class
        (subnormals, signed zeros, inf, nan).

    Raises:
        ValueError: a dtype, shape or layout outside the above.
    """
    bits, row_stride = _weight_bits(w)
    out = _output(out, w.shape, w)
    if out.size:
        _widen_rows(bits, row_stride, np.arange(w.shape[0]), w.shape[1], out)
    return out


def _part_count(work_bytes: int) -> int:
    """1 for a job under PARALLEL_MIN_BYTES or on one thread, else parts of about
    PART_BYTES, at least one per thread."""
    if _threads == 1 or work_bytes < PARALLEL_MIN_BYTES:
        return 1
    return max(_threads, -(-work_bytes // PART_BYTES))


def _ranges(length: int, count: int, align: int = 1) -> list[tuple[int, int]]:
    """range(length) cut into up to `count` [lo, hi) ranges, bounds on multiples of
    `align`."""
    count = max(1, min(count, length // align))
    bounds = [length * p // count // align * align for p in range(count)] + [length]
    return [(lo, hi) for lo, hi in pairwise(bounds) if hi > lo]


def _widen_rows(bits, row_stride, rows, k, out) -> int:
    """out[r] = w[rows[r]] as float32; how many values are inf or nan."""
    parts = _ranges(len(rows), _part_count(bits.itemsize * len(rows) * k))
    jobs = [(bits, row_stride, rows, k, lo, hi, out) for lo, hi in parts]
    return sum(_workers.run(jit.widen_rows, jobs, _threads))


def _sum_rows(x, bits, row_stride, rows, k, out) -> None:
    """out[t] += x[t, j] * w[j] for j in rows where x[t, j] != 0.

    The threads take ranges of rows, each row read whole in one stream, into a
    (T, k) buffer per range, added up in range order: the ranges depend on the size
    only, so the result does not depend on the thread count. (Ranges of columns
    instead cut every row in pieces: dense float16 at T=1 on 2 threads, 11008 x
    4096, ran 3.9 ms against 2.8 ms on one.)
    """
    work = bits.itemsize * len(rows) * k
    count = 1 if work < PARALLEL_MIN_BYTES else -(-work // PART_BYTES)
    parts = _ranges(len(rows), min(count, SUM_PARTS_MAX))
    if len(parts) == 1:
        jit.sum_rows(x, bits, row_stride, rows, k, 0, k, out)
        return
    sums = _buffer("sums", len(parts) * len(x), k).reshape(len(parts), len(x), k)
    sums.fill(0)
    jobs = [
        (x, bits, row_stride, rows[lo:hi], k, 0, k, sums[p])
        for p, (lo, hi) in enumerate(parts)
    ]
    _workers.run(jit.sum_rows, jobs, _threads)
    with _quiet():
        out += sums.sum(axis=0)


def _weight_bits(w: np.ndarray) -> tuple[np.ndarray, int]:
    """A read-only 1-D view over w's rows, as the dtype the kernels dispatch on, and
    the row stride in elements: row j is flat[j * stride : j * stride + k]."""
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise ValueError(f"w must be a 2-D NumPy array, got {type(w).__name__}")
    if w.dtype not in _BITS_DTYPE:
        raise ValueError(
            f"w.dtype must be float32, float16 or uint16 (bfloat16 bits), got {w.dtype}"
        )
    n, k = w.shape
    size = w.itemsize
    row_stride = w.strides[0] // size if n > 1 else k
    rows_contiguous = k < 2 or w.strides[1] == size
    rows_apart = n < 2 or (w.strides[0] % size == 0 and row_stride >= k)
    if w.size and not (rows_contiguous and rows_apart):
        raise ValueError(
            f"w's rows must be contiguous and not overlap: strides {w.strides} for "
            f"shape {w.shape} and itemsize {size} (pass np.ascontiguousarray(w))"
        )
    span = (n - 1) * row_stride + k if n and k else 0
    flat = np.lib.stride_tricks.as_strided(
        w.view(_BITS_DTYPE[w.dtype]), shape=(span,), strides=(size,), writeable=False
    )
    return flat, row_stride


def _activations(x: np.ndarray, width: int, what: str) -> np.ndarray:
    """x as a read-only C-contiguous (T, width) float32 array (read-only so that the
    kernels compile one signature whatever the caller's flags)."""
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise ValueError(
            f"x must be a 2-D float32 NumPy array, got "
            f"{getattr(x, 'dtype', type(x).__name__)} of shape {np.shape(x)}"
        )
    if x.shape[1] != width:
        raise ValueError(f"x.shape[1] must be {what} = {width}, got {x.shape}")
    x = np.ascontiguousarray(x).view()
    x.flags.writeable = False
    return x


def _output(out: np.ndarray | None, shape: tuple[int, int], *inputs) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if any(np.may_share_memory(out, given) for given in inputs):
        raise ValueError("out must not overlap the inputs")
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != tuple(shape)
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise ValueError(
            f"out must be a writable C-contiguous float32 array of shape "
            f"{tuple(shape)}, got {getattr(out, 'dtype', None)} {np.shape(out)}"
        )
    return out


def _quiet() -> np.errstate:
    """No warnings for inf/nan results: BLAS paths as quiet as the compiled loops."""
    return np.errstate(invalid="ignore", over="ignore")


_buffers = threading.local()  # per calling thread: reused float32 arrays by name


def _block_rows(rows: int, k: int) -> int:
    """Rows of the large-T paths' widened block: those that fill BLOCK_BYTES, at most
    `rows`, at least 1."""
    return max(1, min(rows, BLOCK_BYTES // (4 * k)))


def _buffer(name: str, rows: int, k: int) -> np.ndarray:
    """A reused (rows, k) float32 array, grown when too small, kept per thread."""
    kept = _buffers.__dict__.get(name)
    if kept is None or kept.size < rows * k:
        kept = np.empty(rows * k, np.float32)
        setattr(_buffers, name, kept)
    return kept[: rows * k].reshape(rows, k)
