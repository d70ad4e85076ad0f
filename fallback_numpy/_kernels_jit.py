"""The compiled loops behind `kernels.py` (numba): decode 16-bit weights from their
bits in registers and accumulate in float32.

Each loop takes the weights as a read-only 1-D array `flat` whose dtype names the
kind: uint16 = bfloat16 bits, int16 = float16 bits, float32 = plain values; row j is
flat[j * row_stride : j * row_stride + k]. Callers validate shapes; these loops do
not.
"""

import numpy as np
from llvmlite import ir
from numba import float32, int64, njit, prange, types, uint32
from numba.extending import intrinsic, overload

# Lets LLVM vectorize float32 sums (any order, fused multiply-add). Not the nnan/ninf
# of fastmath=True: inf and nan inputs must give IEEE results.
_FAST = {"reassoc", "contract"}

# Floats of x per pass of `dot_rows` (all T rows, one chunk of columns): 32 KB, to
# stay in the L1 cache (48 KB here) beside the widened chunk.
_X_CHUNK_FLOATS = 8192


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bits are `bits` (a register bitcast, no memory round trip:
    widening through uint32/float32 views of one scratch array ran 2x slower)."""
    if not isinstance(bits, types.Integer):  # numba widens uint32 arithmetic
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _bits_from_float32(typingctx, value):
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def widened(stored):
    """float32 value of one stored weight (uint16 bfloat16 bits, int16 float16 bits,
    or float32); compiled only, by the overload below."""
    raise NotImplementedError("widened is only callable from numba-compiled code")


@overload(widened)
def _widened(stored):
    if stored == types.uint16:  # bfloat16: the top half of a float32

        def from_bfloat16(stored):
            return _float32_from_bits(uint32(stored) << uint32(16))

        return from_bfloat16
    if stored == types.int16:  # float16, exact for every pattern

        def from_float16(stored):
            bits = uint32(stored)
            # exponent and mantissa to their float32 places; * 2**112 rebiases the
            # exponent (127 - 15) and normalizes subnormals exactly
            value = _float32_from_bits((bits & uint32(0x7FFF)) << uint32(13))
            value *= float32(2.0**112)
            out = _bits_from_float32(value)
            if value >= float32(65536.0):  # float16 exponent 31: inf or nan
                out |= uint32(0x7F800000)
            return _float32_from_bits(out | ((bits & uint32(0x8000)) << uint32(16)))

        return from_float16
    if stored == types.float32:
        return lambda stored: stored
    return None


@njit(parallel=True, cache=True, fastmath=_FAST)
def dot_rows(x, flat, row_stride, n, k, out, threads):
    """out[t, j] = dot(x[t], w[j]) for all t, j; each weight row is read once."""
    T = x.shape[0]
    chunk = max(64, _X_CHUNK_FLOATS // T // 64 * 64)
    parts = min(n, threads)
    for p in prange(parts):
        row = np.empty(chunk, np.float32)
        sums = np.empty(T, np.float32)
        for j in range(n * p // parts, n * (p + 1) // parts):
            base = j * row_stride
            if T == 1:
                xt = x[0]
                src = flat[base : base + k]
                acc = float32(0)
                for i in range(k):
                    acc += xt[i] * widened(src[i])
                out[0, j] = acc
                continue
            sums[:] = 0
            for c0 in range(0, k, chunk):
                m = min(k - c0, chunk)
                src = flat[base + c0 : base + c0 + m]
                for i in range(m):
                    row[i] = widened(src[i])
                _add_dots(x, c0, row[:m], sums)
            for t in range(T):
                out[t, j] = sums[t]


@njit(fastmath=_FAST)
def _add_dots(x, c0, row, sums):
    """sums[t] += dot(x[t, c0:c0+m], row) for every t, m = len(row): up to four rows
    of x per pass over row."""
    T = x.shape[0]
    m = row.size
    t = 0
    while T - t >= 4:
        x0 = x[t, c0 : c0 + m]
        x1 = x[t + 1, c0 : c0 + m]
        x2 = x[t + 2, c0 : c0 + m]
        x3 = x[t + 3, c0 : c0 + m]
        a0 = a1 = a2 = a3 = float32(0)
        for i in range(m):
            w = row[i]
            a0 += x0[i] * w
            a1 += x1[i] * w
            a2 += x2[i] * w
            a3 += x3[i] * w
        sums[t] += a0
        sums[t + 1] += a1
        sums[t + 2] += a2
        sums[t + 3] += a3
        t += 4
    if T - t == 3:
        x0 = x[t, c0 : c0 + m]
        x1 = x[t + 1, c0 : c0 + m]
        x2 = x[t + 2, c0 : c0 + m]
        a0 = a1 = a2 = float32(0)
        for i in range(m):
            w = row[i]
            a0 += x0[i] * w
            a1 += x1[i] * w
            a2 += x2[i] * w
        sums[t] += a0
        sums[t + 1] += a1
        sums[t + 2] += a2
    elif T - t == 2:
        x0 = x[t, c0 : c0 + m]
        x1 = x[t + 1, c0 : c0 + m]
        a0 = a1 = float32(0)
        for i in range(m):
            w = row[i]
            a0 += x0[i] * w
            a1 += x1[i] * w
        sums[t] += a0
        sums[t + 1] += a1
    elif T - t == 1:
        x0 = x[t, c0 : c0 + m]
        a0 = float32(0)
        for i in range(m):
            a0 += x0[i] * row[i]
        sums[t] += a0


@njit(cache=True)
def nonzero_columns(x):
    """Indices j where some x[t, j] != 0 (nan counts as nonzero)."""
    T, n = x.shape
    found = np.empty(n, np.int64)
    count = 0
    for j in range(n):
        for t in range(T):
            if x[t, j] != 0:
                found[count] = j
                count += 1
                break
    return found[:count]


@njit(parallel=True, cache=True, fastmath=_FAST)
def sum_rows(x, flat, row_stride, rows, k, out, threads):
    """out[t] += sum of x[t, j] * w[j] over j in rows where x[t, j] != 0."""
    T = x.shape[0]
    parts = min(k, threads)
    for p in prange(parts):
        c0 = k * p // parts
        c1 = k * (p + 1) // parts
        m = c1 - c0
        row = np.empty(m, np.float32)
        for r in range(rows.size):
            j = rows[r]
            src = flat[j * row_stride + c0 : j * row_stride + c1]
            if T == 1:
                a = x[0, j]
                if a != 0:
                    dst = out[0, c0:c1]
                    for i in range(m):
                        dst[i] += a * widened(src[i])
                continue
            for i in range(m):
                row[i] = widened(src[i])
            for t in range(T):
                a = x[t, j]
                if a != 0:
                    dst = out[t, c0:c1]
                    for i in range(m):
                        dst[i] += a * row[i]


@njit(parallel=True, cache=True)
def widen_rows(flat, row_stride, rows, k, out):
    """out[r] = float32 of w[rows[r]]; returns how many values are inf or nan."""
    nonfinite = int64(0)
    for r in prange(rows.size):
        j = rows[r]
        src = flat[j * row_stride : j * row_stride + k]
        dst = out[r]
        bad = int64(0)
        for i in range(k):
            value = widened(src[i])
            dst[i] = value
            if not abs(value) <= float32(3.4028235e38):
                bad += 1
        nonfinite += bad
    return nonfinite
