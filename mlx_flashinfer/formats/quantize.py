"""Group-wise affine quantization: the format of quantized layouts, in NumPy.

A quantized matrix (rows, k) keeps, per group of `group_size` consecutive values of a
row, a float16 scale and bias, and each value as an unsigned `bits`-bit integer q:

    value = scale * q + bias

The integers are packed little-end first into uint32 words (value j of a row sits in
word j // (32 // bits), at bit (j % (32 // bits)) * bits): the layout of MLX's own
`mx.quantize`, so the MLX backend computes on stored rows with `mx.quantized_matmul`
without repacking, and the NumPy kernels read the same bytes.

GGUF's Q4_0, Q4_1, Q8_0, Q5_0 and Q5_1 blocks (32 values, one float16 scale, Q4_1 and
Q5_1 also a float16 minimum) are this format with group size 32: `from_gguf_blocks`
repacks them without changing a value (Q4_0, Q5_0 and Q8_0 are symmetric: bias =
-scale x offset, exact in float16 since the offset is a power of two). The K-quants'
super-blocks are kquants.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .safetensors_stream import decode

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
QUANTIZED_DTYPES = {"q4": 4, "q8": 8}  # layout dtype -> bits


@dataclass
class Quantized:
    """A quantized (rows, k) matrix as the backends hold it: `packed` uint32 (rows,
    k * bits / 32), `scales` and `biases` float16 (rows, k / group_size); arrays of
    either backend (NumPy views may have any row stride, rows contiguous).

    As a `linear` weight it maps k -> rows (x @ W.T, the rows are the outputs), or
    with `transpose` False rows -> k (x @ W: the FFN's down columns, one row per
    neuron): `mx.quantized_matmul`'s argument of that name."""

    packed: Any
    scales: Any
    biases: Any
    bits: int
    group_size: int
    transpose: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.packed.shape[1] * 32 // self.bits)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.packed, self.scales, self.biases))


def check_format(bits: int, group_size: int, k: int, what: str = "a row") -> None:
    """Raise ValueError (one line, how to fix it) unless `bits` and `group_size` are
    supported and the group size divides the row length k."""
    if bits not in BITS:
        raise ValueError(f"{bits}-bit quantization is not supported (use 4 or 8)")
    if group_size not in GROUP_SIZES:
        sizes = ", ".join(map(str, GROUP_SIZES))
        raise ValueError(f"group size {group_size} is not supported (use {sizes})")
    if k % group_size:
        raise ValueError(
            f"group size {group_size} does not divide {what} of {k} values; "
            "choose another --group-size"
        )


def row_bytes(k: int, bits: int, group_size: int) -> int:
    """Bytes of one quantized row of k values: packed integers, scales, biases."""
    return k * bits // 8 + 2 * (k // group_size) * 2


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers in [0, 2**bits), (..., k) -> uint32 words (..., k * bits / 32)."""
    per_word = 32 // bits
    q = np.asarray(q, dtype=np.uint32)
    lanes = q.reshape(*q.shape[:-1], q.shape[-1] // per_word, per_word)
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    return np.bitwise_or.reduce(lanes << shifts, axis=-1).astype(np.uint32)


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words (..., w) -> the integers (..., w * 32 / bits) as uint8."""
    per_word = 32 // bits
    packed = np.asarray(packed, dtype=np.uint32)
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(bits)
    lanes = (packed[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return lanes.reshape(*packed.shape[:-1], packed.shape[-1] * per_word).astype(
        np.uint8
    )


def quantize(
    w: np.ndarray, bits: int, group_size: int = DEFAULT_GROUP_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float matrix (..., k) -> (packed, scales, biases): each group's minimum is its
    bias and (max - min) / (2**bits - 1) its scale, both rounded to float16 first so
    the integers are chosen for the values that will be stored. Non-finite weights
    are the caller's to refuse (nonfinite.py)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    check_format(bits, group_size, w.shape[-1])
    groups = w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    low, high = groups.min(axis=-1), groups.max(axis=-1)
    levels = (1 << bits) - 1
    biases = low.astype(np.float16)
    scales = ((high - biases.astype(np.float32)) / levels).astype(np.float16)
    # a constant group (or one whose range rounds to 0) keeps q = 0
    step = np.where(scales == 0, np.float32(1), scales.astype(np.float32))[..., None]
    q = np.rint((groups - biases.astype(np.float32)[..., None]) / step)
    q = np.clip(q, 0, levels).reshape(w.shape)
    return pack(q, bits), np.ascontiguousarray(scales), np.ascontiguousarray(biases)


def dequantize(
    packed: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    bits: int,
    group_size: int,
) -> np.ndarray:
    """(packed, scales, biases) -> float32 values (the reference the kernels and
    tests compare against)."""
    q = unpack(packed, bits).astype(np.float32)
    groups = q.reshape(*q.shape[:-1], q.shape[-1] // group_size, group_size)
    s = np.asarray(scales, dtype=np.float32)[..., None]
    b = np.asarray(biases, dtype=np.float32)[..., None]
    return (groups * s + b).reshape(q.shape)


def rows_float32(part, dtype: str, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a stored matrix (a NumPy array in `dtype`'s storage form,
    or a NumPy `Quantized`) as float32."""
    if isinstance(part, Quantized):
        fields = (part.packed[lo:hi], part.scales[lo:hi], part.biases[lo:hi])
        return dequantize(*fields, part.bits, part.group_size)
    return decode(part[lo:hi], dtype).astype(np.float32)


def row_norms(part, dtype: str, block: int = 1024) -> np.ndarray:
    """Each row's length, float32 (rows,), widened `block` rows at a time (never a
    float32 copy of the whole matrix)."""
    rows = part.shape[0]
    return np.concatenate(
        [
            np.linalg.norm(rows_float32(part, dtype, lo, lo + block), axis=1)
            for lo in range(0, rows, block)
        ]
    ).astype(np.float32)


# -- GGUF blocks -----------------------------------------------------------------------
GGUF_BLOCK = 32
GGUF_TYPES = {  # type name -> (bits, bytes per block)
    "Q4_0": (4, 18),
    "Q4_1": (4, 20),
    "Q8_0": (8, 34),
    "Q5_0": (8, 22),  # 5-bit integers are 8-bit ones (our layouts hold 4 or 8)
    "Q5_1": (8, 24),
}


def from_gguf_blocks(
    raw: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF rows of Q4_0 / Q4_1 / Q8_0 / Q5_0 / Q5_1 blocks (uint8, (rows, blocks *
    block bytes)) -> (packed, scales, biases) of group size 32, the same values
    exactly.

    Q4_1: d, m (float16), 16 bytes of nibbles: value j = d * q + m, where byte i holds
    value i in its low nibble and value i + 16 in its high one. Q4_0: d, nibbles,
    value = d * (q - 8). Q8_0: d, 32 int8: value = d * q = d * (q + 128) - 128 d.
    Q5_0 and Q5_1: as Q4_0 and Q4_1 with 4 bytes of fifth bits (bit j: value j)
    before the nibbles, value = d * (q - 16) or d * q + m, held at 8 bits.
    """
    bits, block_bytes = GGUF_TYPES[kind]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, block_bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if kind in ("Q5_0", "Q5_1"):
        start = 4 if kind == "Q5_1" else 2
        fifth = blocks[..., start : start + 4, None] >> np.arange(8, dtype=np.uint8)
        nibbles = blocks[..., start + 4 :]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
        q |= (fifth.reshape(*q.shape) & 1) << 4
        if kind == "Q5_1":
            biases = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        else:
            biases = (d.astype(np.float32) * -16).astype(np.float16)
    elif kind == "Q8_0":
        q = blocks[..., 2:].view(np.int8).astype(np.int16) + 128
        biases = (d.astype(np.float32) * -128).astype(np.float16)
    else:
        start = 4 if kind == "Q4_1" else 2
        nibbles = blocks[..., start:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
        if kind == "Q4_1":
            biases = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        else:
            biases = (d.astype(np.float32) * -8).astype(np.float16)
    return pack(q.reshape(rows, -1), bits), d.copy(), biases.copy()
