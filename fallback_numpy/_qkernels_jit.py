"""The compiled loops behind `kernels.py`'s quantized x @ w.T and dequantizing: rows
of 4- or 8-bit integers packed in uint32 words, with a float16 scale and bias per
group (mlx_flashinfer/formats/quantize.py), unpacked in registers and accumulated in
float32. The sums of x @ w are in `_qsums_jit.py`, the vector IR both use in
`_qvector_ir.py`.

Value j of a row is field j % L of word j // L (L = 32 / bits fields per word). The
inner loops take 16 words at a time as one <16 x i32> vector: a shift, a mask and a
conversion give field l of all 16, that is values l, l + L, l + 2L, ... So these
loops see rows in *field order*, row[l * stride + w] = value w * L + l for the nw
words of a row (stride >= nw, see FIELD_PAD): `kernels.py` puts x in that order
once per call, and dequantized rows come out in it; a permutation of the terms of a
dot product changes nothing else.

Callers validate shapes and formats; these loops do not.
"""

from llvmlite import ir
from numba import float32, types
from numba.core import cgutils
from numba.extending import intrinsic

from fallback_numpy._kernels_jit import compiled
from fallback_numpy._qvector_ir import (
    BLOCK,
    F32,
    FLAGS,
    I64,
    Rows,
    floats_from_halves,
    format_args,
    group_values,
    integers,
    ints,
    load,
    over_blocks,
    per_format,
    prefetch,
    quantized_rows,
    store,
    sum_lanes,
    unpacked,
    vector_of,
)

# Values of padding after each field of a row in field order that the loops read or
# write: without it, the 8 fields of 4 rows of outputs (or of x) sit 2 KB apart, in
# two L1 sets, 32 streams in 24 ways (4096 x 4096 q4 at T = 4, one thread: x @ w
# 15.1 -> 3.6 ms, x @ w.T 2.7 -> 2.2 ms).
FIELD_PAD = 16


@intrinsic
def _row_dots(
    typingctx, x_fields, x_sums, ts, quantized, j, bits, words_per_group, out
):
    """out[t, j] = x[t] . dequantized row j of `quantized` for each t in the tuple
    ts: per group, scale * sum(x * q) + bias * sum(x), with x_fields (T, k) in field
    order and x_sums (T, groups). The q are unpacked once for all t."""
    if not (isinstance(ts, types.UniTuple) and integers(j, bits, words_per_group)):
        return None
    count = ts.count
    signature = types.none(
        x_fields, x_sums, ts, quantized, j, bits, words_per_group, out
    )

    def codegen(context, builder, sig, args):
        rows = ints(builder, args[2], count)
        x_rows = Rows(context, builder, sig.args[0], args[0])
        xs = [x_rows.row(t) for t in rows]
        sum_rows = Rows(context, builder, sig.args[1], args[1])
        sums_of_x = [sum_rows.row(t) for t in rows]
        packed, scales, biases, nw = quantized_rows(
            context, builder, sig.args[3], args[3]
        )
        source, halves, bias_halves = (a.row(args[4]) for a in (packed, scales, biases))
        # the next row's words, a row ahead: the kernel computes more than it
        # reads, and the hardware prefetcher alone left latency in its way (4096 x
        # 4096 from memory, one thread, medians of 5 runs: q4 0.75 -> 0.68 ms, q8
        # 0.97 -> 0.85 ms on a busy machine; 2 and 4 rows ahead did no better)
        following = packed.row(builder.add(args[4], I64(1)))
        row_length = builder.extract_value(x_rows.shape, 1)
        zero = ir.Constant(vector_of(F32), None)
        totals = [cgutils.alloca_once_value(builder, zero) for _ in range(count)]

        def for_format(b, per_group):
            def block(w0, lanes):
                prefetch(builder, following, w0)
                words = load(builder, source, w0, BLOCK, lanes)
                scale = group_values(builder, halves, w0, per_group, lanes)
                parts = [None] * count
                for field in range(32 // b):
                    q = unpacked(builder, words, b, field)
                    at = builder.add(builder.mul(I64(field), stride), w0)
                    for t in range(count):
                        x = load(builder, xs[t], at, BLOCK, lanes)
                        term = builder.fmul(x, q, flags=FLAGS)
                        if parts[t] is not None:
                            term = builder.fadd(parts[t], term, flags=FLAGS)
                        parts[t] = term
                for t in range(count):
                    scaled = builder.fmul(scale, parts[t], flags=FLAGS)
                    total = builder.fadd(builder.load(totals[t]), scaled, flags=FLAGS)
                    builder.store(total, totals[t])

            stride = builder.udiv(row_length, I64(32 // b))
            over_blocks(builder, nw, block)

        per_format(builder, *format_args(context, builder, sig, args, 5), for_format)

        def bias_block(g0, lanes):
            bias = floats_from_halves(
                builder, load(builder, bias_halves, g0, BLOCK, lanes)
            )
            for t in range(count):
                x_sum = load(builder, sums_of_x[t], g0, BLOCK, lanes)
                term = builder.fmul(bias, x_sum, flags=FLAGS)
                total = builder.fadd(builder.load(totals[t]), term, flags=FLAGS)
                builder.store(total, totals[t])

        over_blocks(builder, builder.extract_value(sum_rows.shape, 1), bias_block)
        out_rows = Rows(context, builder, sig.args[7], args[7])
        for t in range(count):
            dst = builder.gep(out_rows.row(rows[t]), [args[4]])
            builder.store(sum_lanes(builder, builder.load(totals[t])), dst)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def _dequantize_row(typingctx, quantized, j, bits, words_per_group, out, r):
    """out[r] (field order) = scale * q + bias of row j of `quantized`, rounded as
    NumPy rounds it (a product, then a sum: no fused multiply-add), so that the
    values equal `quantize.dequantize`'s exactly."""
    if not integers(j, bits, words_per_group, r):
        return None
    signature = types.none(quantized, j, bits, words_per_group, out, r)

    def codegen(context, builder, sig, args):
        packed, scales, biases, nw = quantized_rows(
            context, builder, sig.args[0], args[0]
        )
        source, scale_halves, bias_halves = (
            a.row(args[1]) for a in (packed, scales, biases)
        )
        following = packed.row(builder.add(args[1], I64(1)))
        out_rows = Rows(context, builder, sig.args[4], args[4])
        dst = out_rows.row(args[5])
        row_length = builder.extract_value(out_rows.shape, 1)

        def for_format(b, per_group):
            def block(w0, lanes):
                prefetch(builder, following, w0)
                words = load(builder, source, w0, BLOCK, lanes)
                scale = group_values(builder, scale_halves, w0, per_group, lanes)
                bias = group_values(builder, bias_halves, w0, per_group, lanes)
                for field in range(32 // b):
                    q = unpacked(builder, words, b, field)
                    value = builder.fadd(builder.fmul(q, scale), bias)
                    at = builder.add(builder.mul(I64(field), stride), w0)
                    store(builder, value, dst, at, lanes)

            stride = builder.udiv(row_length, I64(32 // b))
            over_blocks(builder, nw, block)

        per_format(builder, *format_args(context, builder, sig, args, 2), for_format)
        return context.get_dummy_value()

    return signature, codegen


# -- the kernels that kernels.py calls, each on one part (a range of rows) --------
# quantized: (packed, its row stride, scales, row stride, biases, row stride, words
# per row), flat 1-D views (uint32, int16 = float16 bits, int16), row strides in
# elements. Rows in field order have their fields `stride` = row length / lanes
# apart: kernels.py pads x and the loops' outputs with FIELD_PAD values after each
# field (see there).


@compiled()
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


@compiled()
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


@compiled()
def dequantize_rows(quantized, bits, words_per_group, rows, lo, hi, out):
    """out[r] = dequantized row rows[r] in field order, for lo <= r < hi."""
    for r in range(lo, hi):
        _dequantize_row(quantized, rows[r], bits, words_per_group, out, r)


@compiled()
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
