"""Directories written whole or not at all, and what killed writers leave behind.

A layout is written into a temporary directory beside its destination and renamed
at the end, so readers never see half of one. The names used beside DST:

    .DST.converting-PID-X   a conversion in progress (convert.py; X: unique, so
                            threads of one process never share one)
    .DST.writing-PID        the bench's unbundled copy in progress (bench/layouts.py)
    .DST.old-PID-X          the layout `--force` replaces, between its two renames
    .DST.lock               first use's lock (model_cache.py; the default model's
                            predictor: loader.py), held with flock
    .NAME.PID-X.tmp         a file being written whole (`write_file`: prompt caches,
                            manifests)

Cleanups run in `finally` blocks, which kill -9 skips: a directory whose PID no
longer runs is a leftover, and the next conversion removes it (an `.old` one whose
DST is gone is renamed back instead: it is a complete layout).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # no flock (Windows): the atomic rename alone must do
    fcntl = None

_LEFTOVER = re.compile(
    r"\.(?P<dst>.+)\.(?P<kind>converting|writing|old)-(?P<pid>\d+)(-\w+)?"
)
_LOCK = re.compile(r"\.(?P<dst>.+)\.lock")


def staging_path(dst: Path) -> Path:
    """A name no other writer uses, beside `dst`, for the temporary directory to
    write it into (made by the caller inside its cleanup's reach)."""
    # not tempfile.mkdtemp: its mode 0700 would stay on the published layout
    return dst.parent / f".{dst.name}.converting-{os.getpid()}-{_unique()}"


def write_file(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all: into a temporary file beside it,
    renamed over it at the end.

    Raises:
        OSError: the system's refusal (read-only, full disk), naming `path`: the user
            chose that name, not the temporary one. No temporary file is left.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{_unique()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as err:
        if err.filename is not None and os.fsdecode(err.filename) == str(tmp):
            err.filename = str(path)
        raise
    finally:
        # on a read-only disk even unlinking a missing file fails (EROFS): that
        # error must not replace the one that matters
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _unique() -> str:
    return uuid.uuid4().hex[:8]


def lock_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.lock"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale(parent: Path, dst_name: str | None = None) -> None:
    """Remove the leftovers of dead processes in `parent`: of destination
    `dst_name`, or of every destination (the cache folder holds only ours).

    A lock is stale when nobody holds it: flock dies with its process, so this is
    exact where a PID could have been reused.
    """
    try:
        entries = list(parent.iterdir())
    except OSError:  # no such folder yet, or unreadable: nothing of ours to clear
        return
    for entry in entries:
        if match := _LEFTOVER.fullmatch(entry.name):
            if (dst_name not in (None, match["dst"])) or pid_alive(int(match["pid"])):
                continue
            dst = parent / match["dst"]
            if match["kind"] == "old" and not os.path.lexists(dst):
                with contextlib.suppress(OSError):
                    os.rename(entry, dst)
                    continue
            _remove(entry)
        elif (match := _LOCK.fullmatch(entry.name)) and dst_name in (
            None,
            match["dst"],
        ):
            _remove_unheld_lock(entry)


def publish(new: Path, dst: Path, replace: bool = False) -> None:
    """Rename the finished directory `new` to `dst`.

    `dst` must be absent or an empty directory, or `replace` true (the caller checked
    that it is a layout). A replaced layout is renamed aside first, put back if the
    second rename fails, and removed only after it worked.

    Raises:
        FileExistsError: `dst` exists (another process wrote it meanwhile, say) and
            `replace` is false.
    """
    ours = os.stat(new).st_ino
    old = None
    try:
        if os.path.isdir(dst) and not os.path.islink(dst) and not any(dst.iterdir()):
            os.rmdir(dst)  # rename onto a missing path: never onto someone's files
        elif os.path.lexists(dst):
            if not replace:
                raise FileExistsError(errno.EEXIST, "exists", str(dst))
            old = dst.parent / f".{dst.name}.old-{os.getpid()}-{_unique()}"
            os.rename(dst, old)
        try:
            os.rename(new, dst)
        except OSError:
            if old is not None:
                os.rename(old, dst)
                old = None
            raise
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise FileExistsError(
                f"{dst}: already exists (written by another process meanwhile); "
                "pass --force to replace it"
            ) from None
        raise
    # on Linux a rename onto an empty directory replaces it silently: check it is ours
    if os.stat(dst).st_ino != ours:
        raise FileExistsError(f"{dst}: written by another process meanwhile")
    if old is not None:
        _remove(old)


@contextlib.contextmanager
def locked(path: Path, on_wait: Callable[[], None] | None = None):
    """Hold an exclusive lock on `path` (created, and removed when released).

    Removing it is safe because a waiter that gets the lock checks that the file it
    locked is still the one at `path`, and starts over on a new one otherwise.
    """
    if fcntl is None:
        yield
        return
    while True:
        f = open(path, "a")  # noqa: SIM115 - closed when released
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
                on_wait = None
            fcntl.flock(f, fcntl.LOCK_EX)
        if _same_file(f.fileno(), path):
            break
        f.close()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _remove_unheld_lock(path: Path) -> None:
    if fcntl is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, path):
            path.unlink(missing_ok=True)
    except OSError:  # held: its process is alive
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)
