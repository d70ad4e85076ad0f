"""The Backend API over NumPy arrays: the reference every other backend is tested
against.

Weights are held as the layout stores them (float16, bfloat16 as uint16 bits, or
float32), never widened whole: `linear` multiplies 16-bit matrices with the compiled
kernels of `fallback_numpy/kernels.py`, accumulating in float32. Activations are
float32. A weight matrix is (out, in) as in the checkpoints and goes through `weight`
once at load; `linear(x, w)` is x @ w.T. The MLX backend
(`mlx_flashinfer/model/mlx_backend.py`) has the same names.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import replace

import numpy as np

from fallback_numpy import kernels
from mlx_flashinfer.formats.quantize import Quantized

name = "numpy"
# NumPy releases the GIL in its products: they may run on a second thread
# (the reads ahead guess there, beside the FFN)
OPS_ON_ANY_THREAD = True
# what each storage dtype is held as: bfloat16 as its bits (NumPy has no bfloat16);
# uint32 the packed integers of quantized rows
HELD = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.uint16,
    "uint32": np.uint32,
}


def array(values) -> np.ndarray:
    """A float32 backend array from NumPy data (or nested lists)."""
    return np.ascontiguousarray(values, dtype=np.float32)


def to_numpy(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def weight(values) -> np.ndarray:
    """A (out, in) matrix held for `linear`, in the form it is stored (float16,
    bfloat16 bits as uint16, float32, or a `Quantized`); other floats become
    float32."""
    if isinstance(values, Quantized):
        fields = ("packed", "scales", "biases")
        return replace(
            values, **{k: np.ascontiguousarray(getattr(values, k)) for k in fields}
        )
    values = np.asarray(values)
    if values.dtype.type not in (np.float16, np.uint16, np.float32):
        values = values.astype(np.float32)
    return np.ascontiguousarray(values)


def weight_view(values) -> np.ndarray:
    """Stored values (rows contiguous, any row stride) as a `linear` weight for
    immediate use: computed on where they are, no copy."""
    return values


def weight_rows(w, ids) -> np.ndarray:
    """Rows `ids` of a matrix held by `weight` or of a Quantized one, as float32
    (embedding lookup)."""
    ids = np.asarray(ids)
    if isinstance(w, Quantized):
        rows = (w.packed[ids], w.scales[ids], w.biases[ids])
        return kernels.dequantize(Quantized(*rows, w.bits, w.group_size))
    return kernels.widen(w[ids])


ALIGNED_FROM = 1 << 16


def zeros(shape: tuple[int, ...], dtype: str = "float32") -> np.ndarray:
    """A preallocated array of a layout dtype ("float32", "float16", "bfloat16");
    page-aligned from 64 KiB (caches), so O_DIRECT reads can land in its rows
    (`flash/landing.py`), where NumPy's allocator leaves a 16-byte header."""
    kind = np.dtype(HELD[dtype])
    count = int(np.prod(shape))
    if count * kind.itemsize < ALIGNED_FROM:
        out = np.zeros(shape, dtype=kind)
    else:
        pages = mmap.mmap(-1, count * kind.itemsize)  # anonymous: page-aligned
        out = np.frombuffer(pages, dtype=kind, count=count).reshape(shape)
    out.fill(0)  # touch every page: preallocated memory is really held, as planned
    return out


def host_view(a) -> np.ndarray | None:
    """A writable NumPy view of an array made by `zeros`, through which reads land
    in place (NumPy: the array itself)."""
    return a


def synchronize(x=None) -> None:
    """Finish pending work (NumPy is eager: nothing to do); used around timings."""


def take_rows(table, ids) -> np.ndarray:
    """table[ids] for a list/array of row ids (embedding lookup, gathers)."""
    return table[np.asarray(ids)]


def each(fn, items) -> list:
    """[fn(item) for item in items], shared by the compute threads (`kernels.each`):
    independent pieces each too small to split, such as a decoded token's experts."""
    return kernels.each(fn, items)


def linear(x, w, bias=None):
    """x @ w.T (+ bias), float32, for x (T, in) and a weight w (out, in): a matrix
    held by `weight`, or the transposed view of (in, out) columns (see
    `columns_weight`), which the kernels read as they are stored; or a Quantized
    matrix, (out, in) rows if w.transpose else (in, out) rows, read packed."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if isinstance(w, Quantized):
        y = kernels.qmatmul_t(x, w) if w.transpose else kernels.qmatmul(x, w)
        return y if bias is None else y + bias
    rows = w.strides[-1] == w.itemsize or w.shape[-1] == 1
    if w.dtype == np.float32 and (rows or np.count_nonzero(x) > x.size // 4):
        # BLAS; the kernels' checks cost more than they save on dense float32 (8-30
        # us a call at SmolLM2's sizes: dense decode 50 against 58 tok/s)
        y = x @ w.T
    elif rows:
        y = kernels.matmul_t(x, w)
    else:  # columns: the kernel skips the zeros of x (a ReLU's: 10-27x at 3-10%)
        y = kernels.matmul(x, w.T)
    return y if bias is None else y + bias


def rms_norm(x, weight, eps: float):
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * weight


def layer_norm(x, weight, bias, eps: float):
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = np.mean(centered * centered, axis=-1, keepdims=True)
    return centered / np.sqrt(variance + eps) * weight + bias


def rope(x, offset: int, inv_freq: np.ndarray):
    """Rotary embedding, Hugging Face "rotate half" convention.

    x: (heads, T, head_dim), positions offset .. offset+T-1; inv_freq: (rotated/2,),
    rotating the first `rotated` dims of each head (all but with partial rotary).
    """
    positions = np.arange(offset, offset + x.shape[1], dtype=np.float32)
    angles = positions[:, None] * inv_freq[None, :].astype(np.float32)  # (T, hd/2)
    cos = np.cos(angles)
    sin = np.sin(angles)
    half = inv_freq.shape[0]
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def attention(q, k, v, scale: float, offset: int, softcap=None, window=None):
    """Causal grouped-query attention.

    q: (H, T, hd) for positions offset..offset+T-1; k, v: (KVH, offset+T, hd).
    softcap: scores become softcap * tanh(scores / softcap) (Gemma 2); window: a
    query sees only its last `window` keys, itself included (sliding layers).
    Returns (H, T, hd).
    """
    heads, t, hd = q.shape
    groups = heads // k.shape[0]
    qg = q.reshape(k.shape[0], groups * t, hd)  # heads sharing one kv head, batched
    scores = (qg @ k.transpose(0, 2, 1)) * scale  # (KVH, groups*T, S)
    if softcap:
        scores = np.tanh(scores * (1 / softcap)) * softcap
    scores = scores.reshape(k.shape[0], groups, t, -1)
    if t > 1 or window:  # query i sees keys up to offset + i (and past the window)
        keys = np.arange(k.shape[1])
        queries = np.arange(offset, offset + t)
        seen = keys[None, :] <= queries[:, None]
        if window:
            seen &= keys[None, :] > queries[:, None] - window
        scores = np.where(seen, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=-1, keepdims=True)
    out = weights.reshape(k.shape[0], groups * t, -1) @ v
    return out.reshape(heads, t, hd)


def relu(x):
    return np.maximum(x, 0)


def silu(x):
    return x * (0.5 + 0.5 * np.tanh(0.5 * x))  # x * sigmoid(x), without exp overflow


def gelu_tanh(x):
    """GELU, tanh approximation (PyTorch's approximate="tanh"; Gemma's GeGLU)."""
    inner = np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
    return np.float32(0.5) * x * (1 + np.tanh(inner))


def tanh(x):
    return np.tanh(x)


def sigmoid(x):
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # without exp overflow


def above(x, threshold: float):
    """x where x > threshold, else 0 (FATReLU)."""
    return np.where(x > threshold, x, 0).astype(np.float32)


# -- the neuron cache: a preallocated (capacity, bundle) matrix updated in place -------


# The kernels' limits a machine probe may set (`plan/compute_probe.product_limits`):
# products over up to this many tokens run the compiled loops, longer ones BLAS
PATH_LIMITS = ("DOT_ROWS_MAX_T", "QDOT_ROWS_MAX_T")


def tune_products(limits: dict) -> dict:
    """Set the kernels' path limits to this machine's measured ones (PATH_LIMITS;
    others ignored): where the loops and BLAS cross depends on the CPU (the loops
    win to 8 tokens on an AMD EPYC, to 12-32 on an Intel Xeon here). Returns the
    limits they replace."""
    previous = {name: getattr(kernels, name) for name in PATH_LIMITS}
    for name in PATH_LIMITS:
        if name in limits:
            setattr(kernels, name, int(limits[name]))
    return previous


def path_limit(dtype: str) -> int | None:
    """The most tokens a product over stored `dtype` rows runs through the compiled
    loops before BLAS (its rate steps there); None: BLAS at every length."""
    if dtype in ("float16", "bfloat16"):
        return kernels.DOT_ROWS_MAX_T
    if dtype in ("q4", "q8"):
        return kernels.QDOT_ROWS_MAX_T
    return None


def limit_compute_threads(threads: int | None) -> None:
    """Cap BLAS and kernel threads (None: every core this process may use): in
    flash mode the reader's threads need the cores too (measured here, 2 cores:
    flash decode 345 -> 265 ms/token with BLAS on 1 thread)."""
    from threadpoolctl import threadpool_limits

    if threads is None:
        threads = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
    threadpool_limits(limits=threads, user_api="blas")
    kernels.set_threads(threads)


def write_rows(matrix, slots, rows):
    """matrix[slots] = rows, in place; returns the matrix."""
    matrix[np.asarray(slots)] = rows
    return matrix


def move_rows(matrix, src, dst):
    """matrix[dst] = matrix[src] (disjoint slot sets), in place; returns the matrix."""
    matrix[np.asarray(dst)] = matrix[np.asarray(src)]
    return matrix


def rows_weight(rows):
    """(n, d) neuron rows (gate/up/fc1) as a `linear` weight mapping d -> n (a view)."""
    return rows


def columns_weight(columns):
    """(n, d) neuron columns (down/fc2) as a `linear` weight mapping n -> d (a view)."""
    if isinstance(columns, Quantized):
        return replace(columns, transpose=False)
    return columns.T
