"""Test helper: the NumPy kernels' tuning constants (the dispatcher's and the
families' path limits) set so that tiny matrices take the paths big ones do, and put
back afterwards."""

from contextlib import contextmanager

from fallback_numpy import _dispatch, kernels


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
    saved = {name: getattr(_dispatch, name) for name in names}
    saved_limits = {name: getattr(kernels, name) for name in path_limits}
    threads_before = kernels.get_threads()
    try:
        if block_rows is not None:
            _dispatch.BLOCK_BYTES = block_rows * 4 * k
        _dispatch.PARALLEL_MIN_BYTES = 0
        _dispatch.PART_BYTES = 64  # many parts, whatever the size
        _dispatch.SUM_PARTS_MAX = 5
        if path != "auto":
            limit = 1 << 30 if path == "loops" else 0
            for name in path_limits:
                setattr(kernels, name, limit)
        kernels.set_threads(threads)
        yield
    finally:
        for name, value in saved.items():
            setattr(_dispatch, name, value)
        for name, value in saved_limits.items():
            setattr(kernels, name, value)
        kernels.set_threads(threads_before)
