"""The 16-bit matmul kernels against float64 references over the exactly widened
weights: every dispatch path (compiled loops at small T, widen-then-BLAS at large T),
strided bundle views, subnormals, inf and nan.

Error bound: float32 accumulation of m terms in any order (plus the block sums of the
large-T paths) stays within (m + 2) * eps32 * sum(|x| |w|), plus m * 2**-149 for
products that fall into float32's subnormal range.
"""

import multiprocessing
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import kernel_tuning
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from fallback_numpy import _kernels_jit, _workers, kernels

KINDS = ("float16", "bfloat16", "float32")
EPS32 = float(np.finfo(np.float32).eps)
TINY32 = 2.0**-149  # smallest float32 subnormal


def exact(stored: np.ndarray) -> np.ndarray:
    """float64 values of stored weights (uint16 = bfloat16 bits)."""
    if stored.dtype == np.uint16:
        return (stored.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return stored.astype(np.float64)


def store(values: np.ndarray, kind: str) -> np.ndarray:
    """float32 values in a stored form (bfloat16: the top 16 bits, truncated)."""
    if kind == "bfloat16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(kind)


def weights(rng, n: int, k: int, kind: str, bundles: int, specials: bool):
    """An (n, k) weight matrix, as part `bundles - 1` of an (n, bundles, k) stored
    block when bundles > 1 (rows contiguous, row stride bundles * k)."""
    values = rng.standard_normal((n, bundles, k)).astype(np.float32)
    values *= rng.choice([1e-3, 1.0, 30.0], size=(n, bundles, 1)).astype(np.float32)
    if specials:  # subnormal (in the stored kind), inf and nan weights
        tiny = {"float16": 2.0**-20, "bfloat16": 2.0**-130, "float32": 2.0**-130}[kind]
        pick = rng.random(values.shape)
        values[pick < 0.05] = np.float32(tiny) * rng.integers(-7, 8)
        values[(pick > 0.05) & (pick < 0.06)] = np.inf
        values[(pick > 0.06) & (pick < 0.07)] = -np.inf
        values[(pick > 0.07) & (pick < 0.08)] = np.nan
    raw = store(values, kind)
    return raw[:, bundles - 1] if bundles > 1 else raw[:, 0].copy()


def activations(rng, shape, zeros: float, specials: bool) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) < zeros] = 0
    if specials:
        pick = rng.random(shape)
        x[pick < 0.01] = np.inf
        x[(pick > 0.01) & (pick < 0.02)] = np.nan
    return x


def assert_close(got: np.ndarray, products: np.ndarray) -> None:
    """got == products.sum(-1) within the bound above; inf and nan where the
    reference has them. products: (T, out, m) float64 terms (skipped ones 0)."""
    assert got.dtype == np.float32 and got.shape == products.shape[:2]
    with np.errstate(invalid="ignore"):
        ref = products.sum(axis=-1)
        magnitude = np.abs(products).sum(axis=-1)
    m = products.shape[-1]
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(got[~finite & ~np.isnan(ref)], ref[np.isinf(ref)])
    bound = (m + 2) * EPS32 * magnitude[finite] + m * TINY32
    err = np.abs(got[finite] - ref[finite])
    assert np.all(err <= bound), f"error {err.max()} over bound {bound[err.argmax()]}"


def tuned(block_rows: int | None, k: int, threads: int, path: str = "auto"):
    """`kernel_tuning.tuned` with these kernels' path limits."""
    limits = ("DOT_ROWS_MAX_T", "SUM_ROWS_MAX_TERMS")
    return kernel_tuning.tuned(block_rows, k, threads, path, limits)


def batch_sizes():
    small = kernels.DOT_ROWS_MAX_T
    return st.sampled_from(sorted({1, 2, 3, small - 1, small, small + 1, 64} - {0}))


@settings(max_examples=400, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(KINDS),
    t=batch_sizes(),
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    bundles=st.sampled_from([1, 3]),
    specials=st.booleans(),
    block_rows=st.sampled_from([None, 1, 7]),
    threads=st.sampled_from([1, 2, 3]),
    path=st.sampled_from(["auto", "loops", "blas"]),
)
def test_matmul_t_matches_float64(
    seed, kind, t, n, k, bundles, specials, block_rows, threads, path
):
    rng = np.random.default_rng(seed)
    w = weights(rng, n, k, kind, bundles, specials)
    x = activations(rng, (t, k), zeros=0.2, specials=specials)
    with tuned(block_rows, k, threads, path):
        got = kernels.matmul_t(x, w)
    with np.errstate(invalid="ignore"):
        products = x.astype(np.float64)[:, None, :] * exact(w)[None, :, :]
    assert_close(got, products)


@settings(max_examples=400, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(KINDS),
    t=batch_sizes(),
    n=st.integers(1, 300),
    k=st.integers(1, 40),
    bundles=st.sampled_from([1, 3]),
    zeros=st.sampled_from([0.0, 0.9, 0.97, 1.0]),
    specials=st.booleans(),
    block_rows=st.sampled_from([None, 1, 7]),
    threads=st.sampled_from([1, 2, 3]),
    path=st.sampled_from(["auto", "loops", "blas"]),
)
def test_matmul_skips_zeros_and_matches_float64(
    seed, kind, t, n, k, bundles, zeros, specials, block_rows, threads, path
):
    rng = np.random.default_rng(seed)
    w = weights(rng, n, k, kind, bundles, specials)
    x = activations(rng, (t, n), zeros=zeros, specials=specials)
    with tuned(block_rows, k, threads, path):
        got = kernels.matmul(x, w)
    # the documented choice: a zero x term contributes 0, even against inf or nan
    with np.errstate(invalid="ignore"):
        products = x.astype(np.float64)[:, :, None] * exact(w)[None, :, :]
    products[np.broadcast_to((x == 0)[:, :, None], products.shape)] = 0
    assert_close(got, products.transpose(0, 2, 1))


@pytest.mark.parametrize("path", ["loops", "blas"])
def test_matmul_zero_times_inf_is_skipped_on_every_path(path):
    w = np.array([[np.inf, 1], [np.nan, 2], [3, 4], [5, 6]], np.float16)
    x = np.zeros((20, 4), np.float32)
    x[:, 2:] = 1
    x[0, 0] = 1  # row 0 is read, for t = 0 only: its inf reaches only that result
    with tuned(None, 2, threads=2, path=path):
        got = kernels.matmul(x, w)
    np.testing.assert_array_equal(got[0], [np.inf, 11])
    np.testing.assert_array_equal(got[1:], np.tile([[8, 10]], (19, 1)))


def test_widen_is_exact_for_every_float16_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    halves = bits.view(np.float16)
    ref = halves.astype(np.float32)
    with tuned(None, 256, threads=3):
        got = kernels.widen(halves)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])
    # the same through a strided view of bundles
    bundled = np.stack([halves, halves[::-1]], axis=1)[:, 1]
    got = kernels.widen(bundled)
    np.testing.assert_array_equal(np.isnan(got), nan[::-1])


def test_float16_bit_decoding_is_exact_for_every_pattern():
    """The decoder used where LLVM has no half -> float instruction (widen above
    uses the instruction where there is one)."""

    @njit
    def decode_all(bits, out):
        for i in range(bits.size):
            out[i] = _kernels_jit._float32_from_float16_bits(bits[i])

    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    got = np.empty_like(ref)
    decode_all(bits.view(np.int16), got)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


def test_widen_is_exact_for_every_bfloat16_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(256, 256)
    ref = (bits.astype(np.uint32) << 16).view(np.float32)
    with tuned(None, 256, threads=3):
        got = kernels.widen(bits)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])


def test_out_arrays_are_written_and_returned():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7)).astype(np.float16)
    x = rng.standard_normal((2, 7)).astype(np.float32)
    out = np.full((2, 5), np.nan, np.float32)
    assert kernels.matmul_t(x, w, out=out) is out
    np.testing.assert_allclose(out, x @ w.astype(np.float32).T, rtol=1e-5, atol=1e-5)
    out = np.full((2, 7), np.nan, np.float32)
    assert kernels.matmul(x[:, :5], w, out=out) is out
    np.testing.assert_allclose(
        out, x[:, :5] @ w.astype(np.float32), rtol=1e-5, atol=1e-5
    )
    out = np.empty((5, 7), np.float32)
    assert kernels.widen(w, out=out) is out
    np.testing.assert_array_equal(out, w.astype(np.float32))


def test_empty_shapes():
    w = np.zeros((4, 0), np.uint16)
    assert np.array_equal(
        kernels.matmul_t(np.zeros((3, 0), np.float32), w), np.zeros((3, 4))
    )
    assert kernels.matmul(np.zeros((3, 4), np.float32), w).shape == (3, 0)
    assert kernels.widen(np.zeros((0, 5), np.float16)).shape == (0, 5)
    assert kernels.matmul_t(
        np.zeros((0, 5), np.float32), np.zeros((2, 5), np.float16)
    ).shape == (0, 2)


@pytest.mark.parametrize(
    ("x", "w", "out", "message"),
    [
        (np.zeros((1, 4)), np.zeros((3, 4), np.float16), None, "float32"),
        (np.zeros((1, 4), np.float32), np.zeros((3, 4), np.int8), None, "dtype"),
        (np.zeros((1, 5), np.float32), np.zeros((3, 4), np.float16), None, "shape"),
        (
            np.zeros((1, 2), np.float32),
            np.zeros((3, 4), np.float16)[:, ::2],
            None,
            "rows",
        ),
        (np.zeros(4, np.float32), np.zeros((3, 4), np.float16), None, "2-D"),
        (
            np.zeros((1, 4), np.float32),
            np.zeros((3, 4), np.float16),
            np.zeros((1, 2)),
            "out",
        ),
    ],
)
def test_bad_arguments_are_rejected(x, w, out, message):
    with pytest.raises(ValueError, match=message):
        kernels.matmul_t(x, w, out=out)


def test_out_overlapping_an_input_is_rejected():
    buffer = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="overlap"):
        kernels.matmul_t(buffer[:1], np.zeros((4, 4), np.float16), out=buffer[:1])
    with pytest.raises(ValueError, match="overlap"):
        kernels.widen(buffer, out=buffer)


def test_results_do_not_depend_on_the_thread_count():
    rng = np.random.default_rng(1)
    w = store(rng.standard_normal((50, 70)).astype(np.float32), "bfloat16")
    x = rng.standard_normal((3, 70)).astype(np.float32)
    h = np.maximum(rng.standard_normal((3, 50)).astype(np.float32), 0)
    results = []
    for threads in (1, 2, 3):
        with tuned(None, 70, threads):
            assert kernels.get_threads() == threads
            results.append((kernels.matmul_t(x, w), kernels.matmul(h, w)))
    for got in results[1:]:  # each output is one thread's, summed in one order
        np.testing.assert_array_equal(got[0], results[0][0])
        np.testing.assert_array_equal(got[1], results[0][1])
    with pytest.raises(ValueError, match="threads"):
        kernels.set_threads(0)


def test_callers_on_several_threads_share_the_workers():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((300, 200)).astype(np.float16)
    xs = [rng.standard_normal((1, 200)).astype(np.float32) for _ in range(8)]
    expected = [kernels.matmul_t(x, w) for x in xs]
    with tuned(None, 200, threads=2), ThreadPoolExecutor(4) as pool:
        for _ in range(20):
            got = list(pool.map(lambda x: kernels.matmul_t(x, w), xs))
            for g, e in zip(got, expected, strict=True):
                np.testing.assert_array_equal(g, e)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_its_own_workers():
    w = np.ones((64, 32), np.float16)
    x = np.ones((1, 32), np.float32)
    with tuned(None, 32, threads=2):
        kernels.matmul_t(x, w)  # the parent's workers exist now
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.apply(kernels.matmul_t, (x, w))
    np.testing.assert_array_equal(got, np.full((1, 64), 32.0, np.float32))


def test_a_failing_part_raises_after_all_parts_finish():
    finished = []

    def part(i):
        finished.append(i)
        if i == 1:
            raise ZeroDivisionError(i)
        return i

    with pytest.raises(ZeroDivisionError):
        _workers.run(part, [(0,), (1,), (2,), (3,)], threads=3)
    assert sorted(finished) == [0, 1, 2, 3]
    assert _workers.run(part, [(0,), (2,), (3,)], threads=2) == [0, 2, 3]


def test_each_gives_every_products_result_in_item_order():
    # a decoded token's experts: small products, each run whole on one of the
    # threads, whose own kernels (split in parts where large) run on that thread;
    # which thread takes which item is the workers' business, not asserted here
    rng = np.random.default_rng(3)
    small = [rng.standard_normal((96, 64)).astype(np.float16) for _ in range(7)]
    large = rng.standard_normal((4096, 2048)).astype(np.float16)  # over 8 MB: parts
    x = rng.standard_normal((1, 64)).astype(np.float32)
    xl = rng.standard_normal((1, 2048)).astype(np.float32)
    jobs = [(x, w) for w in small] + [(xl, large)]
    expected = [kernels.matmul_t(a, w) for a, w in jobs]
    threads_seen = set()

    def product(job):
        threads_seen.add(threading.get_ident())
        return kernels.matmul_t(*job)

    for threads in (1, 2, 3):
        threads_seen.clear()
        with tuned(None, 2048, threads):
            got = kernels.each(product, jobs)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e)
        assert len(threads_seen) <= threads
    assert kernels.each(product, []) == []
