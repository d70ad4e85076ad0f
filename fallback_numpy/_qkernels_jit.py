"""The compiled loops behind `kernels.py`'s quantized matmuls: rows of 4- or 8-bit
integers packed in uint32 words, with a float16 scale and bias per group
(mlx_flashinfer/formats/quantize.py), unpacked in registers and accumulated in float32.

Value j of a row is field j % L of word j // L (L = 32 / bits fields per word). The
inner loops take 16 words at a time as one <16 x i32> vector: a shift, a mask and a
conversion give field l of all 16, that is values l, l + L, l + 2L, ... So these
loops see rows in *field order*, row[l * stride + w] = value w * L + l for the nw
words of a row (stride >= nw, see FIELD_PAD): `kernels.py` puts x in that order
once per call, and dequantized rows come out in it; a permutation of the terms of a
dot product changes nothing else.

The inner loops are LLVM vector IR (numba intrinsics), not plain numba loops: LLVM's
auto-vectorizer widened numba's uint32 arithmetic to 64-bit lanes, scattered the
per-word scales with vscatter, or stayed scalar, depending on the group size (one
thread, rows in cache, q8 with groups of 64: 1.46 ms per 4096 x 4096 against 0.33
ms written as below). Blocks of 16 words load with plain loads; only a row's last,
partial block uses masked loads and stores (a row may end where its buffer ends;
masked loads on every block ran 4-6x slower from memory here).

Callers validate shapes and formats; these loops do not.
"""

import numpy as np
from llvmlite import ir
from numba import float32, types
from numba.core import cgutils
from numba.extending import intrinsic

from fallback_numpy._kernels_jit import HARDWARE_FLOAT16, _compiled
from mlx_flashinfer.formats.quantize import BITS, GROUP_SIZES

BLOCK = 16  # words per vector block
# Values of padding after each field of a row in field order that the loops read or
# write: without it, the 8 fields of 4 rows of outputs (or of x) sit 2 KB apart, in
# two L1 sets, 32 streams in 24 ways (4096 x 4096 q4 at T = 4, one thread: x @ w
# 15.1 -> 3.6 ms, x @ w.T 2.7 -> 2.2 ms).
FIELD_PAD = 16
FORMATS = [(bits, size * bits // 32) for bits in BITS for size in GROUP_SIZES]
_F32 = ir.FloatType()
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_FLAGS = ("reassoc", "contract")  # as _kernels_jit._FAST: any order, fused FMA


def _vector(element, count: int = BLOCK) -> ir.VectorType:
    return ir.VectorType(element, count)


def _constant_vector(element, values) -> ir.Constant:
    return ir.Constant(_vector(element, len(values)), list(values))


def _splat(builder, value, count: int = BLOCK):
    """A vector of `count` copies of a scalar (or of lane 0 of a vector)."""
    if not isinstance(value.type, ir.VectorType):
        undef = ir.Constant(_vector(value.type, 1), ir.Undefined)
        value = builder.insert_element(undef, value, _I32(0))
    return _shuffle(builder, value, [0] * count)


def _shuffle(builder, vector, lanes):
    """The vector of vector[lanes[i]]."""
    return builder.shuffle_vector(
        vector, ir.Constant(vector.type, ir.Undefined), _constant_vector(_I32, lanes)
    )


def _masked(builder, what: str, vector_type, arguments):
    """A call of LLVM's llvm.masked.load (arguments: pointer, alignment, mask,
    values of the masked lanes) or llvm.masked.store (value, pointer, alignment,
    mask)."""
    element = vector_type.element
    suffix = "f32" if element == _F32 else f"i{element.width}"
    name = f"llvm.masked.{what}.v{vector_type.count}{suffix}.p0"
    mask = ir.VectorType(ir.IntType(1), vector_type.count)
    if what == "load":
        pointer = arguments[0]
        fnty = ir.FunctionType(vector_type, [pointer.type, _I32, mask, vector_type])
    else:
        pointer = arguments[1]
        fnty = ir.FunctionType(ir.VoidType(), [vector_type, pointer.type, _I32, mask])
    function = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(function, arguments)


def _load(builder, base, index, count: int, mask=None):
    """`count` elements from base[index] as a vector; lanes outside `mask` (an i1
    vector, None: all) are not read and come back 0."""
    vector_type = _vector(base.type.pointee, count)
    pointer = builder.bitcast(builder.gep(base, [index]), vector_type.as_pointer())
    if mask is None:
        return builder.load(pointer, align=1)
    zero = ir.Constant(vector_type, None)
    return _masked(builder, "load", vector_type, [pointer, _I32(1), mask, zero])


def _store(builder, value, base, index, mask=None):
    pointer = builder.bitcast(builder.gep(base, [index]), value.type.as_pointer())
    if mask is None:
        builder.store(value, pointer, align=1)
    else:
        _masked(builder, "store", value.type, [value, pointer, _I32(1), mask])


def _prefetch(builder, base, index) -> None:
    """Ask for the cache line of base[index] ahead of use (a hint: never faults)."""
    pointer = builder.bitcast(builder.gep(base, [index]), ir.IntType(8).as_pointer())
    fnty = ir.FunctionType(ir.VoidType(), [pointer.type, _I32, _I32, _I32])
    function = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(function, [pointer, _I32(0), _I32(3), _I32(1)])  # read, keep, data


def floats_from_halves(builder, halves, hardware: bool = HARDWARE_FLOAT16):
    """float16 bit patterns (an i16 vector) as float32: LLVM's half -> float where
    the CPU has an instruction for it, else from the bits as
    `_kernels_jit._float32_from_float16_bits` does (exact for every pattern)."""
    count = halves.type.count
    if hardware:
        as_half = builder.bitcast(halves, _vector(ir.HalfType(), count))
        return builder.fpext(as_half, _vector(_F32, count))
    bits = builder.zext(halves, _vector(_I32, count))

    def constant(value):
        return _constant_vector(_I32, [value] * count)

    magnitude = builder.shl(builder.and_(bits, constant(0x7FFF)), constant(13))
    value = builder.fmul(
        builder.bitcast(magnitude, _vector(_F32, count)),
        _constant_vector(_F32, [2.0**112] * count),
    )
    out = builder.bitcast(value, _vector(_I32, count))
    top = builder.fcmp_ordered(">=", value, _constant_vector(_F32, [65536.0] * count))
    out = builder.select(top, builder.or_(out, constant(0x7F800000)), out)
    sign = builder.shl(builder.and_(bits, constant(0x8000)), constant(16))
    return builder.bitcast(builder.or_(out, sign), _vector(_F32, count))


def _field(builder, words, bits: int, field: int):
    """Field `field` of each of 16 words as floats."""
    value = builder.lshr(words, _constant_vector(_I32, [bits * field] * BLOCK))
    if field < 32 // bits - 1:  # the top field needs no mask
        mask = (1 << bits) - 1
        value = builder.and_(value, _constant_vector(_I32, [mask] * BLOCK))
    return builder.sitofp(value, _vector(_F32))


def _group_values(builder, halves, w0, words_per_group: int, lanes):
    """The float16 scales (or biases) of the groups of words w0..w0+15, one per word:
    16 / words_per_group groups per block, or one group for 16 words and more."""
    groups = max(1, BLOCK // words_per_group)
    first = builder.udiv(w0, _I64(words_per_group))
    mask = None
    if lanes is not None and groups > 1:
        mask = _shuffle(builder, lanes, [i * words_per_group for i in range(groups)])
    values = floats_from_halves(builder, _load(builder, halves, first, groups, mask))
    return _shuffle(
        builder, values, [min(i // words_per_group, groups - 1) for i in range(BLOCK)]
    )


def _over_blocks(builder, count, body) -> None:
    """body(start, lanes) for each block of 16 of `count` elements (i64): lanes is
    None for full blocks, the i1 vector of the elements that exist for a last
    partial one."""
    full = builder.udiv(count, _I64(BLOCK))
    with cgutils.for_range(builder, full) as loop:
        body(builder.mul(loop.index, _I64(BLOCK)), None)
    start = builder.mul(full, _I64(BLOCK))
    left = builder.sub(count, start)
    with builder.if_then(builder.icmp_signed(">", left, _I64(0)), likely=False):
        lane_ids = _constant_vector(_I64, range(BLOCK))
        body(start, builder.icmp_signed("<", lane_ids, _splat(builder, left)))


def _per_format(builder, bits, words_per_group, body) -> None:
    """body(bits, words_per_group) with the format as Python ints, for the format of
    the run-time values (i64): the vector code needs them as constants, so each
    format of quantize.py gets its own code, chosen by a switch."""
    key = builder.add(builder.mul(bits, _I64(1000)), words_per_group)
    end = builder.append_basic_block("format.end")
    switch = builder.switch(key, end)  # another format: nothing (kernels.py checks)
    for b, per_group in FORMATS:
        case = builder.append_basic_block(f"format.{b}.{per_group}")
        switch.add_case(_I64(b * 1000 + per_group), case)
        builder.position_at_end(case)
        body(b, per_group)
        builder.branch(end)
    builder.position_at_end(end)


def _sum_lanes(builder, vector):
    """Sum of the lanes of a <16 x float>, as a tree."""
    count = vector.type.count
    while count > 1:
        count //= 2
        low = _shuffle(builder, vector, range(count))
        high = _shuffle(builder, vector, range(count, 2 * count))
        vector = builder.fadd(low, high, flags=_FLAGS)
    return builder.extract_element(vector, _I32(0))


class _Rows:
    """Element pointers into the rows of a 2-D array (any row stride) or of a flat
    1-D view with a row stride in elements (the quantized arrays), in IR."""

    def __init__(self, context, builder, array_type, value, stride=None):
        self.builder = builder
        array = context.make_array(array_type)(context, builder, value)
        self.data = array.data
        self.shape = array.shape
        self.stride = stride  # elements, for flat views
        if stride is None:  # bytes, from the array
            self.stride_bytes = builder.extract_value(array.strides, 0)

    def row(self, index):
        builder = self.builder
        if self.stride is not None:
            return builder.gep(self.data, [builder.mul(index, self.stride)])
        raw = builder.bitcast(self.data, ir.IntType(8).as_pointer())
        raw = builder.gep(raw, [builder.mul(index, self.stride_bytes)])
        return builder.bitcast(raw, self.data.type)


def _quantized_rows(context, builder, tuple_type, value):
    """(packed, scales, biases) _Rows of the tuple kernels.py passes, and the words
    per row (i64)."""
    parts = [builder.extract_value(value, i) for i in range(7)]
    rows = [
        _Rows(context, builder, tuple_type[i], parts[i], parts[i + 1])
        for i in (0, 2, 4)
    ]
    return (*rows, parts[6])


def _integers(*values) -> bool:
    return all(isinstance(value, types.Integer) for value in values)


def _ints(builder, value, count: int):
    return [builder.extract_value(value, i) for i in range(count)]


@intrinsic
def _row_dots(
    typingctx, x_fields, x_sums, ts, quantized, j, bits, words_per_group, out
):
    """out[t, j] = x[t] . dequantized row j of `quantized` for each t in the tuple
    ts: per group, scale * sum(x * q) + bias * sum(x), with x_fields (T, k) in field
    order and x_sums (T, groups). The q are unpacked once for all t."""
    if not (isinstance(ts, types.UniTuple) and _integers(j, bits, words_per_group)):
        return None
    count = ts.count
    signature = types.none(
        x_fields, x_sums, ts, quantized, j, bits, words_per_group, out
    )

    def codegen(context, builder, sig, args):
        rows = _ints(builder, args[2], count)
        x_rows = _Rows(context, builder, sig.args[0], args[0])
        xs = [x_rows.row(t) for t in rows]
        sum_rows = _Rows(context, builder, sig.args[1], args[1])
        sums_of_x = [sum_rows.row(t) for t in rows]
        packed, scales, biases, nw = _quantized_rows(
            context, builder, sig.args[3], args[3]
        )
        source, halves, bias_halves = (a.row(args[4]) for a in (packed, scales, biases))
        # the next row's words, a row ahead: the kernel computes more than it
        # reads, and the hardware prefetcher alone left latency in its way (4096 x
        # 4096 from memory, one thread, medians of 5 runs: q4 0.75 -> 0.68 ms, q8
        # 0.97 -> 0.85 ms on a busy machine; 2 and 4 rows ahead did no better)
        following = packed.row(builder.add(args[4], _I64(1)))
        row_length = builder.extract_value(x_rows.shape, 1)
        zero = ir.Constant(_vector(_F32), None)
        totals = [cgutils.alloca_once_value(builder, zero) for _ in range(count)]

        def for_format(b, per_group):
            def block(w0, lanes):
                _prefetch(builder, following, w0)
                words = _load(builder, source, w0, BLOCK, lanes)
                scale = _group_values(builder, halves, w0, per_group, lanes)
                parts = [None] * count
                for field in range(32 // b):
                    q = _field(builder, words, b, field)
                    at = builder.add(builder.mul(_I64(field), stride), w0)
                    for t in range(count):
                        x = _load(builder, xs[t], at, BLOCK, lanes)
                        term = builder.fmul(x, q, flags=_FLAGS)
                        if parts[t] is not None:
                            term = builder.fadd(parts[t], term, flags=_FLAGS)
                        parts[t] = term
                for t in range(count):
                    scaled = builder.fmul(scale, parts[t], flags=_FLAGS)
                    total = builder.fadd(builder.load(totals[t]), scaled, flags=_FLAGS)
                    builder.store(total, totals[t])

            stride = builder.udiv(row_length, _I64(32 // b))
            _over_blocks(builder, nw, block)

        _per_format(builder, *_format(context, builder, sig, args, 5), for_format)

        def bias_block(g0, lanes):
            bias = floats_from_halves(
                builder, _load(builder, bias_halves, g0, BLOCK, lanes)
            )
            for t in range(count):
                x_sum = _load(builder, sums_of_x[t], g0, BLOCK, lanes)
                term = builder.fmul(bias, x_sum, flags=_FLAGS)
                total = builder.fadd(builder.load(totals[t]), term, flags=_FLAGS)
                builder.store(total, totals[t])

        _over_blocks(builder, builder.extract_value(sum_rows.shape, 1), bias_block)
        out_rows = _Rows(context, builder, sig.args[7], args[7])
        for t in range(count):
            dst = builder.gep(out_rows.row(rows[t]), [args[4]])
            builder.store(_sum_lanes(builder, builder.load(totals[t])), dst)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _rows_add(
    typingctx,
    coefficients,
    quantized,
    js,
    following,
    bits,
    words_per_group,
    out,
    ts,
    bias_sums,
):
    """For R rows js of `quantized` and U rows ts of out (T, k) in field order and
    of bias_sums (T, groups): out[t_u] += sum_r coefficients[r * U + u] * scale_r *
    q_r and bias_sums[t_u] += sum_r coefficients[r * U + u] * bias_r. Each q is
    unpacked once for all U outputs, each output loaded and stored once for all R
    rows. The R rows `following` (those of the caller's next pass) are prefetched
    meanwhile."""
    if not (
        isinstance(js, types.UniTuple)
        and isinstance(ts, types.UniTuple)
        and _integers(bits, words_per_group)
    ):
        return None
    rows, targets = js.count, ts.count
    signature = types.none(
        coefficients,
        quantized,
        js,
        following,
        bits,
        words_per_group,
        out,
        ts,
        bias_sums,
    )

    def codegen(context, builder, sig, args):
        weight = _ints(builder, args[0], rows * targets)
        js = _ints(builder, args[2], rows)
        packed, scales, biases, nw = _quantized_rows(
            context, builder, sig.args[1], args[1]
        )
        sources = [packed.row(j) for j in js]
        halves = [scales.row(j) for j in js]
        bias_halves = [biases.row(j) for j in js]
        ahead = [packed.row(j) for j in _ints(builder, args[3], rows)]
        ts = _ints(builder, args[7], targets)
        out_rows = _Rows(context, builder, sig.args[6], args[6])
        dsts = [out_rows.row(t) for t in ts]
        sum_rows = _Rows(context, builder, sig.args[8], args[8])
        bias_dsts = [sum_rows.row(t) for t in ts]
        row_length = builder.extract_value(out_rows.shape, 1)

        def for_format(b, per_group):
            def block(w0, lanes):
                words, factors = [], []
                for r in range(rows):
                    _prefetch(builder, ahead[r], w0)
                    words.append(_load(builder, sources[r], w0, BLOCK, lanes))
                    scale = _group_values(builder, halves[r], w0, per_group, lanes)
                    factors.append(
                        [
                            builder.fmul(
                                _splat(builder, weight[r * targets + u]),
                                scale,
                                flags=_FLAGS,
                            )
                            for u in range(targets)
                        ]
                    )
                for field in range(32 // b):
                    qs = [_field(builder, words[r], b, field) for r in range(rows)]
                    at = builder.add(builder.mul(_I64(field), stride), w0)
                    for u in range(targets):
                        total = _load(builder, dsts[u], at, BLOCK, lanes)
                        for r in range(rows):
                            term = builder.fmul(factors[r][u], qs[r], flags=_FLAGS)
                            total = builder.fadd(total, term, flags=_FLAGS)
                        _store(builder, total, dsts[u], at, lanes)

            stride = builder.udiv(row_length, _I64(32 // b))
            _over_blocks(builder, nw, block)

        _per_format(builder, *_format(context, builder, sig, args, 4), for_format)

        def bias_block(g0, lanes):
            bias = [
                floats_from_halves(builder, _load(builder, h, g0, BLOCK, lanes))
                for h in bias_halves
            ]
            for u in range(targets):
                total = _load(builder, bias_dsts[u], g0, BLOCK, lanes)
                for r in range(rows):
                    factor = _splat(builder, weight[r * targets + u])
                    term = builder.fmul(factor, bias[r], flags=_FLAGS)
                    total = builder.fadd(total, term, flags=_FLAGS)
                _store(builder, total, bias_dsts[u], g0, lanes)

        _over_blocks(builder, builder.extract_value(sum_rows.shape, 1), bias_block)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _dequantize_row(typingctx, quantized, j, bits, words_per_group, out, r):
    """out[r] (field order) = scale * q + bias of row j of `quantized`, rounded as
    NumPy rounds it (a product, then a sum: no fused multiply-add), so that the
    values equal `quantize.dequantize`'s exactly."""
    if not _integers(j, bits, words_per_group, r):
        return None
    signature = types.none(quantized, j, bits, words_per_group, out, r)

    def codegen(context, builder, sig, args):
        packed, scales, biases, nw = _quantized_rows(
            context, builder, sig.args[0], args[0]
        )
        source, scale_halves, bias_halves = (
            a.row(args[1]) for a in (packed, scales, biases)
        )
        following = packed.row(builder.add(args[1], _I64(1)))
        out_rows = _Rows(context, builder, sig.args[4], args[4])
        dst = out_rows.row(args[5])
        row_length = builder.extract_value(out_rows.shape, 1)

        def for_format(b, per_group):
            def block(w0, lanes):
                _prefetch(builder, following, w0)
                words = _load(builder, source, w0, BLOCK, lanes)
                scale = _group_values(builder, scale_halves, w0, per_group, lanes)
                bias = _group_values(builder, bias_halves, w0, per_group, lanes)
                for field in range(32 // b):
                    q = _field(builder, words, b, field)
                    value = builder.fadd(builder.fmul(q, scale), bias)
                    at = builder.add(builder.mul(_I64(field), stride), w0)
                    _store(builder, value, dst, at, lanes)

            stride = builder.udiv(row_length, _I64(32 // b))
            _over_blocks(builder, nw, block)

        _per_format(builder, *_format(context, builder, sig, args, 2), for_format)
        return context.get_dummy_value()

    return signature, codegen


def _format(context, builder, sig, args, first: int) -> tuple:
    """The (bits, words per group) arguments at args[first:first + 2] as i64."""
    return tuple(
        context.cast(builder, args[i], sig.args[i], types.int64)
        for i in (first, first + 1)
    )


# -- the kernels that kernels.py calls, each on one part (a range of rows) --------
# quantized: (packed, its row stride, scales, row stride, biases, row stride, words
# per row), flat 1-D views (uint32, int16 = float16 bits, int16), row strides in
# elements. Rows in field order have their fields `stride` = row length / lanes
# apart: kernels.py pads x and the loops' outputs with FIELD_PAD values after each
# field (see there).


@_compiled()
def fields_and_sums(x, lanes, group_size, x_fields, x_sums):
    """x (T, k) -> x_fields (T, lanes * stride) in field order, field l of row t at
    x_fields[t, l * stride : l * stride + k / lanes] (the rest is padding), and
    x_sums (T, k / group_size), the sum of each group of x."""
    T, k = x.shape
    nw = k // lanes
    stride = x_fields.shape[1] // lanes
    for t in range(T):
        for w in range(nw):
            for field in range(lanes):
                x_fields[t, field * stride + w] = x[t, w * lanes + field]
        for g in range(k // group_size):
            total = float32(0)
            for i in range(g * group_size, (g + 1) * group_size):
                total += x[t, i]
            x_sums[t, g] = total


@_compiled()
def dot_rows(x_fields, x_sums, quantized, bits, words_per_group, lo, hi, out):
    """out[t, j] = x[t] . dequantized row j, for rows lo <= j < hi, up to four t
    per pass over the row."""
    T = x_fields.shape[0]
    for j in range(lo, hi):
        t = 0
        while T - t >= 4:
            ts = (t, t + 1, t + 2, t + 3)
            _row_dots(x_fields, x_sums, ts, quantized, j, bits, words_per_group, out)
            t += 4
        if T - t == 3:
            ts3 = (t, t + 1, t + 2)
            _row_dots(x_fields, x_sums, ts3, quantized, j, bits, words_per_group, out)
        elif T - t == 2:
            ts2 = (t, t + 1)
            _row_dots(x_fields, x_sums, ts2, quantized, j, bits, words_per_group, out)
        elif T - t == 1:
            _row_dots(x_fields, x_sums, (t,), quantized, j, bits, words_per_group, out)


@_compiled()
def sum_rows(x, quantized, rows, bits, words_per_group, out, bias_sums):
    """out[t] += x[t, j] * scale_j * q_j (field order) and bias_sums[t] += x[t, j] *
    bias_j (per group) for j in rows where x[t, j] != 0.

    T = 1: four rows per pass over out, loaded and stored once for the four.
    T > 1: each row unpacked once for up to four of the t where it is nonzero. Each
    pass prefetches the rows of the next one (11008 x 4096 from memory, T = 1, one
    thread, dense x: q4 2.07 -> 1.07-1.26 ms, q8 2.95 -> 1.61-1.97 ms; 10% of x
    nonzero: q4 0.33 -> 0.27 ms)."""
    T = x.shape[0]
    terms = np.empty(max(T, rows.size), np.int64)
    if T == 1:
        count = 0
        for r in range(rows.size):
            if x[0, rows[r]] != 0:
                terms[count] = rows[r]
                count += 1
        last = count - 1
        i = 0
        while count - i >= 4:
            j0, j1, j2, j3 = terms[i], terms[i + 1], terms[i + 2], terms[i + 3]
            _rows_add(
                (x[0, j0], x[0, j1], x[0, j2], x[0, j3]),
                quantized,
                (j0, j1, j2, j3),
                (
                    terms[min(i + 4, last)],
                    terms[min(i + 5, last)],
                    terms[min(i + 6, last)],
                    terms[min(i + 7, last)],
                ),
                bits,
                words_per_group,
                out,
                (0,),
                bias_sums,
            )
            i += 4
        while i < count:
            j0 = terms[i]
            ahead = (terms[min(i + 1, last)],)
            _rows_add(
                (x[0, j0],),
                quantized,
                (j0,),
                ahead,
                bits,
                words_per_group,
                out,
                (0,),
                bias_sums,
            )
            i += 1
        return
    for r in range(rows.size):
        j = rows[r]
        ahead = (rows[min(r + 1, rows.size - 1)],)
        count = 0
        for t in range(T):
            if x[t, j] != 0:
                terms[count] = t
                count += 1
        i = 0
        while count - i >= 4:
            t0, t1, t2, t3 = terms[i], terms[i + 1], terms[i + 2], terms[i + 3]
            _rows_add(
                (x[t0, j], x[t1, j], x[t2, j], x[t3, j]),
                quantized,
                (j,),
                ahead,
                bits,
                words_per_group,
                out,
                (t0, t1, t2, t3),
                bias_sums,
            )
            i += 4
        while i < count:
            t0 = terms[i]
            _rows_add(
                (x[t0, j],),
                quantized,
                (j,),
                ahead,
                bits,
                words_per_group,
                out,
                (t0,),
                bias_sums,
            )
            i += 1


@_compiled()
def dequantize_rows(quantized, rows, bits, words_per_group, lo, hi, out):
    """out[r] = dequantized row rows[r] in field order, for lo <= r < hi."""
    for r in range(lo, hi):
        _dequantize_row(quantized, rows[r], bits, words_per_group, out, r)


@_compiled()
def from_fields(fields, biases, lanes, group_size, out):
    """out[t, w * lanes + l] = fields[t, l * stride + w] + biases[t, (w * lanes + l)
    // group_size]: rows in field order (stride = fields.shape[1] / lanes) back in
    order, with their groups' biases."""
    T, k = out.shape
    nw = k // lanes
    stride = fields.shape[1] // lanes
    for t in range(T):
        for w in range(nw):
            for field in range(lanes):
                j = w * lanes + field
                out[t, j] = fields[t, field * stride + w] + biases[t, j // group_size]
