"""FlashReader returns exactly the file's bundles, in every mode, thread count and gap
setting, and fails loudly on bad arguments and on a file truncated under it."""

import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_flashinfer.flash.direct_io import open_uncached
from mlx_flashinfer.flash.reader import FlashReader
from mlx_flashinfer.formats.layout import LayerExtent, align_up


def write_ffn(path: Path, neurons: list[int], bundle_bytes: int, seed: int = 0):
    """A random ffn.bin-like file: layers of bundles, each starting 4 KiB aligned."""
    rng = np.random.default_rng(seed)
    layers, offset = [], 0
    with open(path, "wb") as f:
        for n in neurons:
            layers.append(LayerExtent(offset, n))
            f.seek(offset)
            f.write(rng.integers(0, 256, n * bundle_bytes, dtype=np.uint8).tobytes())
            offset = align_up(offset + n * bundle_bytes)
    return layers


def bundles(path: Path, extent: LayerExtent, ids, bundle_bytes: int) -> np.ndarray:
    """The reference: plain Python reads, one per bundle."""
    with open(path, "rb") as f:
        rows = []
        for i in ids:
            f.seek(extent.offset + int(i) * bundle_bytes)
            rows.append(np.frombuffer(f.read(bundle_bytes), np.uint8))
    return np.array(rows, np.uint8).reshape(len(rows), bundle_bytes)


def runs(ids) -> int:
    """Number of maximal runs of consecutive ids."""
    return int(len(ids) and 1 + np.count_nonzero(np.diff(ids) != 1))


@pytest.fixture(scope="module")
def direct_ok(tmp_path_factory) -> bool:
    path = tmp_path_factory.mktemp("probe") / "f"
    path.write_bytes(b"\0" * 8192)
    try:
        fd, _, _ = open_uncached(path, "direct")
    except ValueError:
        return False
    os.close(fd)
    return True


MODES = ["buffered", "direct"]


@pytest.fixture(scope="module")
def ring_ok() -> bool:
    from mlx_flashinfer.flash.uring import open_ring

    ring = open_ring()
    if ring is not None:
        ring.close()
    return ring is not None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("max_gap", [0, 1 << 20])
@pytest.mark.parametrize("ring", [True, False])
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    neurons=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    bundle_bytes=st.sampled_from([96, 512, 1000, 3456, 4096]),
    data=st.data(),
)
def test_read_matches_file(
    tmp_path,
    monkeypatch,
    direct_ok,
    ring_ok,
    mode,
    threads,
    max_gap,
    ring,
    neurons,
    bundle_bytes,
    data,
):
    if mode == "direct" and not direct_ok:
        pytest.skip("the tmp filesystem refuses O_DIRECT")
    if ring and not ring_ok:
        pytest.skip("io_uring is unavailable here")
    # reads through this thread's io_uring, or (turned off) over the thread pool
    monkeypatch.setenv("MLX_FLASHINFER_URING", "1" if ring else "0")
    path = tmp_path / "ffn.bin"
    layers = write_ffn(path, neurons, bundle_bytes)
    # A small chunk size makes long runs split into several reads across threads.
    chunk = data.draw(st.sampled_from([4096, 1 << 24]))
    with FlashReader(path, layers, bundle_bytes, threads, max_gap, mode, chunk) as fr:
        assert fr.mode == mode and (fr._ring() is not None) == ring
        for _ in range(3):
            layer = data.draw(st.integers(0, len(layers) - 1))
            n = layers[layer].neurons
            ids = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1)))), np.int64)
            before = fr.stats.snapshot()
            got = fr.read(layer, ids)
            assert got.shape == (len(ids), bundle_bytes) and got.dtype == np.uint8
            np.testing.assert_array_equal(
                got, bundles(path, layers[layer], ids, bundle_bytes)
            )
            after = fr.stats.snapshot()
            useful = after["bytes_useful"] - before["bytes_useful"]
            reads = after["reads"] - before["reads"]
            assert useful == len(ids) * bundle_bytes
            assert after["bytes_read"] - before["bytes_read"] >= useful
            if max_gap == 0 and threads == 1 and chunk > n * bundle_bytes:
                # Exactly one read per run; with O_DIRECT alignment, runs whose
                # aligned ranges touch are merged, so perhaps fewer.
                if mode == "buffered":
                    assert reads == runs(ids)
                else:
                    assert 0 < reads <= runs(ids) or not len(ids)
            if max_gap >= n * bundle_bytes and chunk > n * bundle_bytes:
                assert reads == min(len(ids), 1)

            start = data.draw(st.integers(0, n))
            stop = data.draw(st.integers(start, n))
            np.testing.assert_array_equal(
                fr.read_range(layer, start, stop),
                bundles(path, layers[layer], range(start, stop), bundle_bytes),
            )
        totals = fr.stats.snapshot()
        assert totals["calls"] == 6
        assert sum(v["calls"] for v in totals["per_layer"].values()) == 6


def test_auto_mode_and_stats_reset(tmp_path, direct_ok):
    path = tmp_path / "ffn.bin"
    layers = write_ffn(path, [64, 64], 3456)
    with FlashReader(path, layers, 3456) as fr:
        assert fr.mode == ("direct" if direct_ok else "buffered")
        assert fr.read(1, np.array([], np.int64)).shape == (0, 3456)
        fr.read(1, np.array([3, 4, 9]))
        assert fr.stats.per_layer[1].bytes_useful == 3 * 3456
        fr.stats.reset()
        assert fr.stats.snapshot()["reads"] == 0 and not fr.stats.per_layer


@pytest.mark.parametrize("mode", MODES)
def test_truncated_after_open(tmp_path, direct_ok, mode):
    if mode == "direct" and not direct_ok:
        pytest.skip("the tmp filesystem refuses O_DIRECT")
    path = tmp_path / "ffn.bin"
    layers = write_ffn(path, [100, 100], 3456)
    with FlashReader(path, layers, 3456, threads=4, mode=mode) as fr:
        os.truncate(path, layers[1].offset + 10 * 3456)
        with pytest.raises(ValueError, match="truncated"):
            fr.read(1, np.arange(50, 60))
        with pytest.raises(ValueError, match="truncated"):
            fr.read_range(1, 0, 100)


def test_rejects_bad_arguments(tmp_path):
    path = tmp_path / "ffn.bin"
    layers = write_ffn(path, [10], 96)
    for kwargs in ({"threads": 0}, {"threads": 257}, {"max_gap_bytes": -1}):
        with pytest.raises(ValueError, match=str(next(iter(kwargs.values())))):
            FlashReader(path, layers, 96, **kwargs)
    with pytest.raises(ValueError, match="mode"):
        FlashReader(path, layers, 96, mode="fast")
    with pytest.raises(ValueError, match="layer 0 ends at byte"):
        FlashReader(path, [LayerExtent(0, 11)], 96)
    with pytest.raises(FileNotFoundError):
        FlashReader(tmp_path / "missing.bin", layers, 96)
    with FlashReader(path, layers, 96, mode="buffered") as fr:
        with pytest.raises(ValueError, match="sorted"):
            fr.read(0, np.array([3, 2]))
        with pytest.raises(ValueError, match="sorted"):
            fr.read(0, np.array([10]))
        with pytest.raises(ValueError, match="layer"):
            fr.read(1, np.array([0]))


@pytest.mark.skipif(sys.platform == "darwin", reason="F_NOCACHE exists on macOS")
def test_nocache_refused_off_macos(tmp_path):
    path = tmp_path / "ffn.bin"
    layers = write_ffn(path, [10], 96)
    with pytest.raises(ValueError, match="nocache"):
        FlashReader(path, layers, 96, mode="nocache")


@pytest.mark.parametrize("mode", MODES)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    neurons=st.integers(1, 200),
    parts=st.sampled_from([1, 2, 3]),
    piece=st.sampled_from([4, 48, 1152]),
    separate=st.booleans(),
    max_gap=st.sampled_from([0, 16384]),
    threads=st.sampled_from([1, 4]),
    small=st.booleans(),
    data=st.data(),
)
def test_reads_land_in_the_rows_given(
    tmp_path,
    direct_ok,
    mode,
    neurons,
    parts,
    piece,
    separate,
    max_gap,
    threads,
    small,
    data,
):
    """Piece p of the i-th neuron lands in into[p][i], for bundles side by side or
    parts in separate regions, also when the staging buffer is so small that a
    read goes in many rounds."""
    if mode == "direct" and not direct_ok:
        pytest.skip("the tmp filesystem refuses O_DIRECT")
    bundle = parts * piece
    path = tmp_path / "ffn.bin"
    layers = write_ffn(path, [neurons, 7], bundle)
    on_disk = piece if separate else bundle  # one piece of a file region
    staging = (on_disk + 2 * 4096) if small else None
    ids = np.array(sorted(data.draw(st.sets(st.integers(0, neurons - 1)))), np.int64)
    with FlashReader(
        path, layers, bundle, threads, max_gap, mode, 4096, parts, separate, staging
    ) as fr:
        # rows with a stride wider than a piece, like a cache's rows of one part
        into = [
            np.zeros((len(ids), piece + 8), np.uint8)[:, :piece] for _ in range(parts)
        ]
        assert fr.read(0, ids, into) is into
        got = fr.read(0, ids)  # the uint8 bundles, for comparison
        reference = bundles(path, layers[0], range(neurons), bundle)
        if separate:  # region p holds part p of every neuron
            flat = reference.reshape(-1)
            region = neurons * piece
            expect = [
                flat[p * region :][:region].reshape(neurons, piece)[ids]
                for p in range(parts)
            ]
        else:
            expect = [reference[ids, p * piece : (p + 1) * piece] for p in range(parts)]
        for p in range(parts):
            np.testing.assert_array_equal(into[p], expect[p])
            np.testing.assert_array_equal(
                got[:, p * piece : (p + 1) * piece], expect[p]
            )
        assert fr.staging_bytes == len(fr._staging)
        # with `slots`, neuron ids[i] lands in row slots[i] of a larger matrix (the
        # experts cache's free rows) and no other row changes
        rows = len(ids) + data.draw(st.integers(0, 5))
        slots = np.random.default_rng(len(ids)).permutation(rows)[: len(ids)]
        cache = [np.full((rows, piece + 8), 0xAA, np.uint8) for _ in range(parts)]
        fr.read(0, ids, [c[:, :piece] for c in cache], slots=slots)
        others = np.setdiff1d(np.arange(rows), slots)
        for p in range(parts):
            np.testing.assert_array_equal(cache[p][slots, :piece], expect[p])
            assert (cache[p][others] == 0xAA).all() and (
                cache[p][:, piece:] == 0xAA
            ).all()


@pytest.mark.parametrize("mode", MODES)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    neurons=st.integers(1, 200),
    parts=st.sampled_from([1, 3]),
    piece=st.sampled_from([48, 1152]),
    separate=st.booleans(),
    staging_pieces=st.integers(1, 40),
    data=st.data(),
)
def test_fetch_keeps_what_fits_and_take_lands_any_subset(
    tmp_path, direct_ok, mode, neurons, parts, piece, separate, staging_pieces, data
):
    """A prefetch reads the longest prefix of its ids that fits the staging buffer
    in one round; take() then lands any sorted subset of it exactly as read() would,
    and refuses ids it did not fetch."""
    if mode == "direct" and not direct_ok:
        pytest.skip("the tmp filesystem refuses O_DIRECT")
    bundle = parts * piece
    path = tmp_path / "ffn.bin"
    layers = write_ffn(path, [neurons, 5], bundle)
    on_disk = piece if separate else bundle
    staging = staging_pieces * on_disk + 2 * 4096
    ids = np.array(sorted(data.draw(st.sets(st.integers(0, neurons - 1)))), np.int64)
    with FlashReader(
        path, layers, bundle, 4, 16384, mode, 4096, parts, separate, staging
    ) as fr:
        fetched = fr.fetch(0, ids)
        k = len(fetched.ids)
        np.testing.assert_array_equal(fetched.ids, ids[:k])
        if k < len(ids):  # the longest prefix: one more neuron would not fit
            _, _, _, lo, hi = fr._runs(fr.layers[0], ids[: k + 1])
            assert (hi - lo).sum() > fr.staging_bytes
            assert k >= 1  # one piece's read always fits
        pick = np.array(
            sorted(data.draw(st.sets(st.sampled_from(fetched.ids.tolist()))))
            if k
            else [],
            np.int64,
        )
        into = [np.zeros((len(pick), piece), np.uint8) for _ in range(parts)]
        fetched.take(pick, into)
        slots = np.arange(len(pick))[::-1] * 2  # every other row, backwards
        scattered = [np.zeros((2 * len(pick) + 1, piece), np.uint8) for _ in into]
        fetched.take(pick, scattered, slots=slots)
        expect = fr.read(0, pick).copy()  # ends the fetched bundles' validity
        for p in range(parts):
            np.testing.assert_array_equal(
                into[p], expect[:, p * piece : (p + 1) * piece]
            )
            np.testing.assert_array_equal(scattered[p][slots], into[p])
        assert fr.stats.bytes_useful == (k + len(pick)) * bundle
        if k < len(ids):
            missing = ids[k:][:1]
            with pytest.raises(ValueError, match="not fetched"):
                fr.fetch(0, ids).take(missing, [np.zeros((1, piece), np.uint8)] * parts)


@pytest.mark.parametrize("mode", MODES)
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    neurons=st.integers(1, 40),
    fields=st.sampled_from([(4096,), (8192, 4096), (4096, 512, 3584)]),
    chunk=st.sampled_from([4096, 8192, 1 << 20]),
    threads=st.sampled_from([1, 4]),
    aligned=st.booleans(),
    data=st.data(),
)
def test_whole_bundles_land_straight_in_aligned_rows(
    tmp_path, direct_ok, mode, neurons, fields, chunk, threads, aligned, data
):
    import mlx_flashinfer.flash.reader as reader_module

    """With land_direct, bundles whose pieces and rows sit on the alignment are read
    straight into their rows (any free slots, pieces cut at `chunk`): the rows get
    the file's bytes, no other row changes, and only the bundles' bytes are read;
    rows off the alignment go through the staging buffer, with the same result."""
    if mode == "direct" and not direct_ok:
        pytest.skip("the tmp filesystem refuses O_DIRECT")
    parts = 3
    bundle = parts * sum(fields)
    path = tmp_path / "ffn.bin"
    layers = write_ffn(path, [neurons, 3], bundle)
    ids = np.array(sorted(data.draw(st.sets(st.integers(0, neurons - 1)))), np.int64)
    rows = neurons + 2
    slots = np.random.default_rng(neurons).permutation(rows)[: len(ids)]
    # page-aligned rows (an anonymous map, as the NumPy backend's caches), or
    # rows 16 bytes off the alignment (as NumPy's own allocator gives)
    skew = 0 if aligned else 16
    cache = [
        np.frombuffer(
            mmap.mmap(-1, rows * size + 4096), np.uint8, rows * size, skew
        ).reshape(rows, size)
        for _ in range(parts)
        for size in fields
    ]
    with FlashReader(
        path,
        layers,
        bundle,
        threads,
        0,
        mode,
        chunk,
        parts,
        False,
        None,
        [fields] * parts,
        land_direct=True,
    ) as fr:
        before = [c.copy() for c in cache]
        copies = []  # pieces copied from the staging buffer
        real_gather = reader_module.gather
        reader_module.gather = lambda *a: copies.append(1) or real_gather(*a)
        try:
            fr.read(0, ids, cache, slots=slots)
        finally:
            reader_module.gather = real_gather
        # through the page cache (buffered) any row takes reads: align 1
        assert bool(copies) == (not aligned and fr.align > 1 and len(ids) > 0)
        expect = bundles(path, layers[0], ids, bundle)
        at = 0
        for c, old in zip(cache, before, strict=True):
            size = c.shape[1]
            np.testing.assert_array_equal(c[slots], expect[:, at : at + size])
            others = np.setdiff1d(np.arange(rows), slots)
            np.testing.assert_array_equal(c[others], old[others])
            at += size
        if aligned and len(ids):  # straight in: nothing but the bundles is read
            assert fr.stats.bytes_read == len(ids) * bundle


def test_direct_reads_finish_after_short_preadv(tmp_path, monkeypatch):
    """A preadv may return fewer bytes than asked: the call goes on from where it
    stopped, across its row views, until every byte landed."""
    from mlx_flashinfer.flash import landing

    data = np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8)
    path = tmp_path / "f"
    path.write_bytes(data.tobytes())
    real = os.preadv
    monkeypatch.setattr(
        landing.os,
        "preadv",
        lambda fd, views, at: real(fd, [v[:999] for v in views[:1]], at),
    )
    rows = [np.zeros(3000, np.uint8), np.zeros(5000, np.uint8), np.zeros(1, np.uint8)]
    calls = [(100, [memoryview(r) for r in rows])]
    fd = os.open(path, os.O_RDONLY)
    try:
        reads, got = landing.read_calls(fd, calls, str(path))
    finally:
        os.close(fd)
    assert got == 8001 and reads == 4 + 6 + 1  # 999 bytes a call, one view at a time
    np.testing.assert_array_equal(np.concatenate(rows), data[100:8101])


def test_ring_reads_what_pread_reads_and_refuses_what_is_wrong(tmp_path, ring_ok):
    """io_uring reads (uring.py): every byte as `os.pread` gives it, short only at
    the end of the file, an error as OSError, and never past the buffer."""
    from mlx_flashinfer.flash.landing import cut_runs
    from mlx_flashinfer.flash.uring import Ring, ring_runs

    if not ring_ok:
        pytest.skip("io_uring is unavailable here")
    data = np.random.default_rng(2).integers(0, 256, 300_000, dtype=np.uint8)
    path = tmp_path / "f"
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    ring = Ring(8)  # fewer entries than reads: several submissions a call
    try:
        rng = np.random.default_rng(3)
        lo = np.sort(rng.choice(290_000, 40, replace=False))
        hi = np.minimum(lo + rng.integers(1, 20_000, 40), len(data) + 100)
        pos = np.concatenate([[0], np.cumsum(hi - lo)[:-1]])
        buffer = np.zeros(int((hi - lo).sum()), np.uint8)
        reads_at = cut_runs(lo, hi, pos, 4096)
        reads, got, rest = ring_runs(ring, fd, *reads_at, buffer, len(data))
        assert reads == int((-(-(hi - lo) // 4096)).sum()) and not rest
        assert got == int((np.minimum(hi, len(data)) - lo).sum())
        for a, b, p in zip(lo, hi, pos, strict=True):
            b = min(b, len(data))
            np.testing.assert_array_equal(buffer[p : p + b - a], data[a:b])
        with pytest.raises(ValueError, match="past the end of its buffer"):
            past = cut_runs([0], [9000], [len(buffer) - 100], 4096)
            ring_runs(ring, fd, *past, buffer, 10**6)
        with pytest.raises(OSError):  # not an open file
            ring.read(10**6, [0], [buffer.ctypes.data], [10])
    finally:
        ring.close()
        os.close(fd)
