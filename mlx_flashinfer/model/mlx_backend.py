"""The Backend API over MLX arrays (Metal on Apple silicon, CPU elsewhere).

Same names as `fallback_numpy.backend`; the tests hold the two to 1e-4 in float32.
Weights are held as the layout stores them (float16, bfloat16, float32) and multiplied
natively at that precision, as mlx-lm does; activations stay float32 between the
matrix products.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np

from ..formats.quantize import Quantized

name = "mlx"
# MLX ops stay on the thread that runs the model (its streams are per thread)
OPS_ON_ANY_THREAD = False


def array(values) -> mx.array:
    """A float32 backend array from NumPy data (or nested lists)."""
    return mx.array(np.asarray(values, dtype=np.float32))


def to_numpy(x) -> np.ndarray:
    return np.array(x.astype(mx.float32), copy=False)


HELD = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "uint32": mx.uint32,  # packed integers of quantized rows
}


def weight(values) -> mx.array:
    """A (out, in) matrix held for `linear`, in the form it is stored (float16,
    bfloat16 given as its uint16 bits, float32; a `Quantized` of NumPy arrays as
    one of MLX arrays); other floats become float32.

    Held as (out, in), as mlx-lm does. (Float32 weights were once held transposed,
    for MLX's Linux CPU BLAS: x @ w 1.8x faster than x @ w.T at 4096 x 4096; at 16
    bits x @ w.T is the faster one there too, 22 against 26 ms for float16.)"""
    if isinstance(values, Quantized):
        return replace(
            values,
            **{k: weight(getattr(values, k)) for k in ("packed", "scales", "biases")},
        )
    # contiguous first: MLX copies a strided view's whole underlying buffer
    # (measured: part 0 of (n, 3, d) bundles held all three parts)
    values = np.ascontiguousarray(values)
    if values.dtype == np.uint16:
        out = mx.array(values).view(mx.bfloat16)
    elif values.dtype in (np.float16, np.float32, np.uint32):
        out = mx.array(values)
    else:
        out = mx.array(values.astype(np.float32))
    mx.eval(out)  # one buffer now, not a pending view of a temporary
    return out


def weight_view(values) -> mx.array:
    """Stored values as a `linear` weight for immediate use (MLX copies them in)."""
    return weight(values)


def weight_rows(w, ids) -> mx.array:
    """Rows `ids` of a matrix held by `weight`, as float32 (embedding lookup)."""
    ids = mx.array(np.asarray(ids, dtype=np.int32))
    if isinstance(w, Quantized):
        rows = [a[ids] for a in (w.packed, w.scales, w.biases)]
        values = mx.dequantize(*rows, group_size=w.group_size, bits=w.bits)
        return values.astype(mx.float32)
    return w[ids].astype(mx.float32)


ALIGNED_FROM = 1 << 16  # bytes from which `zeros` starts its arrays on a page
PAGE = 4096


def zeros(shape: tuple[int, ...], dtype: str = "float32") -> mx.array:
    """A preallocated array of a storage dtype ("float32", "float16", "bfloat16",
    "uint32"); from 64 KiB (caches) starting on a page, so O_DIRECT reads land in
    its rows (`flash/landing.py`) as in NumPy's: MLX's CPU buffers start 16-24
    bytes past a page, so a page-aligned slice of a buffer a page longer, which MLX
    shares (no copy: host_view writes reach it)."""
    kind = HELD[dtype]
    nbytes = int(np.prod(shape)) * kind.size
    if nbytes < ALIGNED_FROM:
        out = mx.zeros(shape, dtype=kind)
    else:
        flat = mx.zeros((nbytes + PAGE,), dtype=mx.uint8)
        mx.eval(flat)
        start = -_address(flat) % PAGE  # 0 where the address is unknown
        out = flat[start : start + nbytes].view(kind).reshape(shape)
    mx.eval(out)  # a real buffer now, so later row writes can update it in place
    return out


def _address(a: mx.array) -> int:
    """Where an evaluated array's memory starts, as the host sees it (0: unknown)."""
    try:
        return np.frombuffer(memoryview(a), dtype=np.uint8).ctypes.data
    except (TypeError, ValueError, BufferError):
        return 0


def host_view(a) -> np.ndarray | None:
    """A writable NumPy view of the memory of an evaluated array made by `zeros`, so
    flash reads land in it without a copy (unified memory on Apple silicon); None
    where MLX does not share it (then rows are copied in with `write_rows`).

    Safe only while no pending graph reads the array: the flash FFN writes a layer's
    rows after that layer's previous computation was evaluated and before its next
    one is built, and evaluates what reads its scratch rows before reading into
    them again.
    """
    mx.eval(a)
    kinds = {mx.float32: np.float32, mx.float16: np.float16, mx.uint32: np.uint32}
    kind = kinds.get(a.dtype, np.uint16)
    if a.size == 0:
        return np.zeros(a.shape, kind)  # nothing to share
    try:
        view = np.frombuffer(memoryview(a), dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        return None
    itemsize = a.dtype.size
    if view.nbytes != a.size * itemsize or not view.flags.writeable:
        return None
    view = view.view(kind).reshape(a.shape)
    # shared, not a copy: a value written here must be what MLX reads
    flat = view.reshape(-1)
    old = flat[0].copy()
    flat[0] = 0x3F80 if kind is np.uint16 else 1  # 1.0 (as bfloat16 bits)
    shared = a.reshape(-1)[0].item() == 1
    flat[0] = old
    return view if shared else None


def synchronize(x=None) -> None:
    """Finish pending (lazy) work; used around timings."""
    if x is not None:
        mx.eval(x)
    mx.synchronize()


def take_rows(table, ids) -> mx.array:
    return table[mx.array(np.asarray(ids, dtype=np.int32))]


def each(fn, items) -> list:
    """[fn(item) for item in items]: MLX builds the graph here and runs it at the
    next sync, spreading the work itself."""
    return [fn(item) for item in items]


def linear(x, w, bias=None):
    """x @ w.T (+ bias), float32, for x (T, in) and a weight w (out, in) held by
    `weight` (or a view of cached rows); at 16 bits x is cast to w's dtype, as
    MLX multiplies like with like (a float32 x would make it widen all of w). A
    `Quantized` w is multiplied packed (`mx.quantized_matmul`), never widened."""
    if isinstance(w, Quantized):
        y = _quantized_linear(x, w)
        return y if bias is None else y + bias
    if w.dtype == mx.float32:
        return x @ w.T if bias is None else mx.addmm(bias, x, w.T)
    y = (x.astype(w.dtype) @ w.T).astype(mx.float32)
    return y if bias is None else y + bias


# MLX's CPU quantized matmul at float16 is a slow path that also accumulates coarsely
# (a 1536 x 576 q4 GEMV, mlx 0.32 cpu: float16 23.7 ms with 0.7% error, float32 0.56
# ms, exact to 1e-6), and at float32 it costs the same per row for any T (no
# batching), so on the CPU quantized products run in float32: a few rows through
# `quantized_matmul`, more rows by dequantizing blocks of weight rows (never the
# whole matrix) for the float32 matmul. Metal multiplies float16 as mlx-lm does.
QMM_MAX_T = 4
DEQUANT_BLOCK_BYTES = 4 << 20  # float32 bytes of weight rows dequantized at a time


def _quantized_linear(x, w: Quantized):
    if mx.default_device().type != mx.DeviceType.cpu:
        y = mx.quantized_matmul(
            x.astype(w.scales.dtype),
            w.packed,
            w.scales,
            w.biases,
            transpose=w.transpose,
            group_size=w.group_size,
            bits=w.bits,
        )
        return y.astype(mx.float32)
    scales, biases = w.scales.astype(mx.float32), w.biases.astype(mx.float32)
    if x.shape[0] <= QMM_MAX_T:
        return mx.quantized_matmul(
            x,
            w.packed,
            scales,
            biases,
            transpose=w.transpose,
            group_size=w.group_size,
            bits=w.bits,
        )
    rows, k = w.packed.shape[0], w.packed.shape[1] * 32 // w.bits
    step = max(1, DEQUANT_BLOCK_BYTES // (4 * k))
    out = None
    pieces = []
    for r in range(0, rows, step):
        block = mx.dequantize(
            w.packed[r : r + step],
            scales[r : r + step],
            biases[r : r + step],
            group_size=w.group_size,
            bits=w.bits,
        )
        if w.transpose:  # rows are outputs: one block of output columns
            pieces.append(x @ block.T)
        else:  # rows are inputs: a partial sum
            part = x[:, r : r + step] @ block
            out = part if out is None else out + part
    return mx.concatenate(pieces, axis=1) if w.transpose else out


def rms_norm(x, weight, eps: float):
    return mx.fast.rms_norm(x, weight, eps)


def layer_norm(x, weight, bias, eps: float):
    return mx.fast.layer_norm(x, weight, bias, eps)


def rope(x, offset: int, inv_freq: np.ndarray):
    """Rotary embedding, "rotate half" convention; x: (heads, T, head_dim), its
    first 2 len(inv_freq) dims rotated."""
    periods = mx.array(
        (1.0 / np.asarray(inv_freq, dtype=np.float64)).astype(np.float32)
    )
    return mx.fast.rope(
        x[None],
        2 * len(periods),
        traditional=False,
        base=None,
        scale=1.0,
        offset=offset,
        freqs=periods,
    )[0]


def attention(q, k, v, scale: float, offset: int, softcap=None, window=None):
    """Causal grouped-query attention; q (H, T, hd), k/v (KVH, offset+T, hd);
    softcap and window as in the NumPy backend."""
    if softcap:  # the fused kernel has no soft cap: scores computed here
        return _softcapped_attention(q, k, v, scale, offset, softcap, window)
    mask = "causal" if q.shape[1] > 1 else None
    if window:
        mask = _window_mask(q.shape[1], k.shape[1], offset, window)
    return mx.fast.scaled_dot_product_attention(
        q[None], k[None], v[None], scale=scale, mask=mask
    )[0]


def _window_mask(t: int, s: int, offset: int, window: int | None) -> mx.array:
    """Bool (T, S): query offset + i sees key j <= offset + i (within `window`)."""
    keys = np.arange(s)[None, :]
    queries = np.arange(offset, offset + t)[:, None]
    seen = keys <= queries
    if window:
        seen &= keys > queries - window
    return mx.array(seen)


def _softcapped_attention(q, k, v, scale, offset, softcap, window):
    heads, t, hd = q.shape
    kv_heads = k.shape[0]
    qg = q.reshape(kv_heads, heads // kv_heads * t, hd)
    scores = mx.tanh((qg @ k.transpose(0, 2, 1)) * (scale / softcap)) * softcap
    scores = scores.reshape(kv_heads, heads // kv_heads, t, -1)
    seen = _window_mask(t, k.shape[1], offset, window)
    scores = mx.where(seen, scores, -mx.inf)
    weights = mx.softmax(scores, axis=-1, precise=True)
    out = weights.reshape(kv_heads, heads // kv_heads * t, -1) @ v
    return out.reshape(heads, t, hd)


def relu(x):
    return mx.maximum(x, 0)


def silu(x):
    return x * mx.sigmoid(x)


def gelu_tanh(x):
    """GELU, tanh approximation (PyTorch's approximate="tanh"; Gemma's GeGLU)."""
    inner = np.float32(np.sqrt(2 / np.pi)) * (x + 0.044715 * x * x * x)
    return 0.5 * x * (1 + mx.tanh(inner))


def tanh(x):
    return mx.tanh(x)


def sigmoid(x):
    return mx.sigmoid(x)


def above(x, threshold: float):
    """x where x > threshold, else 0 (FATReLU)."""
    return mx.where(x > threshold, x, 0)


# -- the neuron cache: a preallocated (capacity, bundle) matrix updated in place -------


def tune_products(limits: dict) -> dict:
    """Nothing to tune: MLX chooses its own kernels (the NumPy backend's limits)."""
    return {}


def path_limit(dtype: str) -> int | None:
    """None: MLX's kernels have no step the probe should measure on both sides."""
    return None


def limit_compute_threads(threads: int | None) -> None:
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
    """(n, d) neuron rows (gate/up/fc1) as a `linear` weight mapping d -> n (as is)."""
    return rows


def columns_weight(columns):
    """(n, d) neuron columns (down/fc2) as a `linear` weight mapping n -> d (a view)."""
    if isinstance(columns, Quantized):
        return replace(columns, transpose=False)
    return columns.T
