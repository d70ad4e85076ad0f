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

Quantized weights (`mlx_flashinfer.formats.quantize.Quantized`: 4- or 8-bit integers, a
float16 scale and bias per group) go the same two ways: `qmatmul_t(x, q)`,
`qmatmul(x, q)` and `dequantize(q)`, with the loops of `_qkernels_jit.py`.
"""

from __future__ import annotations

import os
import threading
from itertools import pairwise

import numpy as np

from fallback_numpy import _kernels_jit as jit
from fallback_numpy import _qkernels_jit as qjit
from fallback_numpy import _qsums_jit as qsums
from fallback_numpy import _workers
from mlx_flashinfer.formats.quantize import BITS, GROUP_SIZES, Quantized, check_format

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
# The same for quantized weights (qmatmul_t, qmatmul), from the same sweep with
# --quantized (ms per matrix, compiled loops vs dequantize-then-BLAS, q4 / q8 with
# groups of 64; the machine shared, load 6.5):
#   x @ w.T  T=4: 4.0 vs 8.4 / 5.9 vs 7.3   T=8: 8.0 vs 10.1 / 10.0 vs 9.4
#            T=12: 12.1 vs 11.3 / 14.2 vs 11.0
#   x @ w    T=4: 6.5 vs 8.6 / 7.6 vs 7.8   T=6: 8.6 vs 11.3 / 9.6 vs 10.3
#   (dense)  T=8: 12.6 vs 10.6 / 13.9 vs 9.9
QDOT_ROWS_MAX_T = 8
QSUM_ROWS_MAX_TERMS = 6

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


def qmatmul_t(x: np.ndarray, q: Quantized, out: np.ndarray | None = None) -> np.ndarray:
    """x @ dequantize(q).T in float32, reading q's packed integers where they are.

    Per group of q's rows, scale * (x . q) + bias * sum(x): the loops unpack and
    multiply integers, the sums of x are taken once per call.

    Args:
        x: (T, k) float32.
        q: a quantized (n, k) matrix: packed uint32 (n, k * bits / 32), scales and
            biases float16 (n, k / group_size), NumPy arrays whose rows are
            contiguous with any row stride (views into interleaved bundles work).
            q.transpose is the caller's business (backend.linear).
        out: optional (T, n) float32 C-contiguous array to write into.

    Returns:
        (T, n) float32: out if given.

    Raises:
        ValueError: a format, dtype, shape or layout outside the above.
    """
    views, n, k = _quantized(q)
    x = _activations(x, k, "k = q.shape[1]")
    out = _output(out, (x.shape[0], n), x, q.packed, q.scales, q.biases)
    if out.size == 0 or k == 0:
        out.fill(0)
        return out
    lanes, per_group = 32 // q.bits, q.group_size * q.bits // 32
    T = x.shape[0]
    loops = T <= QDOT_ROWS_MAX_T
    x_fields = _buffer("x_fields", T, _padded(k, lanes) if loops else k)
    x_sums = _buffer("x_sums", T, k // q.group_size)
    qjit.fields_and_sums(x, lanes, q.group_size, x_fields, x_sums)
    if loops:
        parts = _ranges(n, _part_count(_quantized_bytes(q, n)))
        jobs = [
            (x_fields, x_sums, views, q.bits, per_group, lo, hi, out)
            for lo, hi in parts
        ]
        if len(jobs) == 1:  # the small matrices of small models: 1-2 us a call
            qjit.dot_rows(*jobs[0])
        else:
            _workers.run(qjit.dot_rows, jobs, _threads)
        return out
    # rows dequantized in field order, as x_fields: the dot products are the same
    block = _buffer("block", _block_rows(n, k), k)
    with _quiet():
        for j0 in range(0, n, len(block)):
            rows = np.arange(j0, min(n, j0 + len(block)))
            qjit.dequantize_rows(views, rows, q.bits, per_group, 0, len(rows), block)
            np.matmul(x_fields, block[: len(rows)].T, out=out[:, j0 : j0 + len(rows)])
    return out


def qmatmul(x: np.ndarray, q: Quantized, out: np.ndarray | None = None) -> np.ndarray:
    """x @ dequantize(q) in float32, skipping the rows of q where x is exactly 0 (a
    ReLU model's down projection over neuron rows).

    Args:
        x: (T, n) float32, often mostly zeros.
        q: a quantized (n, k) matrix, as for `qmatmul_t`.
        out: optional (T, k) float32 C-contiguous array to write into.

    Returns:
        (T, k) float32: out if given.

    Raises:
        ValueError: a format, dtype, shape or layout outside the above.
    """
    views, n, k = _quantized(q)
    x = _activations(x, n, "n = q.shape[0]")
    out = _output(out, (x.shape[0], k), x, q.packed, q.scales, q.biases)
    if out.size == 0 or n == 0:
        out.fill(0)
        return out
    lanes, per_group = 32 // q.bits, q.group_size * q.bits // 32
    T, groups = x.shape[0], k // q.group_size
    rows, terms = jit.nonzero_columns(x)
    if len(rows) == 0:
        out.fill(0)
        return out
    if terms <= QSUM_ROWS_MAX_TERMS * len(rows):
        fields, biases = _qsum_rows(x, views, rows, q, k)
        qjit.from_fields(fields, biases, lanes, q.group_size, out)
        return out
    block = _buffer("block", _block_rows(len(rows), k), k)
    partial = _buffer("partial", T, k)
    fields = _buffer("fields", T, k)
    fields.fill(0)
    dense = len(rows) == n  # then rows[a:b] == a..b-1: x columns by slicing
    with _quiet():
        for r0 in range(0, len(rows), len(block)):
            part = rows[r0 : r0 + len(block)]
            qjit.dequantize_rows(views, part, q.bits, per_group, 0, len(part), block)
            xs = x[:, r0 : r0 + len(part)] if dense else x[:, part]
            np.matmul(xs, block[: len(part)], out=partial)
            fields += partial
    no_biases = np.zeros((T, groups), np.float32)  # the blocks carry them
    qjit.from_fields(fields, no_biases, lanes, q.group_size, out)
    return out


def dequantize(q: Quantized, out: np.ndarray | None = None) -> np.ndarray:
    """The float32 values scale * q + bias of a quantized matrix, equal to
    `mlx_flashinfer.formats.quantize.dequantize`'s (embedding rows, tests).

    Args:
        q: a quantized (n, k) matrix, as for `qmatmul_t`.
        out: optional (n, k) float32 C-contiguous array to write into.

    Returns:
        (n, k) float32: out if given.

    Raises:
        ValueError: a format, dtype, shape or layout outside the above.
    """
    views, n, k = _quantized(q)
    out = _output(out, (n, k), q.packed, q.scales, q.biases)
    if out.size == 0:
        return out
    lanes, per_group = 32 // q.bits, q.group_size * q.bits // 32
    fields = np.empty((n, k), np.float32)
    rows = np.arange(n)
    parts = _ranges(n, _part_count(_quantized_bytes(q, n)))
    jobs = [(views, rows, q.bits, per_group, lo, hi, fields) for lo, hi in parts]
    _workers.run(qjit.dequantize_rows, jobs, _threads)
    no_biases = np.zeros((n, 1), np.float32)  # one "group" of k, nothing to add
    qjit.from_fields(fields, no_biases, lanes, k, out)
    return out


def _qsum_rows(x, views, rows, q, k) -> tuple[np.ndarray, np.ndarray]:
    """sum over j in rows, x[t, j] != 0, of x[t, j] * scale_j * q_j (field order)
    and of x[t, j] * bias_j (per group), as `_sum_rows` cuts the work: ranges of
    rows by size alone, each into its own buffers, added up in range order."""
    T, groups = x.shape[0], k // q.group_size
    work = _quantized_bytes(q, len(rows))
    count = 1 if work < PARALLEL_MIN_BYTES else -(-work // PART_BYTES)
    parts = _ranges(len(rows), min(count, SUM_PARTS_MAX))
    width = _padded(k, 32 // q.bits)
    sums = _buffer("sums", len(parts) * T, width).reshape(len(parts), T, width)
    biases = _buffer("bias_sums", len(parts) * T, groups).reshape(len(parts), T, -1)
    sums.fill(0)
    biases.fill(0)
    per_group = q.group_size * q.bits // 32
    jobs = [
        (x, views, rows[lo:hi], q.bits, per_group, sums[p], biases[p])
        for p, (lo, hi) in enumerate(parts)
    ]
    if len(parts) == 1:
        qsums.sum_rows(*jobs[0])
        return sums[0], biases[0]
    _workers.run(qsums.sum_rows, jobs, _threads)
    with _quiet():
        return sums.sum(axis=0), biases.sum(axis=0)


def _quantized(q: Quantized) -> tuple[tuple, int, int]:
    """q's arrays as the loops take them, (packed, its row stride, scales (int16
    bits), row stride, biases, row stride, words per row), and q's shape (n, k);
    ValueError naming the first field that does not fit."""
    if not isinstance(q, Quantized):
        raise ValueError(f"q must be a Quantized matrix, got {type(q).__name__}")
    packed, scales, biases = q.packed, q.scales, q.biases
    if not isinstance(packed, np.ndarray) or packed.ndim != 2:
        raise ValueError(
            f"q.packed must be a 2-D NumPy array, got {type(packed).__name__} of "
            f"shape {np.shape(packed)}"
        )
    if packed.dtype != np.uint32:
        raise ValueError(f"q.packed must be uint32 words, got {packed.dtype}")
    n, k = packed.shape[0], packed.shape[1] * 32 // q.bits if q.bits in BITS else 0
    if q.bits not in BITS or q.group_size not in GROUP_SIZES or k % q.group_size:
        check_format(q.bits, q.group_size, k, "q's rows")
    for name, part in (("scales", scales), ("biases", biases)):
        if not isinstance(part, np.ndarray) or part.dtype != np.float16:
            raise ValueError(
                f"q.{name} must be a float16 NumPy array, got "
                f"{getattr(part, 'dtype', type(part).__name__)}"
            )
        if part.shape != (n, k // q.group_size):
            raise ValueError(
                f"q.{name} must have shape (n, k / group_size) = "
                f"{(n, k // q.group_size)} for packed {packed.shape} at {q.bits} "
                f"bits, got {part.shape}"
            )
    views = (
        *_flat_rows(packed, np.uint32, "q.packed"),
        *_flat_rows(scales, np.int16, "q.scales"),
        *_flat_rows(biases, np.int16, "q.biases"),
        packed.shape[1],
    )
    return views, n, k


def _padded(k: int, lanes: int) -> int:
    """Length of a row of k values in field order with qjit.FIELD_PAD values after
    each of its `lanes` fields."""
    return k + lanes * qjit.FIELD_PAD


def _quantized_bytes(q: Quantized, rows: int) -> int:
    """Bytes of `rows` of q's rows: packed integers, scales and biases."""
    return rows * (q.packed.shape[1] * 4 + 4 * q.scales.shape[1])


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
    return _flat_rows(w, _BITS_DTYPE[w.dtype], "w")


def _flat_rows(a: np.ndarray, dtype, name: str) -> tuple[np.ndarray, int]:
    """A read-only 1-D view of a 2-D array's rows as `dtype` (same itemsize) and the
    row stride in elements, or ValueError if its rows are not contiguous or
    overlap."""
    n, k = a.shape
    size = a.itemsize
    row_stride = a.strides[0] // size if n > 1 else k
    rows_contiguous = k < 2 or a.strides[1] == size
    rows_apart = n < 2 or (a.strides[0] % size == 0 and row_stride >= k)
    if a.size and not (rows_contiguous and rows_apart):
        raise ValueError(
            f"{name}'s rows must be contiguous and not overlap: strides {a.strides} "
            f"for shape {a.shape} and itemsize {size} "
            f"(pass np.ascontiguousarray({name}))"
        )
    if a.flags.c_contiguous:  # 4 us less than as_strided, per array and call
        flat = a.view(dtype).reshape(-1)
        flat.flags.writeable = False
        return flat, row_stride
    span = (n - 1) * row_stride + k if n and k else 0
    flat = np.lib.stride_tricks.as_strided(
        a.view(dtype), shape=(span,), strides=(size,), writeable=False
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
