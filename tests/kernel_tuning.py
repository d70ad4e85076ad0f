"""Test helper: the NumPy kernels' tuning constants set so that tiny matrices take
the paths big ones do, and put back afterwards."""

from contextlib import contextmanager

from fallback_numpy import kernels


@contextmanager
def tuned(
    block_rows: int | None,
    k: int,
    threads: int,
    path: str,
    path_limits: tuple[str, str],
):
    """Blocks of `block_rows` rows of width k in the large-T paths (None: as
    configured), every job cut in many parts shared by `threads`, and `path`
    "loops" or "blas" for every T ("auto": as configured) by setting the kernels'
    `path_limits` (the T and terms limits of the loops); every constant touched is
    restored on exit."""
    names = ("BLOCK_BYTES", "PARALLEL_MIN_BYTES", "PART_BYTES", "SUM_PARTS_MAX")
    saved = {name: getattr(kernels, name) for name in (*names, *path_limits)}
    threads_before = kernels.get_threads()
    try:
        if block_rows is not None:
            kernels.BLOCK_BYTES = block_rows * 4 * k
        kernels.PARALLEL_MIN_BYTES = 0
        kernels.PART_BYTES = 64  # many parts, whatever the size
        kernels.SUM_PARTS_MAX = 5
        if path != "auto":
            limit = 1 << 30 if path == "loops" else 0
            for name in path_limits:
                setattr(kernels, name, limit)
        kernels.set_threads(threads)
        yield
    finally:
        for name, value in saved.items():
            setattr(kernels, name, value)
        kernels.set_threads(threads_before)
