"""The one dispatcher behind `kernels.py`'s matmuls, for every kind of stored weights:
which path a call takes, how its work is cut into parts for the worker threads, and
the float32 buffers it reuses. A kind of weights (16-bit or quantized, in
`kernels.py`) brings only what differs, as a `Family`: how its weights are checked
and viewed, and its compiled loops.

x @ w.T (`matmul_t`): up to `max_t` rows of x, the family's dot loops read each
weight row once for all of them, the rows cut into parts of about PART_BYTES that
worker threads share (`_workers.py`); more rows of x, blocks of weight rows are
widened into a float32 buffer and handed to NumPy's BLAS.

x @ w (`matmul`): only the rows j of w where some x[t, j] != 0 are read. Up to
`max_terms` nonzero terms per such row on average, the family's sum loops add
x[t, j] * w[j] over ranges of rows, each range into its own buffers, added up in
range order; more, BLAS over widened blocks. The ranges depend on the size alone,
so no result depends on the thread count.

`widen`: every row as float32, in parts.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np

from fallback_numpy import _workers
from fallback_numpy._kernels_jit import nonzero_columns

# Bytes of the float32 block that the large-T paths widen and hand to BLAS (the sweep
# behind kernels.py's thresholds, `python benchmarks/kernels.py --sweep --threads 1`
# on AMD EPYC Zen 5: float16 4096 x 4096, ms per matrix for 0.5 / 1 / 2 / 4 / 8 MB:
# T=16 10.1 / 8.6 / 8.0 / 7.9 / 8.0, T=128 42.1 / 39.3 / 38.7 / 38.4 / 39.7, T=512
# 174 / 164 / 153 / 148 / 144).
BLOCK_BYTES = 4 << 20

# Jobs that read fewer weight bytes run on the calling thread alone, larger ones in
# parts of about PART_BYTES shared by the threads. Waking a worker takes 40-55 us
# here, what one core needs for ~2 MB: float16 GEMV, us per matrix on 1 / 2 threads,
# 2 MB 73 / 92, 4 MB 148 / 171, 8 MB 257 / 226, 16 MB 571 / 433.
PARALLEL_MIN_BYTES = 8 << 20
PART_BYTES = 4 << 20
SUM_PARTS_MAX = 8  # x @ w: each part sums into its own (T, k) buffers

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


class Weights(NamedTuple):
    """One weight matrix, checked, as a family's `view` hands it over.

    args: what the family's loops take after x's arrays (views of the stored rows).
    n, k: rows, and values per row.
    row_bytes: bytes the loops read per row, by which the work is cut into parts.
    arrays: the stored arrays, which out must not overlap.
    sum_widths: widths of the (T, width) arrays that the family's sum_rows adds into.
    stored: the weights as the caller passed them, for the family's own functions.
    blas_ready: the weights themselves where BLAS reads them as stored (float32).
    """

    args: tuple
    n: int
    k: int
    row_bytes: int
    arrays: tuple
    sum_widths: tuple
    stored: Any
    blas_ready: np.ndarray | None = None


@dataclass(frozen=True)
class Family:
    """What one kind of stored weights brings to the dispatcher, in order of use.

    The compiled loops take x's arrays first, then `Weights.args`, then their part
    and outputs. Each does one part (a range of rows) so that threads can share the
    work, and releases the GIL.

    name: the weights argument in error messages ("w", "q").
    view: weights -> `Weights`, or ValueError naming the field that does not fit.
    dot_inputs: (x, weights, loops) -> x as dot_rows reads it (loops True), or as
        BLAS reads it, in [0] (loops False).
    dot_rows: (*inputs, *args, lo, hi, out): out[t, j] = x[t] . w[j], lo <= j < hi.
    widen_rows: (*args, rows, lo, hi, block): block[r] = w[rows[r]] as float32 for
        lo <= r < hi, in the order of dot_inputs' x. Returns how many values are inf
        or nan, for which x @ w leaves BLAS for the sum loops (None: not counted; a
        family with a reorder must not count them, its BLAS sums being narrower
        than its loops').
    sum_rows: (x, *args, rows, *sums): sums[t] += x[t, j] * w[j] for j in rows
        where x[t, j] != 0, sums as wide as Weights.sum_widths.
    reorder: None where the loops keep rows in out's order (x @ w then sums straight
        into out); else (sums, out, stored) -> out from what the loops or BLAS left
        in their order: sum_rows' sums, or one array of rows.
    """

    name: str
    view: Callable[[Any], Weights]
    dot_inputs: Callable[[np.ndarray, Weights, bool], tuple]
    dot_rows: Callable[..., None]
    widen_rows: Callable[..., Any]
    sum_rows: Callable[..., None]
    reorder: Callable[[tuple, np.ndarray, Any], None] | None


def matmul_t(
    family: Family, x: np.ndarray, w: Any, out: np.ndarray | None, max_t: int
) -> np.ndarray:
    """x @ w.T in float32 for weights w of `family` (`kernels.matmul_t` and
    `qmatmul_t` give the arguments): its dot loops for up to `max_t` rows of x, else
    BLAS. ValueError for a w, x or out that does not fit."""
    weights = family.view(w)
    n, k = weights.n, weights.k
    x = _activations(x, k, f"k = {family.name}.shape[1]")
    out = _output(out, (len(x), n), x, *weights.arrays)
    if weights.blas_ready is not None:
        with _quiet():
            return np.matmul(x, weights.blas_ready.T, out=out)
    if out.size == 0 or k == 0:
        out.fill(0)
        return out
    loops = len(x) <= max_t
    inputs = family.dot_inputs(x, weights, loops)
    if loops:
        parts = _ranges(n, _part_count(weights.row_bytes * n, len(x)))
        jobs = [(*inputs, *weights.args, lo, hi, out) for lo, hi in parts]
        _run(family.dot_rows, jobs)
        return out
    # Blocks widen on this thread alone while BLAS uses its threads: 2 threads,
    # float16 4096 x 4096 at T=16, 5.4 ms against 5.8 ms with the widening split too
    # (float32 BLAS: 5.1 ms); fewer hand-offs between the two thread pools.
    block = buffer("block", _block_rows(n, k), k)
    with _quiet():
        for j0 in range(0, n, len(block)):
            rows = np.arange(j0, min(n, j0 + len(block)))
            family.widen_rows(*weights.args, rows, 0, len(rows), block)
            np.matmul(inputs[0], block[: len(rows)].T, out=out[:, j0 : j0 + len(rows)])
    return out


def matmul(
    family: Family, x: np.ndarray, w: Any, out: np.ndarray | None, max_terms: int
) -> np.ndarray:
    """x @ w in float32 for weights w of `family` (`kernels.matmul`, `qmatmul`),
    reading only the rows of w where x has nonzeros: its sum loops for up to
    `max_terms` nonzero terms per row read, on average, else BLAS. ValueError for a
    w, x or out that does not fit."""
    weights = family.view(w)
    n, k = weights.n, weights.k
    x = _activations(x, n, f"n = {family.name}.shape[0]")
    out = _output(out, (len(x), k), x, *weights.arrays)
    if out.size == 0 or n == 0:
        out.fill(0)
        return out
    rows, terms = nonzero_columns(x)
    if len(rows) == 0:
        out.fill(0)
        return out
    if terms <= max_terms * len(rows):
        sums = _zeroed(family, out, weights.sum_widths)
        _sum_rows(family, x, weights, rows, sums)
    else:
        sums = _zeroed(family, out, (k,))
        _blas_sums(family, x, weights, rows, sums)
    if family.reorder is not None:
        family.reorder(sums, out, weights.stored)
    return out


def widen(family: Family, w: Any, out: np.ndarray | None) -> np.ndarray:
    """Every row of w, weights of `family`, as float32 (`kernels.widen`,
    `dequantize`), in parts shared by the threads. ValueError for a w or out that
    does not fit."""
    weights = family.view(w)
    n, k = weights.n, weights.k
    out = _output(out, (n, k), *weights.arrays)
    if out.size == 0:
        return out
    widened = out if family.reorder is None else np.empty((n, k), np.float32)
    rows = np.arange(n)
    parts = _ranges(n, _part_count(weights.row_bytes * n))
    jobs = [(*weights.args, rows, lo, hi, widened) for lo, hi in parts]
    _run(family.widen_rows, jobs)
    if family.reorder is not None:
        family.reorder((widened,), out, weights.stored)
    return out


def _zeroed(family: Family, out: np.ndarray, widths: tuple) -> tuple:
    """Zeroed (T, width) arrays for the sums of x @ w: out itself where the family's
    loops keep rows in out's order."""
    if family.reorder is None:
        out.fill(0)
        return (out,)
    sums = tuple(buffer(f"sums{i}", len(out), width) for i, width in enumerate(widths))
    for s in sums:
        s.fill(0)
    return sums


def _sum_rows(family: Family, x: np.ndarray, w: Weights, rows, sums: tuple) -> None:
    """sums += the terms x[t, j] * w[j] of the rows j in rows, x[t, j] != 0.

    The threads take ranges of rows, each row read whole in one stream, into buffers
    of their own per range, added up in range order: the ranges depend on the size
    only, so the result does not depend on the thread count. (Ranges of columns
    instead cut every row in pieces: dense float16 at T=1 on 2 threads, 11008 x
    4096, ran 3.9 ms against 2.8 ms on one.)
    """
    work = w.row_bytes * len(rows)
    count = 1 if work < PARALLEL_MIN_BYTES else -(-work // PART_BYTES)
    parts = _ranges(len(rows), min(count, SUM_PARTS_MAX))
    if len(parts) == 1:
        family.sum_rows(x, *w.args, rows, *sums)
        return
    T = len(x)
    own = [
        buffer(f"parts{i}", len(parts) * T, s.shape[1]).reshape(len(parts), T, -1)
        for i, s in enumerate(sums)
    ]
    for o in own:
        o.fill(0)
    jobs = [
        (x, *w.args, rows[lo:hi], *(o[p] for o in own))
        for p, (lo, hi) in enumerate(parts)
    ]
    _workers.run(family.sum_rows, jobs, _threads)
    with _quiet():
        for total, o in zip(sums, own, strict=True):
            total += o.sum(axis=0)


def _blas_sums(family: Family, x: np.ndarray, w: Weights, rows, sums: tuple) -> None:
    """sums[0] += x[:, rows] @ w[rows], by blocks of rows widened for BLAS."""
    total = sums[0]
    block = buffer("block", _block_rows(len(rows), w.k), w.k)
    partial = buffer("partial", len(x), w.k)
    dense = len(rows) == w.n  # then rows[a:b] == a..b-1: x columns by slicing
    with _quiet():
        for r0 in range(0, len(rows), len(block)):
            part = rows[r0 : r0 + len(block)]
            if family.widen_rows(*w.args, part, 0, len(part), block):
                # inf/nan weights: BLAS would turn their zero x terms into nan
                _sum_rows(family, x, w, part, sums)
                continue
            xs = x[:, r0 : r0 + len(part)] if dense else x[:, part]
            np.matmul(xs, block[: len(part)], out=partial)
            total += partial


def _run(kernel: Callable, jobs: list[tuple]) -> list:
    if len(jobs) == 1:  # the small matrices of small models: 1-2 us a call
        return [kernel(*jobs[0])]
    return _workers.run(kernel, jobs, _threads)


def _part_count(work_bytes: int, tokens: int = 1) -> int:
    """1 on one thread or for a job under PARALLEL_MIN_BYTES of weights times
    `tokens` (each weight byte serves every token: q4 2048 x 2048 at 8 tokens, 2.4
    MB, 1.5 against 2.2 GB/s on one thread here), else parts of about PART_BYTES
    of weights, at least one per thread."""
    if _threads == 1 or work_bytes * tokens < PARALLEL_MIN_BYTES:
        return 1
    return max(_threads, -(-work_bytes // PART_BYTES))


def _ranges(length: int, count: int) -> list[tuple[int, int]]:
    """range(length) cut into up to `count` [lo, hi) ranges of about equal length."""
    count = max(1, min(count, length))
    bounds = [length * p // count for p in range(count)] + [length]
    return [(lo, hi) for lo, hi in pairwise(bounds) if hi > lo]


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


def buffer(name: str, rows: int, k: int) -> np.ndarray:
    """A reused (rows, k) float32 array, grown when too small, kept per thread.

    Args:
        name: which of the calling thread's buffers.
        rows: rows wanted.
        k: values per row.

    Returns:
        A (rows, k) view of the buffer; its values are whatever was left there.
    """
    kept = _buffers.__dict__.get(name)
    if kept is None or kept.size < rows * k:
        kept = np.empty(rows * k, np.float32)
        setattr(_buffers, name, kept)
    return kept[: rows * k].reshape(rows, k)
