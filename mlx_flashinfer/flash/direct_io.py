"""Open a file so that its reads bypass the page cache: O_DIRECT on Linux (aligned
reads into aligned memory), F_NOCACHE on macOS, plain buffered reads elsewhere; and
the size of the aligned staging buffer reads land in.

Bypassing the cache keeps the measured I/O the disk's and the neuron cache in DRAM
the only cache, so the memory budget stays honest (paper section 3).
"""

from __future__ import annotations

import errno
import mmap
import os
import sys

from ..formats.layout import LayerExtent

MODES = ("auto", "direct", "nocache", "buffered")
MAX_ALIGN = 4096  # the largest O_DIRECT alignment met (logical block size)
_F_NOCACHE = 48  # macOS <sys/fcntl.h>; Python's fcntl module may lack the name


def open_uncached(path: str | os.PathLike, mode: str = "auto") -> tuple[int, str, int]:
    """Open `path` read-only, bypassing the page cache as far as this system allows.

    Returns (fd, mode, alignment): mode is "direct", "nocache" or "buffered", and
    reads must start, end and land in memory on multiples of `alignment` bytes.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown mode, or an explicit mode this system cannot do.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    os.close(os.open(path, os.O_RDONLY))  # a missing file fails here, plainly
    for candidate in ("direct", "nocache", "buffered"):
        if mode in ("auto", candidate):
            opened, reason = _OPENERS[candidate](path)
            if opened is not None:
                return opened[0], candidate, opened[1]
    raise ValueError(f"{path}: mode {mode!r} is not available here ({reason})")


def _open_direct(path) -> tuple[tuple[int, int] | None, str]:
    if not hasattr(os, "O_DIRECT"):
        return None, "no O_DIRECT on this platform"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        return None, "the filesystem refuses O_DIRECT"
    # Some filesystems accept the flag at open and fail the first read instead; the
    # device's logical block size (512 or 4096) decides which alignment works.
    buffer = mmap.mmap(-1, 8192)
    for align in (512, 4096):
        try:
            with memoryview(buffer) as view:
                os.preadv(fd, [view[align : 2 * align]], 0)
            return (fd, align), ""
        except OSError as err:
            if err.errno != errno.EINVAL:
                os.close(fd)
                raise
    os.close(fd)
    return None, "O_DIRECT reads fail with EINVAL"


def _open_nocache(path) -> tuple[tuple[int, int] | None, str]:
    if sys.platform != "darwin":
        return None, "F_NOCACHE is macOS only"
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", _F_NOCACHE), 1)
    return (fd, 4096), ""  # page-aligned reads are the ones that skip the cache


def _open_buffered(path) -> tuple[tuple[int, int] | None, str]:
    return (os.open(path, os.O_RDONLY), 1), ""


_OPENERS = {
    "direct": _open_direct,
    "nocache": _open_nocache,
    "buffered": _open_buffered,
}


# The staging buffer the disk reads into: large enough to keep every reader thread
# busy with 1 MiB chunks (16 x 1 MiB), small beside any budget; a read needing more
# goes in rounds.
DEFAULT_STAGING = 16 << 20


def staging_size(
    layers: list[LayerExtent],
    bundle_bytes: int,
    largest_piece: int | None = None,
    cap: int = DEFAULT_STAGING,
) -> int:
    """Bytes of a reader's staging buffer: `cap`, or a whole layer's bundles when
    that is less (reads of sparse sets fit it too, in rounds), but at least the
    aligned read of the largest file piece (a bundle, or in the separate
    arrangement a part); whole pages."""
    piece = (largest_piece or bundle_bytes) + 2 * MAX_ALIGN
    layer = max((e.neurons for e in layers), default=1) * bundle_bytes
    size = max(min(cap, layer + 2 * MAX_ALIGN), piece)
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
