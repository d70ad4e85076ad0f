"""The compiled sums behind `kernels.py`'s quantized x @ w (a ReLU model's down
projection over neuron rows): out[t] += x[t, j] * scale_j * q_j over the rows j where
x[t, j] != 0, the rows unpacked in registers (`_qvector_ir.py`) and the outputs kept
in field order, as `_qkernels_jit.py` describes; the terms of the biases summed per
group beside them.

Callers validate shapes and formats; these loops do not.
"""

import numpy as np
from numba import types
from numba.extending import intrinsic

from fallback_numpy._kernels_jit import compiled, nonzero_terms
from fallback_numpy._qvector_ir import (
    BLOCK,
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
    splat,
    store,
    unpacked,
)


@intrinsic
def _rows_add(
    typingctx, factors, quantized, js, following, bits, words_per_group, out, ts, sums
):
    """For R rows js of `quantized` and U rows ts of out (T, k) in field order and
    of sums (T, groups) of bias terms: out[t_u] += sum_r factors[r * U + u] *
    scale_r * q_r and sums[t_u] += sum_r factors[r * U + u] * bias_r. Each q is
    unpacked once for all U outputs, each output loaded and stored once for all R
    rows. The R rows `following` (those of the caller's next pass) are prefetched
    meanwhile."""
    if not (
        isinstance(js, types.UniTuple)
        and isinstance(ts, types.UniTuple)
        and integers(bits, words_per_group)
    ):
        return None
    rows, targets = js.count, ts.count
    signature = types.none(
        factors, quantized, js, following, bits, words_per_group, out, ts, sums
    )

    def codegen(context, builder, sig, args):
        weight = ints(builder, args[0], rows * targets)
        js = ints(builder, args[2], rows)
        packed, scales, biases, nw = quantized_rows(
            context, builder, sig.args[1], args[1]
        )
        sources = [packed.row(j) for j in js]
        halves = [scales.row(j) for j in js]
        bias_halves = [biases.row(j) for j in js]
        ahead = [packed.row(j) for j in ints(builder, args[3], rows)]
        ts = ints(builder, args[7], targets)
        out_rows = Rows(context, builder, sig.args[6], args[6])
        dsts = [out_rows.row(t) for t in ts]
        sum_rows = Rows(context, builder, sig.args[8], args[8])
        bias_dsts = [sum_rows.row(t) for t in ts]
        row_length = builder.extract_value(out_rows.shape, 1)

        def for_format(b, per_group):
            def block(w0, lanes):
                words, factors = [], []
                for r in range(rows):
                    prefetch(builder, ahead[r], w0)
                    words.append(load(builder, sources[r], w0, BLOCK, lanes))
                    scale = group_values(builder, halves[r], w0, per_group, lanes)
                    factors.append(
                        [
                            builder.fmul(
                                splat(builder, weight[r * targets + u]),
                                scale,
                                flags=FLAGS,
                            )
                            for u in range(targets)
                        ]
                    )
                for field in range(32 // b):
                    qs = [unpacked(builder, words[r], b, field) for r in range(rows)]
                    at = builder.add(builder.mul(I64(field), stride), w0)
                    for u in range(targets):
                        total = load(builder, dsts[u], at, BLOCK, lanes)
                        for r in range(rows):
                            term = builder.fmul(factors[r][u], qs[r], flags=FLAGS)
                            total = builder.fadd(total, term, flags=FLAGS)
                        store(builder, total, dsts[u], at, lanes)

            stride = builder.udiv(row_length, I64(32 // b))
            over_blocks(builder, nw, block)

        per_format(builder, *format_args(context, builder, sig, args, 4), for_format)

        def bias_block(g0, lanes):
            bias = [
                floats_from_halves(builder, load(builder, h, g0, BLOCK, lanes))
                for h in bias_halves
            ]
            for u in range(targets):
                total = load(builder, bias_dsts[u], g0, BLOCK, lanes)
                for r in range(rows):
                    factor = splat(builder, weight[r * targets + u])
                    term = builder.fmul(factor, bias[r], flags=FLAGS)
                    total = builder.fadd(total, term, flags=FLAGS)
                store(builder, total, bias_dsts[u], g0, lanes)

        over_blocks(builder, builder.extract_value(sum_rows.shape, 1), bias_block)
        return context.get_dummy_value()

    return signature, codegen


@compiled()
def sum_rows(x, quantized, bits, words_per_group, rows, out, bias_sums):
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
        count = nonzero_terms(x, j, terms)
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
