"""The compiled loops behind `kernels.py`'s quantized matmuls: rows of 4- or 8-bit
integers packed in uint32 words, with a float16 scale and bias per group
(mlx_flashinfer/quantize.py), unpacked in registers and accumulated in float32.

Value j of a row is field j % L of word j // L (L = 32 / bits fields per word). The
inner loops take 16 words at a time as one <16 x i32> vector: a shift, a mask and a
conversion give field l of all 16, that is values l, l + L, l + 2L, ... So these
loops see rows in *field order*, row[l * nw + w] = value w * L + l (nw words per
row): `kernels.py` puts x in that order once per call, and dequantized rows come
out in it; a permutation of the terms of a dot product changes nothing else.

The inner loops are LLVM vector IR (numba intrinsics), not plain numba loops: LLVM's
auto-vectorizer widened numba's uint32 arithmetic to 64-bit lanes, scattered the
per-word scales with vscatter, or stayed scalar, depending on the group size (q8
with groups of 64 ran 1.5 ms against 0.35 ms per 4096 x 4096 matrix written as
below). Blocks of 16 words load with plain loads; only a row's last, partial block
uses masked loads and stores (a row may end where its buffer ends; masked loads on
every block ran 4-7x slower from memory here).

Callers validate shapes and formats; these loops do not.
"""

import numpy as np
from llvmlite import ir
from numba import float32, types
from numba.core import cgutils
from numba.extending import intrinsic

from mlx_flashinfer.quantize import BITS, GROUP_SIZES

from ._kernels_jit import _FAST, HARDWARE_FLOAT16, _compiled, widened

BLOCK = 16  # words per vector block
FORMATS = [(bits, size * bits // 32) for bits in BITS for size in GROUP_SIZES]
_F32 = ir.FloatType()
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_FLAGS = ("reassoc", "contract")  # as _FAST: any order, fused multiply-add


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
    element = vector_type.element
    suffix = "f32" if element == _F32 else f"i{element.width}"
    name = f"llvm.masked.{what}.v{vector_type.count}{suffix}.p0"
    pointer = arguments[1] if what == "store" else arguments[0]
    if what == "load":
        mask = ir.VectorType(ir.IntType(1), vector_type.count)
        fnty = ir.FunctionType(vector_type, [pointer.type, _I32, mask, vector_type])
    else:
        mask = ir.VectorType(ir.IntType(1), vector_type.count)
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


def _over_blocks(builder, nw, bits, words_per_group, body) -> None:
    """body(bits, words_per_group, w0, lanes) for each block of 16 words of a row of
    nw, with the row's format as Python ints: the vector code needs them as
    constants, so each format of quantize.py gets its own loop, chosen by a switch
    on the run-time values (i64). lanes is None for full blocks, the i1 vector of
    the words that exist for a last partial one."""
    key = builder.add(builder.mul(bits, _I64(1000)), words_per_group)
    end = builder.append_basic_block("format.end")
    switch = builder.switch(key, end)  # another format: nothing (kernels.py checks)
    for b, per_group in FORMATS:
        case = builder.append_basic_block(f"format.{b}.{per_group}")
        switch.add_case(_I64(b * 1000 + per_group), case)
        builder.position_at_end(case)
        full = builder.udiv(nw, _I64(BLOCK))
        with cgutils.for_range(builder, full) as loop:
            body(b, per_group, builder.mul(loop.index, _I64(BLOCK)), None)
        w0 = builder.mul(full, _I64(BLOCK))
        left = builder.sub(nw, w0)
        with builder.if_then(builder.icmp_signed(">", left, _I64(0)), likely=False):
            lane_ids = _constant_vector(_I64, range(BLOCK))
            lanes = builder.icmp_signed("<", lane_ids, _splat(builder, left))
            body(b, per_group, w0, lanes)
        builder.branch(end)
    builder.position_at_end(end)


def _format(context, builder, sig, args, first: int) -> tuple:
    """The (bits, words per group) arguments at args[first:first + 2] as i64."""
    return tuple(
        context.cast(builder, args[i], sig.args[i], types.int64)
        for i in (first, first + 1)
    )


def _sum_lanes(builder, vector):
    """Sum of the lanes of a <16 x float>, as a tree."""
    count = vector.type.count
    while count > 1:
        count //= 2
        low = _shuffle(builder, vector, range(count))
        high = _shuffle(builder, vector, range(count, 2 * count))
        vector = builder.fadd(low, high, flags=_FLAGS)
    return builder.extract_element(vector, _I32(0))


def _data(context, builder, array_type, value):
    return context.make_array(array_type)(context, builder, value).data


def _integers(*values) -> bool:
    return all(isinstance(value, types.Integer) for value in values)


@intrinsic
def _row_dots(typingctx, x_rows, words, scales, bits, words_per_group):
    """For each of T rows of x in field order (a UniTuple of 1-D float32 arrays):
    sum over groups g of scale_g * sum_{j in g} x[j] * q[j], over one quantized row
    (words: its nw uint32 words; scales: its float16 scales as int16). Returns a
    UniTuple of T float32. The q are unpacked once for all T."""
    if not (isinstance(x_rows, types.UniTuple) and _integers(bits, words_per_group)):
        return None
    count = x_rows.count
    signature = types.UniTuple(types.float32, count)(
        x_rows, words, scales, bits, words_per_group
    )

    def codegen(context, builder, sig, args):
        x_type, words_type, scales_type = sig.args[:3]
        xs = [
            _data(context, builder, x_type.dtype, builder.extract_value(args[0], t))
            for t in range(count)
        ]
        source = context.make_array(words_type)(context, builder, args[1])
        nw = builder.extract_value(source.shape, 0)
        halves = _data(context, builder, scales_type, args[2])
        zero = ir.Constant(_vector(_F32), None)
        sums = [cgutils.alloca_once_value(builder, zero) for _ in range(count)]

        def block(b, per_group, w0, lanes):
            packed = _load(builder, source.data, w0, BLOCK, lanes)
            scale = _group_values(builder, halves, w0, per_group, lanes)
            parts = [None] * count
            for field in range(32 // b):
                q = _field(builder, packed, b, field)
                at = builder.add(builder.mul(_I64(field), nw), w0)
                for t in range(count):
                    term = builder.fmul(
                        _load(builder, xs[t], at, BLOCK, lanes), q, flags=_FLAGS
                    )
                    parts[t] = (
                        term
                        if parts[t] is None
                        else builder.fadd(parts[t], term, flags=_FLAGS)
                    )
            for t in range(count):
                scaled = builder.fmul(scale, parts[t], flags=_FLAGS)
                total = builder.fadd(builder.load(sums[t]), scaled, flags=_FLAGS)
                builder.store(total, sums[t])

        _over_blocks(builder, nw, *_format(context, builder, sig, args, 3), block)
        totals = [_sum_lanes(builder, builder.load(s)) for s in sums]
        return context.make_tuple(builder, sig.return_type, totals)

    return signature, codegen


@intrinsic
def _rows_add(typingctx, coefficients, words, scales, outs, bits, words_per_group):
    """outs[u] += sum over rows r of coefficients[r * U + u] * scale_r * q_r: R
    quantized rows (UniTuples of their words and int16 scales) into U float32 rows
    in field order (a UniTuple), biases left out. Each q is unpacked once for all
    U outputs, each output loaded and stored once for all R rows."""
    if not (
        isinstance(words, types.UniTuple)
        and isinstance(outs, types.UniTuple)
        and _integers(bits, words_per_group)
    ):
        return None
    rows, targets = words.count, outs.count
    signature = types.none(coefficients, words, scales, outs, bits, words_per_group)

    def codegen(context, builder, sig, args):
        _, words_type, scales_type, outs_type = sig.args[:4]
        coefficient = [builder.extract_value(args[0], i) for i in range(rows * targets)]
        sources = [
            context.make_array(words_type.dtype)(
                context, builder, builder.extract_value(args[1], r)
            )
            for r in range(rows)
        ]
        nw = builder.extract_value(sources[0].shape, 0)
        halves = [
            _data(
                context, builder, scales_type.dtype, builder.extract_value(args[2], r)
            )
            for r in range(rows)
        ]
        dsts = [
            _data(context, builder, outs_type.dtype, builder.extract_value(args[3], u))
            for u in range(targets)
        ]

        def block(b, per_group, w0, lanes):
            packed, weight = [], []
            for r in range(rows):
                packed.append(_load(builder, sources[r].data, w0, BLOCK, lanes))
                scale = _group_values(builder, halves[r], w0, per_group, lanes)
                weight.append(
                    [
                        builder.fmul(
                            _splat(builder, coefficient[r * targets + u]),
                            scale,
                            flags=_FLAGS,
                        )
                        for u in range(targets)
                    ]
                )
            for field in range(32 // b):
                qs = [_field(builder, packed[r], b, field) for r in range(rows)]
                at = builder.add(builder.mul(_I64(field), nw), w0)
                for u in range(targets):
                    total = _load(builder, dsts[u], at, BLOCK, lanes)
                    for r in range(rows):
                        term = builder.fmul(weight[r][u], qs[r], flags=_FLAGS)
                        total = builder.fadd(total, term, flags=_FLAGS)
                    _store(builder, total, dsts[u], at, lanes)

        _over_blocks(builder, nw, *_format(context, builder, sig, args, 4), block)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _dequantize_row(typingctx, words, scales, biases, out, bits, words_per_group):
    """out (float32, field order) = scale * q + bias of one quantized row, rounded
    as NumPy rounds it (a product, then a sum: no fused multiply-add), so that the
    values equal `quantize.dequantize`'s exactly."""
    if not _integers(bits, words_per_group):
        return None
    signature = types.none(words, scales, biases, out, bits, words_per_group)

    def codegen(context, builder, sig, args):
        source = context.make_array(sig.args[0])(context, builder, args[0])
        nw = builder.extract_value(source.shape, 0)
        scale_halves = _data(context, builder, sig.args[1], args[1])
        bias_halves = _data(context, builder, sig.args[2], args[2])
        dst = _data(context, builder, sig.args[3], args[3])

        def block(b, per_group, w0, lanes):
            packed = _load(builder, source.data, w0, BLOCK, lanes)
            scale = _group_values(builder, scale_halves, w0, per_group, lanes)
            bias = _group_values(builder, bias_halves, w0, per_group, lanes)
            for field in range(32 // b):
                q = _field(builder, packed, b, field)
                value = builder.fadd(builder.fmul(q, scale), bias)
                at = builder.add(builder.mul(_I64(field), nw), w0)
                _store(builder, value, dst, at, lanes)

        _over_blocks(builder, nw, *_format(context, builder, sig, args, 4), block)
        return context.get_dummy_value()

    return signature, codegen


# -- the kernels that kernels.py calls, each on one part (a range of rows) --------


@_compiled(fastmath=_FAST)
def fields_and_sums(x, lanes, group_size, x_fields, x_sums):
    """x (T, k) -> x_fields (T, k) in field order (`lanes` fields per word) and
    x_sums (T, k / group_size), the sum of each group of x."""
    T, k = x.shape
    nw = k // lanes
    for t in range(T):
        for w in range(nw):
            for field in range(lanes):
                x_fields[t, field * nw + w] = x[t, w * lanes + field]
        for g in range(k // group_size):
            total = float32(0)
            for i in range(g * group_size, (g + 1) * group_size):
                total += x[t, i]
            x_sums[t, g] = total


@_compiled(fastmath=_FAST)
def _bias_dot(biases, sums):
    """sum_g bias_g * sums[g] (float16 biases as int16 bits)."""
    total = float32(0)
    for g in range(sums.size):
        total += widened(biases[g]) * sums[g]
    return total


@_compiled(fastmath=_FAST)
def dot_rows(x_fields, x_sums, quantized, bits, words_per_group, lo, hi, out):
    """out[t, j] = x[t] . dequantized row j, for rows lo <= j < hi: per group,
    scale * (x . q) + bias * sum(x). quantized: (packed, scales, biases) flat 1-D
    views (uint32, int16, int16) and their row strides in elements."""
    packed, p_stride, scales, s_stride, biases, b_stride = quantized
    T = x_fields.shape[0]
    nw = x_fields.shape[1] * bits // 32
    groups = x_sums.shape[1]
    for j in range(lo, hi):
        words = packed[j * p_stride : j * p_stride + nw]
        s = scales[j * s_stride : j * s_stride + groups]
        b = biases[j * b_stride : j * b_stride + groups]
        t = 0
        while T - t >= 4:
            x4 = (x_fields[t], x_fields[t + 1], x_fields[t + 2], x_fields[t + 3])
            d = _row_dots(x4, words, s, bits, words_per_group)
            out[t, j] = d[0] + _bias_dot(b, x_sums[t])
            out[t + 1, j] = d[1] + _bias_dot(b, x_sums[t + 1])
            out[t + 2, j] = d[2] + _bias_dot(b, x_sums[t + 2])
            out[t + 3, j] = d[3] + _bias_dot(b, x_sums[t + 3])
            t += 4
        if T - t == 3:
            x3 = (x_fields[t], x_fields[t + 1], x_fields[t + 2])
            d = _row_dots(x3, words, s, bits, words_per_group)
            out[t, j] = d[0] + _bias_dot(b, x_sums[t])
            out[t + 1, j] = d[1] + _bias_dot(b, x_sums[t + 1])
            out[t + 2, j] = d[2] + _bias_dot(b, x_sums[t + 2])
        elif T - t == 2:
            x2 = (x_fields[t], x_fields[t + 1])
            d = _row_dots(x2, words, s, bits, words_per_group)
            out[t, j] = d[0] + _bias_dot(b, x_sums[t])
            out[t + 1, j] = d[1] + _bias_dot(b, x_sums[t + 1])
        elif T - t == 1:
            d = _row_dots((x_fields[t],), words, s, bits, words_per_group)
            out[t, j] = d[0] + _bias_dot(b, x_sums[t])


@_compiled(fastmath=_FAST)
def _add_biases(a, biases, sums):
    """sums[g] += a * bias_g (float16 biases as int16 bits)."""
    for g in range(sums.size):
        sums[g] += a * widened(biases[g])


@_compiled(fastmath=_FAST)
def sum_rows(x, quantized, rows, bits, words_per_group, out, bias_sums):
    """out[t] += x[t, j] * scale_j * q_j (field order, per group) and bias_sums[t] +=
    x[t, j] * bias_j (per group) for j in rows where x[t, j] != 0.

    T = 1: four rows per pass over out, which is loaded and stored once for the
    four. T > 1: each row unpacked once for up to four of the t where it is
    nonzero."""
    packed, p_stride, scales, s_stride, biases, b_stride = quantized
    T = x.shape[0]
    nw = out.shape[1] * bits // 32
    groups = bias_sums.shape[1]
    terms = np.empty(max(T, rows.size), np.int64)
    if T == 1:
        count = 0
        for r in range(rows.size):
            if x[0, rows[r]] != 0:
                terms[count] = rows[r]
                count += 1
        i = 0
        while i < count:
            n = 4 if count - i >= 4 else 1
            for j in terms[i : i + n]:
                b = biases[j * b_stride : j * b_stride + groups]
                _add_biases(x[0, j], b, bias_sums[0])
            j0 = terms[i]
            w0 = packed[j0 * p_stride : j0 * p_stride + nw]
            s0 = scales[j0 * s_stride : j0 * s_stride + groups]
            if n == 1:
                _rows_add((x[0, j0],), (w0,), (s0,), (out[0],), bits, words_per_group)
            else:
                j1, j2, j3 = terms[i + 1], terms[i + 2], terms[i + 3]
                _rows_add(
                    (x[0, j0], x[0, j1], x[0, j2], x[0, j3]),
                    (
                        w0,
                        packed[j1 * p_stride : j1 * p_stride + nw],
                        packed[j2 * p_stride : j2 * p_stride + nw],
                        packed[j3 * p_stride : j3 * p_stride + nw],
                    ),
                    (
                        s0,
                        scales[j1 * s_stride : j1 * s_stride + groups],
                        scales[j2 * s_stride : j2 * s_stride + groups],
                        scales[j3 * s_stride : j3 * s_stride + groups],
                    ),
                    (out[0],),
                    bits,
                    words_per_group,
                )
            i += n
        return
    for r in range(rows.size):
        j = rows[r]
        w = packed[j * p_stride : j * p_stride + nw]
        s = scales[j * s_stride : j * s_stride + groups]
        b = biases[j * b_stride : j * b_stride + groups]
        count = 0
        for t in range(T):
            if x[t, j] != 0:
                terms[count] = t
                count += 1
                _add_biases(x[t, j], b, bias_sums[t])
        i = 0
        while count - i >= 4:
            t0, t1, t2, t3 = terms[i], terms[i + 1], terms[i + 2], terms[i + 3]
            _rows_add(
                (x[t0, j], x[t1, j], x[t2, j], x[t3, j]),
                (w,),
                (s,),
                (out[t0], out[t1], out[t2], out[t3]),
                bits,
                words_per_group,
            )
            i += 4
        while i < count:
            t0 = terms[i]
            _rows_add((x[t0, j],), (w,), (s,), (out[t0],), bits, words_per_group)
            i += 1


@_compiled()
def dequantize_rows(quantized, rows, bits, words_per_group, lo, hi, out):
    """out[r] = dequantized row rows[r] in field order, for lo <= r < hi."""
    packed, p_stride, scales, s_stride, biases, b_stride = quantized
    nw = out.shape[1] * bits // 32
    groups = nw // words_per_group
    for r in range(lo, hi):
        j = rows[r]
        _dequantize_row(
            packed[j * p_stride : j * p_stride + nw],
            scales[j * s_stride : j * s_stride + groups],
            biases[j * b_stride : j * b_stride + groups],
            out[r],
            bits,
            words_per_group,
        )


@_compiled()
def from_fields(fields, biases, lanes, group_size, out):
    """out[t, w * lanes + l] = fields[t, l * nw + w] + biases[t, (w * lanes + l) //
    group_size]: rows in field order back in order, with their groups' biases."""
    T, k = fields.shape
    nw = k // lanes
    for t in range(T):
        for w in range(nw):
            for field in range(lanes):
                j = w * lanes + field
                out[t, j] = fields[t, field * nw + w] + biases[t, j // group_size]
