"""Matmuls over weights kept at their stored precision, accumulated in float32: float16
or bfloat16 (passed as uint16 bit patterns) or float32 rows, and quantized rows
(`mlx_flashinfer.formats.quantize.Quantized`: 4- or 8-bit integers, a float16 scale
and bias per group).

`matmul_t(x, w)` is x @ w.T (projections whose weight rows are the outputs);
`matmul(x, w)` is x @ w (the FFN down projection over neuron rows, skipping the zeros
of x); `widen(w)` is the exact float32 copy. `qmatmul_t(x, q)`, `qmatmul(x, q)` and
`dequantize(q)` are the same for quantized weights. A weight may be a strided view of
stored bundles: its rows must be contiguous, the row stride is free.

Small T (decode) runs compiled loops (numba) that read each weight once and widen or
unpack it in registers, on a few worker threads (`_workers.py`); large T (prefill)
widens blocks of rows into a reused float32 buffer and hands each block to NumPy's
BLAS. One dispatcher (`_dispatch.py`) chooses the path and cuts the work for both
kinds of weights; this module holds what differs, a `Family` each: the checks and
views of the weights, the thresholds between the paths, and the loops (16-bit:
`_kernels_jit.py`; quantized: `_qkernels_jit.py`, `_qsums_jit.py`).
"""

from __future__ import annotations

import numpy as np

from fallback_numpy import _dispatch, _workers
from fallback_numpy import _kernels_jit as jit
from fallback_numpy import _qkernels_jit as qjit
from fallback_numpy import _qsums_jit as qsums
from fallback_numpy._dispatch import Family, Weights, buffer, get_threads, set_threads
from mlx_flashinfer.formats.quantize import BITS, GROUP_SIZES, Quantized, check_format

__all__ = [
    "dequantize",
    "each",
    "get_threads",
    "matmul",
    "matmul_t",
    "qmatmul",
    "qmatmul_t",
    "set_threads",
    "widen",
]

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


def each(fn, items) -> list:
    """[fn(item) for item in items], the items shared by the kernels' threads as one
    job: for independent products each too small to split (a decoded token's
    experts, each under the matrix size worth waking a worker for), whose kernels
    then run side by side. fn runs its own kernels on its thread alone, and must not
    depend on the order the items run in.
    """
    return _workers.run(fn, [(item,) for item in items], get_threads())


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
    return _dispatch.matmul_t(FLOAT_ROWS, x, w, out, DOT_ROWS_MAX_T)


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
    return _dispatch.matmul(FLOAT_ROWS, x, w, out, SUM_ROWS_MAX_TERMS)


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
    return _dispatch.widen(FLOAT_ROWS, w, out)


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
    return _dispatch.matmul_t(QUANTIZED_ROWS, x, q, out, QDOT_ROWS_MAX_T)


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
    return _dispatch.matmul(QUANTIZED_ROWS, x, q, out, QSUM_ROWS_MAX_TERMS)


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
    return _dispatch.widen(QUANTIZED_ROWS, q, out)


# -- float32, float16 and bfloat16 rows ------------------------------------------

_BITS_DTYPE = {  # the loops tell the kinds apart by the dtype of the bits view
    np.dtype(np.uint16): np.dtype(np.uint16),  # bfloat16 bit patterns
    np.dtype(np.float16): np.dtype(np.int16),  # float16, as its bits
    np.dtype(np.float32): np.dtype(np.float32),
}


def _float_rows(w: np.ndarray) -> Weights:
    """w as the loops of `_kernels_jit.py` take it: a read-only 1-D view over its
    rows, as the dtype they dispatch on, its row stride in elements (row j is
    flat[j * stride : j * stride + k]) and k."""
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise ValueError(f"w must be a 2-D NumPy array, got {type(w).__name__}")
    if w.dtype not in _BITS_DTYPE:
        raise ValueError(
            f"w.dtype must be float32, float16 or uint16 (bfloat16 bits), got {w.dtype}"
        )
    flat, row_stride = _flat_rows(w, _BITS_DTYPE[w.dtype], "w")
    n, k = w.shape
    return Weights(  # by position: keywords cost 0.4 us a call
        (flat, row_stride, k),  # args
        n,
        k,
        w.itemsize * k,  # row_bytes
        (w,),  # arrays
        (k,),  # sum_widths
        w,  # stored
        w if w.dtype == np.float32 else None,  # blas_ready
    )


def _x_as_given(x: np.ndarray, weights: Weights, loops: bool) -> tuple[np.ndarray]:
    return (x,)


FLOAT_ROWS = Family(
    name="w",
    view=_float_rows,
    dot_inputs=_x_as_given,
    dot_rows=jit.dot_rows,
    widen_rows=jit.widen_rows,
    sum_rows=jit.sum_rows,
    reorder=None,
)


# -- quantized rows ----------------------------------------------------------------


def _quantized_rows(q: Quantized) -> Weights:
    """q's arrays as the loops of `_qkernels_jit.py` take them, ((packed, its row
    stride, scales (int16 bits), row stride, biases, row stride, words per row),
    bits, words per group); ValueError naming the first field that does not fit."""
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
    groups = k // q.group_size
    return Weights(  # by position, as in _float_rows
        (views, q.bits, q.group_size * q.bits // 32),  # args
        n,
        k,
        packed.shape[1] * 4 + 4 * groups,  # row_bytes
        (packed, scales, biases),  # arrays
        # sum_widths: the sums in field order, padded, and the bias terms per group
        (k + 32 // q.bits * qjit.FIELD_PAD, groups),
        q,  # stored
    )


def _x_in_field_order(x: np.ndarray, weights: Weights, loops: bool) -> tuple:
    """x in field order (padded for the loops, see qjit.FIELD_PAD), as the loops read
    q's rows and BLAS gets them dequantized (the dot products are the same), and the
    sums of x per group (what the biases multiply)."""
    q, T, k = weights.stored, len(x), weights.k
    lanes = 32 // q.bits
    x_fields = buffer("x_fields", T, _padded(k, lanes) if loops else k)
    x_sums = buffer("x_sums", T, k // q.group_size)
    qjit.fields_and_sums(x, lanes, q.group_size, x_fields, x_sums)
    return x_fields, x_sums


def _from_field_order(sums: tuple, out: np.ndarray, q: Quantized) -> None:
    """out from rows in field order and, from the sum loops, the terms of the biases
    per group (BLAS blocks and dequantized rows carry their biases already)."""
    if len(sums) == 2:
        fields, bias_sums = sums
        qjit.from_fields(fields, bias_sums, 32 // q.bits, q.group_size, out)
        return
    no_biases = np.zeros((len(out), 1), np.float32)  # one "group" of k: nothing
    qjit.from_fields(sums[0], no_biases, 32 // q.bits, out.shape[1], out)


def _padded(k: int, lanes: int) -> int:
    """Length of a row of k values in field order with qjit.FIELD_PAD values after
    each of its `lanes` fields."""
    return k + lanes * qjit.FIELD_PAD


QUANTIZED_ROWS = Family(
    name="q",
    view=_quantized_rows,
    dot_inputs=_x_in_field_order,
    dot_rows=qjit.dot_rows,
    widen_rows=qjit.dequantize_rows,
    sum_rows=qsums.sum_rows,
    reorder=_from_field_order,
)


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
