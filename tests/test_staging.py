"""Leftovers of killed processes: staging directories, replaced layouts and locks
are cleared by the next conversion or first use, and only those of dead
processes."""

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_models import random_weights, tiny_config, write_hf_checkpoint

from mlx_flashinfer import Layout, convert
from mlx_flashinfer.formats.staging import clear_stale, locked, pid_alive
from mlx_flashinfer.loader import resolve_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    config = tiny_config("opt")
    tmp = tmp_path_factory.mktemp("staging")
    return write_hf_checkpoint(tmp / "src", config, random_weights(config))


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The PID of a process that has ended."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(done.stdout)
    assert not pid_alive(pid)
    return pid


def leftover(folder: Path, name: str, files: int = 2) -> Path:
    (folder / name).mkdir(parents=True)
    for i in range(files):
        (folder / name / f"part{i}").write_bytes(b"x" * 100)
    return folder / name


def test_only_the_leftovers_of_dead_processes_go(tmp_path, dead_pid):
    live = os.getpid()
    gone = [
        leftover(tmp_path, f".out.converting-{dead_pid}-1a2b3c4d"),
        leftover(tmp_path, f".out.converting-{dead_pid}"),  # older name, no suffix
        leftover(tmp_path, f".other.writing-{dead_pid}"),
    ]
    kept = [
        leftover(tmp_path, f".out.converting-{live}-1a2b3c4d"),  # still at work
        leftover(tmp_path, ".out.converting-1"),  # init: alive
        leftover(tmp_path, "out.converting-123"),  # not ours: no leading dot
        leftover(tmp_path, ".notes"),
    ]
    clear_stale(tmp_path, "other")  # one destination's only
    assert not gone[2].exists() and gone[0].exists()
    clear_stale(tmp_path)
    assert not any(p.exists() for p in gone) and all(p.exists() for p in kept)


def test_a_layout_that_force_was_replacing_comes_back(checkpoint, tmp_path, dead_pid):
    layout = convert(checkpoint, tmp_path / "out", progress=False)
    aside = tmp_path / f".out.old-{dead_pid}-1a2b3c4d"
    layout.rename(aside)  # killed between the two renames of --force
    clear_stale(tmp_path, "out")
    Layout.open(tmp_path / "out").verify()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # beside a layout that did arrive, the old one just goes
    leftover(tmp_path, f".out.old-{dead_pid}-5e6f7a8b")
    clear_stale(tmp_path, "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_lock_goes_only_when_nobody_holds_it(tmp_path):
    held, free = tmp_path / ".a.lock", tmp_path / ".b.lock"
    free.touch()
    with open(held, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        clear_stale(tmp_path)
        assert held.exists() and not free.exists()
    clear_stale(tmp_path)
    assert not held.exists()


def test_the_lock_serializes_and_leaves_no_file(tmp_path):
    path, inside, overlaps = tmp_path / ".x.lock", [], []

    def work():
        with locked(path):
            inside.append(1)
            overlaps.append(len(inside))
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1, 1] and not path.exists()


def test_the_next_convert_or_first_use_clears_what_a_kill_left(
    checkpoint, tmp_path, dead_pid
):
    staged = leftover(tmp_path, f".out.converting-{dead_pid}-1a2b3c4d")
    convert(checkpoint, tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["out"] and not staged.exists()
    cache = tmp_path / "cache"
    leftover(cache, f".src-0123456789ab.converting-{dead_pid}-1a2b3c4d")
    (cache / ".src-0123456789ab.lock").touch()
    layout = resolve_model(checkpoint, cache_dir=cache, progress=False)
    assert os.listdir(cache) == [layout.name]
