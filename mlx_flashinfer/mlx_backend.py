"""The Backend API over MLX arrays (Metal on Apple silicon, CPU elsewhere).

Same names as `fallback_numpy.backend`; the tests hold the two to 1e-4 in float32.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

name = "mlx"


def array(values) -> mx.array:
    """A float32 backend array from NumPy data (or nested lists)."""
    return mx.array(np.asarray(values, dtype=np.float32))


def to_numpy(x) -> np.ndarray:
    return np.array(x.astype(mx.float32), copy=False)


def weight(values) -> mx.array:
    """A (out, in) matrix prepared for `linear`: stored transposed, because MLX's CPU
    matmul is 2.5x faster on x @ w than on x @ w.T (measured; Metal does not care)."""
    return mx.array(np.ascontiguousarray(np.asarray(values, dtype=np.float32).T))


def weight_rows(w, ids) -> mx.array:
    """Rows `ids` of the (out, in) matrix prepared by `weight` (embedding lookup)."""
    return w[:, mx.array(np.asarray(ids, dtype=np.int32))].T


def zeros(shape: tuple[int, ...]) -> mx.array:
    out = mx.zeros(shape, dtype=mx.float32)
    mx.eval(out)  # a real buffer now, so later row writes can update it in place
    return out


def synchronize(x=None) -> None:
    """Finish pending (lazy) work; used around timings."""
    if x is not None:
        mx.eval(x)
    mx.synchronize()


def take_rows(table, ids) -> mx.array:
    return table[mx.array(np.asarray(ids, dtype=np.int32))]


def linear(x, w, bias=None):
    """x @ W.T (+ bias) for a W prepared by `weight` (held as W.T)."""
    return x @ w if bias is None else mx.addmm(bias, x, w)


def rms_norm(x, weight, eps: float):
    return mx.fast.rms_norm(x, weight, eps)


def layer_norm(x, weight, bias, eps: float):
    return mx.fast.layer_norm(x, weight, bias, eps)


def rope(x, offset: int, inv_freq: np.ndarray):
    """Rotary embedding, "rotate half" convention; x: (heads, T, head_dim)."""
    periods = mx.array(
        (1.0 / np.asarray(inv_freq, dtype=np.float64)).astype(np.float32)
    )
    return mx.fast.rope(
        x[None],
        x.shape[-1],
        traditional=False,
        base=None,
        scale=1.0,
        offset=offset,
        freqs=periods,
    )[0]


def attention(q, k, v, scale: float, offset: int):
    """Causal grouped-query attention; q (H, T, hd), k/v (KVH, offset+T, hd)."""
    mask = "causal" if q.shape[1] > 1 else None
    return mx.fast.scaled_dot_product_attention(
        q[None], k[None], v[None], scale=scale, mask=mask
    )[0]


def relu(x):
    return mx.maximum(x, 0)


def silu(x):
    return x * mx.sigmoid(x)


def above(x, threshold: float):
    """x where x > threshold, else 0 (FATReLU)."""
    return mx.where(x > threshold, x, 0)


# -- the neuron cache: a preallocated (capacity, bundle) matrix updated in place -------


def limit_compute_threads(threads: int) -> None:
    """Nothing to cap: MLX schedules its own CPU work."""


def write_rows(matrix, slots, rows):
    """matrix[slots] = rows; returns the matrix (a scatter MLX does in place when the
    matrix has no other reference, which the caller ensures by evaluating each
    token)."""
    matrix[mx.array(np.asarray(slots, dtype=np.int32))] = rows
    return matrix


def move_rows(matrix, src, dst):
    """matrix[dst] = matrix[src] (disjoint slot sets); returns the matrix.

    The moved rows are evaluated first: a gather and a scatter on the same matrix in one
    graph make MLX copy the whole matrix (measured: 45 ms per token at 442 MB, against
    0.25 ms this way; benchmarks/cache_update.py).
    """
    rows = matrix[mx.array(np.asarray(src, dtype=np.int32))]
    mx.eval(rows)
    matrix[mx.array(np.asarray(dst, dtype=np.int32))] = rows
    return matrix


def rows_weight(rows):
    """(n, d) neuron rows (gate/up/fc1) as a `linear` weight mapping d -> n (a view)."""
    return rows.T


def columns_weight(columns):
    """(n, d) neuron columns (down/fc2) as a `linear` weight mapping n -> d (as is)."""
    return columns
