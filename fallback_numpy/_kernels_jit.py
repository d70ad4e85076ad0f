"""The compiled loops of `kernels.py`'s 16-bit family (numba): widen 16-bit weights
in registers (bfloat16 by a shift, float16 by the CPU's conversion instruction where
LLVM has one, else from its bits) and accumulate in float32. Also what every family
shares: `compiled`, and the nonzero columns of x that the dispatcher's x @ w reads.

Each loop takes the weights as (flat, row_stride, k) after x: a read-only 1-D array
`flat` whose dtype names the kind (uint16 = bfloat16 bits, int16 = float16 bits,
float32 = plain values), row j being flat[j * row_stride : j * row_stride + k]. Each
does one part (a range of rows) so that threads can share the work. Callers validate
shapes; these loops do not.
"""

import platform

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import float32, njit, types, uint32
from numba.extending import intrinsic, overload

# Lets LLVM vectorize float32 sums (any order, fused multiply-add). Not the nnan/ninf
# of fastmath=True: inf and nan inputs must give IEEE results.
_FAST = {"reassoc", "contract"}


def compiled(**options):
    """njit without the GIL (the worker threads of `_workers.py` run these side by
    side) and with an on-disk cache, or without one where numba finds no writable
    place for it (next to the package, else the user's cache dir or
    NUMBA_CACHE_DIR): there numba refuses cache=True outright."""

    def decorate(function):
        try:
            return njit(nogil=True, cache=True, **options)(function)
        except RuntimeError:
            return njit(nogil=True, **options)(function)

    return decorate


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


@intrinsic
def _float32_from_float16_hardware(typingctx, bits):
    """The float16 with bits `bits` as float32 by LLVM's half -> float conversion:
    one instruction for 16 values on x86 with F16C (vcvtph2ps) and on ARM64. A row
    of 4096 values took 0.08 us in a dot product, against 0.22 us decoding the bits
    (`_float32_from_float16_bits`); bfloat16 takes 0.09 us."""
    if bits != types.int16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@njit
def _float32_from_float16_bits(stored):
    """The same, exact for every pattern, from the bits alone (numba has no float16
    on CPU): exponent and mantissa move to their float32 places, * 2**112 rebiases
    the exponent (127 - 15) and normalizes subnormals, inf and nan get the top
    exponent back, then the sign goes on."""
    bits = uint32(stored)
    value = _float32_from_bits((bits & uint32(0x7FFF)) << uint32(13))
    value *= float32(2.0**112)
    out = _bits_from_float32(value)
    if value >= float32(65536.0):  # float16 exponent 31: inf or nan
        out |= uint32(0x7F800000)
    return _float32_from_bits(out | ((bits & uint32(0x8000)) << uint32(16)))


def _hardware_float16() -> bool:
    """Whether LLVM lowers half -> float to an instruction here (elsewhere it would
    call a runtime helper that numba's JIT does not link)."""
    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    try:
        return bool(llvm.get_host_cpu_features().get("f16c"))
    except RuntimeError:
        return False


HARDWARE_FLOAT16 = _hardware_float16()


def widened(stored):
    """float32 value of one stored weight (uint16 bfloat16 bits, int16 float16 bits,
    or float32); compiled only, by the overload below."""
    raise NotImplementedError("widened is only callable from numba-compiled code")


@overload(widened)
def _widened(stored):
    if stored == types.uint16:  # bfloat16: the top half of a float32
        return lambda stored: _float32_from_bits(uint32(stored) << uint32(16))
    if stored == types.int16:
        if HARDWARE_FLOAT16:
            return lambda stored: _float32_from_float16_hardware(stored)
        return lambda stored: _float32_from_float16_bits(stored)
    if stored == types.float32:
        return lambda stored: stored
    return None


@compiled(fastmath=_FAST)
def dot_rows(x, flat, row_stride, k, lo, hi, out):
    """out[t, j] = dot(x[t], w[j]) for all t and rows lo <= j < hi: each weight row
    streams from memory once, for up to four rows of x at a time (later groups find
    it in cache)."""
    T = x.shape[0]
    for j in range(lo, hi):
        src = flat[j * row_stride : j * row_stride + k]
        t = 0
        while T - t >= 4:
            _dot4(x[t], x[t + 1], x[t + 2], x[t + 3], src, out[t : t + 4, j])
            t += 4
        if T - t == 3:
            _dot3(x[t], x[t + 1], x[t + 2], src, out[t : t + 3, j])
        elif T - t == 2:
            _dot2(x[t], x[t + 1], src, out[t : t + 2, j])
        elif T - t == 1:
            out[t, j] = _dot1(x[t], src)


# Widening fused into the dot products: one pass over the stored row, so the
# hardware prefetcher keeps streaming while the FMAs run. Widening each row into a
# scratch chunk first and then taking dots from it ran 1.5-2x slower at T = 2..4.


@njit(fastmath=_FAST)
def _dot1(x0, src):
    a0 = float32(0)
    for i in range(src.size):
        a0 += x0[i] * widened(src[i])
    return a0


@njit(fastmath=_FAST)
def _dot2(x0, x1, src, sums):
    a0 = a1 = float32(0)
    for i in range(src.size):
        w = widened(src[i])
        a0 += x0[i] * w
        a1 += x1[i] * w
    sums[0] = a0
    sums[1] = a1


@njit(fastmath=_FAST)
def _dot3(x0, x1, x2, src, sums):
    a0 = a1 = a2 = float32(0)
    for i in range(src.size):
        w = widened(src[i])
        a0 += x0[i] * w
        a1 += x1[i] * w
        a2 += x2[i] * w
    sums[0] = a0
    sums[1] = a1
    sums[2] = a2


@njit(fastmath=_FAST)
def _dot4(x0, x1, x2, x3, src, sums):
    a0 = a1 = a2 = a3 = float32(0)
    for i in range(src.size):
        w = widened(src[i])
        a0 += x0[i] * w
        a1 += x1[i] * w
        a2 += x2[i] * w
        a3 += x3[i] * w
    sums[0] = a0
    sums[1] = a1
    sums[2] = a2
    sums[3] = a3


@compiled()
def nonzero_columns(x):
    """Indices j where some x[t, j] != 0 (nan counts as nonzero), and how many
    entries of x are nonzero."""
    T, n = x.shape
    found = np.empty(n, np.int64)
    columns = 0
    entries = 0
    for j in range(n):
        count = 0
        for t in range(T):
            if x[t, j] != 0:
                count += 1
        if count:
            found[columns] = j
            columns += 1
            entries += count
    return found[:columns], entries


@njit
def nonzero_terms(x, j, terms):
    """terms[:count] = the t where x[t, j] != 0, in order; returns count."""
    count = 0
    for t in range(x.shape[0]):
        if x[t, j] != 0:
            terms[count] = t
            count += 1
    return count


@compiled(fastmath=_FAST)
def sum_rows(x, flat, row_stride, k, rows, out):
    """out[t] += x[t, j] * w[j] for j in rows where x[t, j] != 0."""
    if x.shape[0] == 1:
        _sum_rows_one(x[0], flat, row_stride, k, rows, out[0])
        return
    # Each row widened in the pass that adds it to up to four outputs (the rows of x
    # where it is nonzero), not widened into a scratch row first: 11008 x 4096
    # float16, T = 4, one thread, 15.4 -> 12.7 ms.
    terms = np.empty(x.shape[0], np.int64)
    for r in range(rows.size):
        j = rows[r]
        src = flat[j * row_stride : j * row_stride + k]
        count = nonzero_terms(x, j, terms)
        g = 0
        while count - g >= 4:
            t0, t1, t2, t3 = terms[g], terms[g + 1], terms[g + 2], terms[g + 3]
            _add4(
                (x[t0, j], x[t1, j], x[t2, j], x[t3, j]),
                src,
                out[t0],
                out[t1],
                out[t2],
                out[t3],
            )
            g += 4
        while g < count:
            t0 = terms[g]
            _add1(x[t0, j], src, out[t0])
            g += 1


@njit(fastmath=_FAST)
def _add1(a, src, dst):
    for i in range(src.size):
        dst[i] += a * widened(src[i])


@njit(fastmath=_FAST)
def _add4(a, src, d0, d1, d2, d3):
    a0, a1, a2, a3 = a
    for i in range(src.size):
        w = widened(src[i])
        d0[i] += a0 * w
        d1[i] += a1 * w
        d2[i] += a2 * w
        d3[i] += a3 * w


@njit(fastmath=_FAST)
def _sum_rows_one(x, flat, row_stride, k, rows, dst):
    """dst += x[j] * w[j] over j in rows with x[j] != 0.

    Four scattered rows per pass over dst: four streams from memory at once and one
    load and store of dst per four rows. Adjacent 16-bit rows go one at a time, one
    long stream (11008 x 4096, one thread, ms by rows per pass 1 / 4: float32 dense
    7.9 / 5.0, float16 dense 3.0 / 3.9, float16 10% 0.86 / 0.43, 3% 0.23 / 0.12).
    """
    nonzero = np.empty(rows.size, np.int64)
    count = 0
    for r in range(rows.size):
        if x[rows[r]] != 0:
            nonzero[count] = rows[r]
            count += 1
    r = 0
    while r < count:
        j0 = nonzero[r]
        if count - r < 4 or flat.itemsize == 2 and nonzero[r + 3] - j0 == 3:
            a0 = x[j0]
            s0 = flat[j0 * row_stride : j0 * row_stride + k]
            for i in range(k):
                dst[i] += a0 * widened(s0[i])
            r += 1
            continue
        j1, j2, j3 = nonzero[r + 1], nonzero[r + 2], nonzero[r + 3]
        a0, a1, a2, a3 = x[j0], x[j1], x[j2], x[j3]
        s0 = flat[j0 * row_stride : j0 * row_stride + k]
        s1 = flat[j1 * row_stride : j1 * row_stride + k]
        s2 = flat[j2 * row_stride : j2 * row_stride + k]
        s3 = flat[j3 * row_stride : j3 * row_stride + k]
        for i in range(k):
            dst[i] += (
                a0 * widened(s0[i])
                + a1 * widened(s1[i])
                + a2 * widened(s2[i])
                + a3 * widened(s3[i])
            )
        r += 4


@compiled()
def widen_rows(flat, row_stride, k, rows, lo, hi, out):
    """out[r] = float32 of w[rows[r]] for lo <= r < hi; returns how many of those
    values are inf or nan."""
    nonfinite = 0
    for r in range(lo, hi):
        j = rows[r]
        src = flat[j * row_stride : j * row_stride + k]
        dst = out[r]
        for i in range(k):
            value = widened(src[i])
            dst[i] = value
            if not abs(value) <= float32(3.4028235e38):
                nonfinite += 1
    return nonfinite
