"""The quantized matmul kernels (fallback_numpy/kernels.py: qmatmul_t, qmatmul,
dequantize) against float64 references over quantize.dequantize's values: every
dispatch path (compiled loops at small T, dequantize-then-BLAS at large T), both bit
widths and every group size, rows that end in a partial block of 16 words, strided
views into interleaved records, zeros in x, any thread count.

Error bound: the loops compute, per group, scale * sum(x * q) + bias * sum(x) (float32
sums of up to m terms in any order, then a product and a sum per group); the large-T
paths round each weight to float32 once (as quantize.dequantize does) and sum in
BLAS's order. Either stays within (m + 3) * eps32 * sum_j |x_j| (|scale| q_j +
|bias|) of the float64 sum of x * dequantize(q), the + 3 covering the rounding of the
reference's own float32 weights and the products and sums per group, plus m * 2**-149
for products in float32's subnormal range.
"""

import kernel_tuning
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from fallback_numpy import _qvector_ir, backend, kernels
from mlx_flashinfer.formats.quantize import Quantized, dequantize, quantize, unpack

EPS32 = float(np.finfo(np.float32).eps)
TINY32 = 2.0**-149
FORMATS = [(bits, size) for bits in (4, 8) for size in (32, 64, 128)]


def quantized(rng, n: int, k: int, bits: int, group_size: int, bundled: bool):
    """A quantized (n, k) matrix of random weights (rows of very different sizes).
    bundled: its packed words, scales and biases are views into one uint8 record
    per row, between bytes of 0xFF (float16 nan): a kernel that read past a row's
    words, scales or biases would meet them."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    w *= rng.choice([1e-3, 1.0, 30.0], size=(n, 1)).astype(np.float32)
    w += rng.choice([0.0, 5.0], size=(n, 1)).astype(np.float32)  # one-signed rows
    packed, scales, biases = quantize(w, bits, group_size)
    if not bundled:
        return Quantized(packed, scales, biases, bits, group_size)
    parts = (packed.view(np.uint8), scales.view(np.uint8), biases.view(np.uint8))
    gap = 4  # bytes of 0xFF before each part and at the end of a record
    records = np.full((n, sum(p.shape[1] + gap for p in parts) + gap), 0xFF, np.uint8)
    views, start = [], gap
    for part, dtype in zip(parts, (np.uint32, np.float16, np.float16), strict=True):
        records[:, start : start + part.shape[1]] = part
        views.append(records[:, start : start + part.shape[1]].view(dtype))
        start += part.shape[1] + gap
    return Quantized(*views, bits, group_size)


def reference(q: Quantized) -> tuple[np.ndarray, np.ndarray]:
    """float64 values of quantize.dequantize's weights, and the magnitude of each
    term as the kernels form it, |scale| q + |bias|."""
    values = dequantize(q.packed, q.scales, q.biases, q.bits, q.group_size)
    ints = unpack(q.packed, q.bits).astype(np.float64)
    n, k = ints.shape
    groups = ints.reshape(n, -1, q.group_size)
    s = np.abs(q.scales.astype(np.float64))[..., None]
    b = np.abs(q.biases.astype(np.float64))[..., None]
    return values.astype(np.float64), (groups * s + b).reshape(n, k)


def assert_within_bound(got, x, weights, magnitude, transposed: bool) -> None:
    """got == x @ weights.T (transposed) or x @ weights in float64, within the bound
    of the module docstring."""
    x64 = x.astype(np.float64)
    if transposed:
        ref, size, m = x64 @ weights.T, np.abs(x64) @ magnitude.T, weights.shape[1]
    else:
        ref, size, m = x64 @ weights, np.abs(x64) @ magnitude, weights.shape[0]
    assert got.dtype == np.float32 and got.shape == ref.shape
    bound = (m + 3) * EPS32 * size + m * TINY32
    err = np.abs(got - ref)
    assert np.all(err <= bound), f"error {err.max()} over bound {bound[err.argmax()]}"


def tuned(block_rows: int | None, k: int, threads: int, path: str = "auto"):
    """`kernel_tuning.tuned` with these kernels' path limits."""
    limits = ("QDOT_ROWS_MAX_T", "QSUM_ROWS_MAX_TERMS")
    return kernel_tuning.tuned(block_rows, k, threads, path, limits)


formats = st.sampled_from(FORMATS)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    fmt=formats,
    t=st.integers(1, 20),
    n=st.integers(1, 40),
    groups=st.integers(1, 7),
    bundled=st.booleans(),
    zeros=st.sampled_from([0.0, 0.5]),
    block_rows=st.sampled_from([None, 1, 7]),
    threads=st.sampled_from([1, 2, 3]),
    path=st.sampled_from(["auto", "loops", "blas"]),
)
def test_qmatmul_t_matches_float64(
    seed, fmt, t, n, groups, bundled, zeros, block_rows, threads, path
):
    bits, group_size = fmt
    rng = np.random.default_rng(seed)
    k = groups * group_size
    q = quantized(rng, n, k, bits, group_size, bundled)
    x = rng.standard_normal((t, k)).astype(np.float32)
    x[rng.random(x.shape) < zeros] = 0
    with tuned(block_rows, k, threads, path):
        got = kernels.qmatmul_t(x, q)
    assert_within_bound(got, x, *reference(q), transposed=True)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    fmt=formats,
    t=st.integers(1, 20),
    n=st.integers(1, 60),
    groups=st.integers(1, 5),
    bundled=st.booleans(),
    zeros=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    block_rows=st.sampled_from([None, 1, 7]),
    threads=st.sampled_from([1, 2, 3]),
    path=st.sampled_from(["auto", "loops", "blas"]),
)
def test_qmatmul_matches_float64(
    seed, fmt, t, n, groups, bundled, zeros, block_rows, threads, path
):
    bits, group_size = fmt
    rng = np.random.default_rng(seed)
    k = groups * group_size
    q = quantized(rng, n, k, bits, group_size, bundled)
    x = rng.standard_normal((t, n)).astype(np.float32)
    x[rng.random(x.shape) < zeros] = 0
    with tuned(block_rows, k, threads, path):
        got = kernels.qmatmul(x, q)
    assert_within_bound(got, x, *reference(q), transposed=False)


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    fmt=formats,
    n=st.integers(1, 30),
    groups=st.integers(1, 7),
    bundled=st.booleans(),
    threads=st.sampled_from([1, 3]),
)
def test_dequantize_equals_the_reference_exactly(
    seed, fmt, n, groups, bundled, threads
):
    bits, group_size = fmt
    rng = np.random.default_rng(seed)
    q = quantized(rng, n, groups * group_size, bits, group_size, bundled)
    with tuned(None, groups * group_size, threads):
        got = kernels.dequantize(q)
    expected = dequantize(q.packed, q.scales, q.biases, bits, group_size)
    np.testing.assert_array_equal(got, expected)


def test_zero_terms_of_x_are_skipped():
    """A row whose x term is 0 is never read: nan in its scales cannot leak."""
    rng = np.random.default_rng(3)
    q = quantized(rng, 8, 64, 4, 32, bundled=False)
    q.scales[2] = np.nan
    q.biases[5] = np.nan
    x = rng.standard_normal((3, 8)).astype(np.float32)
    x[:, [2, 5]] = 0
    got = kernels.qmatmul(x, q)
    assert np.isfinite(got).all()
    keep = np.array([0, 1, 3, 4, 6, 7])
    part = Quantized(q.packed[keep], q.scales[keep], q.biases[keep], 4, 32)
    np.testing.assert_allclose(got, kernels.qmatmul(x[:, keep], part), rtol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_results_do_not_depend_on_the_thread_count(fmt):
    bits, group_size = fmt
    rng = np.random.default_rng(1)
    q = quantized(rng, 50, 3 * group_size, bits, group_size, bundled=True)
    x = rng.standard_normal((3, 3 * group_size)).astype(np.float32)
    h = np.maximum(rng.standard_normal((3, 50)).astype(np.float32), 0)
    results = []
    for threads in (1, 2):
        with tuned(None, 3 * group_size, threads):
            results.append(
                (
                    kernels.qmatmul_t(x, q),
                    kernels.qmatmul(h, q),
                    kernels.qmatmul(h[:1], q),
                    kernels.dequantize(q),
                )
            )
    for got, expected in zip(results[1], results[0], strict=True):
        np.testing.assert_array_equal(got, expected)


def test_out_arrays_are_written_and_returned():
    rng = np.random.default_rng(0)
    q = quantized(rng, 5, 64, 8, 32, bundled=False)
    weights = dequantize(q.packed, q.scales, q.biases, 8, 32)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    out = np.full((2, 5), np.nan, np.float32)
    assert kernels.qmatmul_t(x, q, out=out) is out
    np.testing.assert_allclose(out, x @ weights.T, rtol=1e-5, atol=1e-5)
    out = np.full((2, 64), np.nan, np.float32)
    assert kernels.qmatmul(x[:, :5], q, out=out) is out
    np.testing.assert_allclose(out, x[:, :5] @ weights, rtol=1e-5, atol=1e-5)
    out = np.full((5, 64), np.nan, np.float32)
    assert kernels.dequantize(q, out=out) is out
    np.testing.assert_array_equal(out, weights)


def test_empty_shapes():
    q = quantized(np.random.default_rng(0), 0, 64, 4, 64, bundled=False)
    assert kernels.qmatmul_t(np.zeros((3, 64), np.float32), q).shape == (3, 0)
    assert np.array_equal(
        kernels.qmatmul(np.zeros((3, 0), np.float32), q), np.zeros((3, 64))
    )
    assert kernels.dequantize(q).shape == (0, 64)
    q = quantized(np.random.default_rng(0), 4, 64, 4, 64, bundled=False)
    assert kernels.qmatmul_t(np.zeros((0, 64), np.float32), q).shape == (0, 4)


def _q(packed=None, scales=None, biases=None, bits=4, group_size=32):
    return Quantized(
        np.zeros((3, 8), np.uint32) if packed is None else packed,
        np.zeros((3, 2), np.float16) if scales is None else scales,
        np.zeros((3, 2), np.float16) if biases is None else biases,
        bits,
        group_size,
    )


@pytest.mark.parametrize(
    ("x", "q", "message"),
    [
        (np.zeros((1, 64)), _q(), "x must be a 2-D float32"),
        (
            np.zeros((1, 63), np.float32),
            _q(),
            r"x.shape\[1\] must be k = q.shape\[1\] = 64",
        ),
        (np.zeros((1, 64), np.float32), np.zeros((3, 64), np.float16), "Quantized"),
        (np.zeros((1, 64), np.float32), _q(np.zeros((3, 8), np.int32)), "uint32"),
        (np.zeros((1, 64), np.float32), _q(np.zeros(8, np.uint32)), "2-D"),
        (
            np.zeros((1, 64), np.float32),
            _q(scales=np.zeros((3, 2), np.float32)),
            "q.scales must be a float16",
        ),
        (
            np.zeros((1, 64), np.float32),
            _q(biases=np.zeros((3, 4), np.float16)),
            r"q.biases must have shape \(n, k / group_size\) = \(3, 2\)",
        ),
        (
            np.zeros((1, 40), np.float32),
            _q(np.zeros((3, 5), np.uint32)),
            "group size 32 does not divide q's rows of 40 values",
        ),
        (np.zeros((1, 64), np.float32), _q(bits=3), "3-bit quantization"),
        (np.zeros((1, 64), np.float32), _q(group_size=16), "group size 16"),
        (
            np.zeros((1, 32), np.float32),
            _q(
                np.zeros((3, 8), np.uint32)[:, ::2], *[np.zeros((3, 1), np.float16)] * 2
            ),
            "q.packed's rows must be contiguous",
        ),
    ],
)
def test_bad_arguments_are_rejected(x, q, message):
    with pytest.raises(ValueError, match=message):
        kernels.qmatmul_t(x, q)


def test_bad_arguments_are_rejected_by_every_function():
    q = _q(np.zeros((3, 5), np.uint32))  # 40 values, groups of 32
    with pytest.raises(ValueError, match="does not divide"):
        kernels.qmatmul(np.zeros((1, 3), np.float32), q)
    with pytest.raises(ValueError, match="does not divide"):
        kernels.dequantize(q)
    with pytest.raises(ValueError, match=r"x.shape\[1\] must be n = q.shape\[0\] = 3"):
        kernels.qmatmul(np.zeros((1, 4), np.float32), _q())
    with pytest.raises(ValueError, match="out must be"):
        kernels.dequantize(_q(), out=np.zeros((3, 64), np.float64))
    buffer = np.zeros((3, 8), np.uint32)
    with pytest.raises(ValueError, match="overlap"):
        kernels.dequantize(_q(buffer), out=buffer.view(np.float32)[:, :8])


@intrinsic
def _decode_in_software(typingctx, halves, out):
    """out[:16] = float32 of the float16 bits halves[:16], by the bit decoding that
    CPUs without a half -> float instruction get."""

    def codegen(context, builder, signature, args):
        source = context.make_array(signature.args[0])(context, builder, args[0]).data
        dst = context.make_array(signature.args[1])(context, builder, args[1]).data
        vector = ir.VectorType(ir.IntType(16), 16)
        pointer = builder.bitcast(source, vector.as_pointer())
        floats = _qvector_ir.floats_from_halves(
            builder, builder.load(pointer, align=1), hardware=False
        )
        target = builder.bitcast(dst, floats.type.as_pointer())
        builder.store(floats, target, align=1)
        return context.get_dummy_value()

    return types.none(halves, out), codegen


def test_float16_bit_decoding_in_vectors_is_exact_for_every_pattern():
    @njit
    def decode_all(bits, out):
        for i in range(0, bits.size, 16):
            _decode_in_software(bits[i : i + 16], out[i : i + 16])

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    got = np.empty_like(ref)
    decode_all(bits.view(np.int16), got)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


@pytest.mark.parametrize("transpose", [True, False])
def test_backend_linear_and_weight_rows_take_quantized_weights(transpose):
    rng = np.random.default_rng(4)
    q = quantized(rng, 12, 128, 4, 64, bundled=True)
    q.transpose = transpose
    weights = dequantize(q.packed, q.scales, q.biases, 4, 64)
    width = 128 if transpose else 12
    x = rng.standard_normal((3, width)).astype(np.float32)
    bias = rng.standard_normal(12 if transpose else 128).astype(np.float32)
    expected = x @ (weights.T if transpose else weights) + bias
    np.testing.assert_allclose(
        backend.linear(x, q, bias), expected, rtol=1e-4, atol=1e-4
    )
    ids = [3, 0, 3, 11]
    np.testing.assert_array_equal(backend.weight_rows(q, ids), weights[ids])
