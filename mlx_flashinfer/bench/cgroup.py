"""An honest memory limit: one memory cgroup per benchmark run, and cold page caches.

Each configuration runs in a child process that joins a fresh child of this process's
memory cgroup before it loads anything (a shell writes its own pid to `cgroup.procs`
and then execs Python). The limit covers everything the kernel charges to the
group: anonymous memory and the page cache of files read or mapped, so a memory map
of the weights only holds what fits, as under a real limit. cgroup v1 (the `memory`
controller: `memory.limit_in_bytes`, peak `memory.max_usage_in_bytes`) and v2
(`memory.max`, peak `memory.peak`) are both handled. Creating groups needs root (or a
delegated subtree); without one the runs go unlimited and the report says so.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


@dataclass(frozen=True)
class MemoryCgroup:
    """Where child groups are made: `parent` (a directory) of cgroup `version`."""

    version: int
    parent: Path

    @property
    def limit_file(self) -> str:
        return "memory.limit_in_bytes" if self.version == 1 else "memory.max"

    @property
    def peak_file(self) -> str:
        return "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"


def find_memory_cgroup(proc_cgroup: str = "/proc/self/cgroup") -> MemoryCgroup | str:
    """This process's memory cgroup, if child groups can be made in it.

    Returns:
        A MemoryCgroup, or a one-line reason why limits are not available.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError as err:
        return f"no cgroups here ({err.strerror})"
    entries = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    if (V2_ROOT / "cgroup.controllers").exists():  # unified hierarchy only
        path = next((p for h, _, p in entries if h == "0"), None)
        parent = V2_ROOT / (path or "/").lstrip("/")
        controllers = (parent / "cgroup.controllers").read_text().split()
        if "memory" not in controllers:
            return f"cgroup v2: no memory controller in {parent}"
        version = 2
    elif (V1_ROOT / "memory.limit_in_bytes").exists():
        path = next((p for _, c, p in entries if "memory" in c.split(",")), None)
        if path is None:
            return "cgroup v1: this process is in no memory cgroup"
        parent = V1_ROOT / path.lstrip("/")
        version = 1
    else:
        return "no cgroup memory controller mounted"
    if not os.access(parent, os.W_OK):
        return f"cgroup v{version}: {parent} is not writable (run as root)"
    return MemoryCgroup(version, parent)


def create_group(cgroup: MemoryCgroup, name: str, limit: int) -> Path:
    """A child group `name` limited to `limit` bytes (no swap).

    Raises:
        OSError: the kernel refused (e.g. a v2 parent that holds processes cannot
            enable the memory controller for its children).
    """
    if cgroup.version == 2:
        control = cgroup.parent / "cgroup.subtree_control"
        if "memory" not in control.read_text().split():
            control.write_text("+memory")
    group = cgroup.parent / name
    group.mkdir(exist_ok=True)
    (group / cgroup.limit_file).write_text(str(limit))
    if cgroup.version == 2 and (group / "memory.swap.max").exists():
        (group / "memory.swap.max").write_text("0")
    return group


def join_command(group: Path, command: list[str]) -> list[str]:
    """`command`, run so that its process enters `group` before it starts: a shell
    moves itself in, then execs the command (which keeps the pid)."""
    script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
    return ["/bin/sh", "-c", script, str(group), *command]


def peak_bytes(cgroup: MemoryCgroup, group: Path) -> int | None:
    """The most memory the group was charged (page cache included), if known."""
    with contextlib.suppress(OSError, ValueError):
        return int((group / cgroup.peak_file).read_text())
    return None


def oom_kills(cgroup: MemoryCgroup, group: Path) -> int:
    """Processes the kernel's OOM killer ended inside the group."""
    name = "memory.oom_control" if cgroup.version == 1 else "memory.events"
    with contextlib.suppress(OSError):
        for line in (group / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    return 0


def remove_group(group: Path, attempts: int = 20) -> None:
    """Remove an empty group (the kernel may need a moment after the last exit)."""
    for _ in range(attempts):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def evict(files: list[Path], drop_all: bool) -> str:
    """Drop `files` from the page cache, so the next run reads them from the disk.

    Every file gets POSIX_FADV_DONTNEED; with `drop_all` (root) the kernel's whole
    clean page cache goes too (`sync; echo 1 > /proc/sys/vm/drop_caches`).

    Returns:
        What was done, for the report.
    """
    for file in files:
        with contextlib.suppress(OSError, AttributeError):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    done = "posix_fadvise(DONTNEED) on every layout file"
    if drop_all:
        os.sync()
        try:
            DROP_CACHES.write_text("1\n")
            done += " + drop_caches"
        except OSError:
            pass
    return done


def run_limited(
    cgroup: MemoryCgroup, name: str, limit: int, command: list[str], stdin=None
) -> tuple[subprocess.CompletedProcess, int | None, int]:
    """Run `command` in a new child memory cgroup of `cgroup` limited to `limit`
    bytes (text `stdin` on its standard input), removed after; returns the finished
    process, the group's peak bytes and its OOM kills."""
    group = create_group(cgroup, name, limit)
    try:
        done = subprocess.run(
            join_command(group, command), input=stdin, capture_output=True, text=True
        )
        return done, peak_bytes(cgroup, group), oom_kills(cgroup, group)
    finally:
        remove_group(group)
