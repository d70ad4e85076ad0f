"""GGUF's K-quant and IQ4 blocks as our affine group format at group size 32.

A K-quant super-block holds 256 values in sub-blocks, each with its own integer scale
(and minimum) times the super-block's float16 `d` (and `dmin`). Where a sub-block is
32 values, it is one of our groups (quantize.py: value = scale * q + bias): its
integers are kept, its scale and bias are the products. What each type becomes:

- Q4_K: 8 sub-blocks of 32, 6-bit scales and mins, 4-bit q: value = d sc q - dmin m
  -> 4 bits, scale = d sc, bias = -dmin m.
- Q5_K: the same with 5-bit q -> 8 bits (a 5-bit integer is an 8-bit one; our
  layouts hold 4 or 8 bits), same scale and bias.
- Q3_K: 16 sub-blocks of 16, 6-bit signed scales sc, q in [-4, 3]: value = d sc q.
  Two sub-blocks make a group: n = sc q lies in [-124, 128] for any sc, so
  8 bits hold n + 128 (n + 124 in the rare group that holds 128), scale = d.
- IQ4_NL (blocks of 32) and IQ4_XS (8 sub-blocks of 32, 6-bit signed scales): a
  non-linear codebook of 16 int8 values, value = d kvalue[q]: not affine at 4 bits,
  but the codebook entry + 128 is an 8-bit integer: 8 bits, scale = d (d ls for
  IQ4_XS), bias = -128 scale.
- Q6_K (16 sub-blocks of 16, int8 scales) and Q2_K (16 of 16, 4-bit scales and mins):
  two sub-blocks of a group have unrelated scales and minimums, which no single
  group scale and bias can hold; they are quantized again from gguf's own
  dequantization (Q6_K at 8 bits: about 1/8 of its coarser sub-block's step at
  worst; Q2_K at 4).

Where float16 rounds: the integers never change, but a scale d sc (and a bias dmin m)
is a float16 times an integer of up to 6 bits, exact in float32 and not always in
float16: rounding it costs at most 2**-11 of the scale (half a float16 ulp; products
that fall below float16's normal range are exact multiples of 2**-24). A value
scale q + bias is then within 2**-11 (|d sc q| + |dmin m|) of gguf's. Q3_K's scale d
and IQ4_NL's are float16 already (its bias -128 d is exact; -124 d may round the
same way); IQ4_XS's d ls rounds like Q4_K's. Measured on the default model's
Q4_K_M: see docs/quantization.md.
"""

from __future__ import annotations

import numpy as np

from .quantize import pack

GROUP = 32
KQUANT_TYPES = {  # type name -> (bits at group size 32, bytes per block, exact)
    "Q4_K": (4, 144, True),
    "Q5_K": (8, 176, True),
    "Q3_K": (8, 110, True),
    "IQ4_NL": (8, 18, True),
    "IQ4_XS": (8, 136, True),
    "Q6_K": (8, 210, False),
    "Q2_K": (4, 84, False),
}
IQ4_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
    dtype=np.int16,
)
ROWS_AT_ONCE = 4096  # row chunks: the integers of a whole embedding cost 4x its blocks


def from_kquant_blocks(
    raw: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF rows of Q4_K / Q5_K / Q3_K / IQ4_NL / IQ4_XS blocks (uint8, (rows,
    blocks * block bytes)) -> (packed, scales, biases) at group size 32, the integers
    unchanged and the scales rounded to float16 (see the module docstring).

    Raises:
        ValueError: a type with no exact group-32 form, or a scale beyond float16.
    """
    if kind not in KQUANT_TYPES or not KQUANT_TYPES[kind][2]:
        raise ValueError(f"{kind} blocks have no exact group-32 form")
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    chunks = [
        _convert_rows(raw[lo : lo + ROWS_AT_ONCE], kind)
        for lo in range(0, max(len(raw), 1), ROWS_AT_ONCE)
    ]
    return tuple(np.concatenate(f) for f in zip(*chunks, strict=True))


def float16_rounding(raw: np.ndarray, kind: str) -> dict:
    """What rounding `kind`'s scales and biases to float16 costs on these blocks:
    {"groups", "rounded" (groups whose scale or bias is not a float16), "max_relative"
    (largest |float16 - exact| / |exact| of a scale or bias)}."""
    _, block_bytes, _ = KQUANT_TYPES[kind]
    _, scales, biases = _DECODERS[kind](raw.reshape(-1, block_bytes))
    exact = np.stack([scales, biases]).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        error = np.abs(exact.astype(np.float16).astype(np.float64) - exact)
        relative = np.where(exact == 0, 0.0, error / np.abs(exact))
    return {
        "groups": int(scales.size),
        "rounded": int((error > 0).any(axis=0).sum()),
        "max_relative": float(relative.max()),
    }


def _convert_rows(raw: np.ndarray, kind: str) -> tuple[np.ndarray, ...]:
    bits, block_bytes, _ = KQUANT_TYPES[kind]
    rows = raw.shape[0]
    blocks = raw.reshape(-1, block_bytes)
    q, scales, biases = _DECODERS[kind](blocks)  # q (blocks, values), (blocks, groups)
    with np.errstate(over="ignore"):  # refused just below
        scales16, biases16 = scales.astype(np.float16), biases.astype(np.float16)
    if not (np.isfinite(scales16).all() and np.isfinite(biases16).all()):
        raise ValueError(f"{kind} scales beyond float16's range (a corrupted file?)")
    return (
        pack(q.reshape(rows, -1), bits),
        scales16.reshape(rows, -1),
        biases16.reshape(rows, -1),
    )


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32."""
    return np.ascontiguousarray(two_bytes).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """(n, k) bytes -> (n, 2k) 4-bit integers: each run of `run` bytes gives its low
    nibbles, then its high ones (values i and i + run)."""
    n = qs.shape[0]
    runs = qs.reshape(n, -1, 1, run) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (runs & np.uint8(0x0F)).reshape(n, -1)


def _scales_mins_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins: bytes 0-3 and
    4-7 hold scales and mins 0-3 in their low 6 bits and the top 2 bits of 4-7 in
    their high 2; bytes 8-11 hold the low 4 bits of 4-7 (scales low, mins high)."""
    s = packed.reshape(-1, 3, 4)
    lo_sc, lo_m, rest = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([lo_sc & 63, (rest & 15) | ((lo_sc >> 6) << 4)], axis=1)
    m = np.concatenate([lo_m & 63, (rest >> 4) | ((lo_m >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _q4_k(b: np.ndarray):
    # d (2), dmin (2), scales and mins (12), 128 bytes: runs of 32, low nibbles the
    # even sub-block, high the odd one
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _scales_mins_k4(b[:, 4:16])
    return _nibbles(b[:, 16:144], 32), d * sc, -(dmin * m)


def _q5_k(b: np.ndarray):
    # as Q4_K, with 32 bytes of high bits before the nibbles: bit s of byte i is the
    # fifth bit of value i of sub-block s
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _scales_mins_k4(b[:, 4:16])
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & np.uint8(1)
    q = _nibbles(b[:, 48:176], 32) | (high.reshape(len(b), -1) << np.uint8(4))
    return q, d * sc, -(dmin * m)


def _q3_k(b: np.ndarray):
    # hmask (32), 2-bit q (64), scales (12), d (2). Value j: its 2 low bits at byte
    # 32 (j // 128) + j % 32, shift 2 ((j % 128) // 32); its high bit at bit j // 32
    # of byte j % 32; q = low + 4 high - 4.
    n = len(b)
    low = b[:, 32:96].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(
        1, 1, 4, 1
    )
    high = (b[:, None, 0:32] >> np.arange(8, dtype=np.uint8)[:, None]) & np.uint8(1)
    q = (low & np.uint8(3)).reshape(n, 256).astype(np.int16)
    q += 4 * high.reshape(n, 256).astype(np.int16) - 4
    # 16 six-bit scales: low 4 bits in bytes 0-7 (sub-blocks 0-7 low nibbles, 8-15
    # high), top 2 bits in bytes 8-11 (sub-block k at byte k % 4, shift 2 (k // 4))
    s = b[:, 96:108]
    lo = (s[:, None, 0:8] >> np.array([0, 4], np.uint8)[:, None]) & np.uint8(15)
    hi = (s[:, None, 8:12] >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & np.uint8(3)
    sc = (lo.reshape(n, 16) | (hi.reshape(n, 16) << np.uint8(4))).astype(np.int16) - 32
    levels = (sc[:, :, None] * q.reshape(n, 16, 16)).reshape(n, 8, GROUP)  # [-124, 128]
    # + 128 (bias -128 d, exact) unless the group holds 128; then + 124
    offset = np.where(levels.max(axis=2) > 127, 124, 128).astype(np.int16)
    d = _f16(b[:, 108:110])
    q8 = (levels + offset[:, :, None]).astype(np.uint8).reshape(n, 256)
    return q8, np.repeat(d, 8, axis=1), -offset * d


def _iq4_nl(b: np.ndarray):
    # d (2), 16 bytes: low nibbles values 0-15, high 16-31; value = d kvalue[q]
    d = _f16(b[:, 0:2])
    q = (IQ4_VALUES[_nibbles(b[:, 2:18], 16)] + 128).astype(np.uint8)
    return q, d, -128 * d


def _iq4_xs(b: np.ndarray):
    # d (2), high scale bits (uint16: 2 per sub-block), low scale bits (4 bytes:
    # nibbles, even sub-block low), 8 runs of 16 bytes as IQ4_NL's; ls - 32 signed
    n = len(b)
    d = _f16(b[:, 0:2])
    high = np.ascontiguousarray(b[:, 2:4]).view(np.uint16)
    high = (high >> (2 * np.arange(8, dtype=np.uint16))) & np.uint16(3)
    low = _nibbles(b[:, 4:8], 1)  # byte j: sub-blocks 2j (low), 2j + 1 (high)
    ls = (low.astype(np.int16) | (high.astype(np.int16) << 4)) - 32
    q = (IQ4_VALUES[_nibbles(b[:, 8:136], 16)] + 128).astype(np.uint8)
    # the scale rounds to float16 first: the bias -128 x it is then exact
    with np.errstate(over="ignore"):  # refused by the caller
        scale = (d * ls).astype(np.float16).astype(np.float32)
    return q.reshape(n, 256), scale, -128 * scale


_DECODERS = {
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q3_K": _q3_k,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
}
