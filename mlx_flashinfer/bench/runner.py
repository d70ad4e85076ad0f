"""Running configurations: each in its own process inside its own memory cgroup
(`run_isolated`), or in this process without a limit (`run_inline`, for tests).

A runner is any function RunSpec -> result dict; `run_bench` takes one, so tests
inject `run_inline` and need neither root nor cgroups.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from .cgroup import MemoryCgroup, evict, run_limited
from .configs import RunSpec

Runner = Callable[[RunSpec], dict]
_counter = itertools.count()


def run_inline(spec: RunSpec) -> dict:
    """Run `spec` in this process, unlimited (no eviction, no peak)."""
    from .worker import run_spec

    result = run_spec(spec)
    result["memory"] = {
        "limited": False,
        "limit": None,
        "peak": None,
        "note": "in process, unlimited",
    }
    return result


def run_isolated(
    spec: RunSpec,
    cgroup: MemoryCgroup | None,
    files: list[Path],
    drop_all: bool,
    python: str = sys.executable,
) -> dict:
    """Run `spec` in a fresh worker process, inside a new child memory cgroup limited
    to `spec.limit` when `cgroup` is given, with `files` evicted from the page cache
    first (and every clean page with `drop_all`).

    Returns:
        The worker's result, with "memory": limit, cgroup peak, OOM kills, what was
        evicted; or, when the worker failed, {"row", "backend", "error", "memory"}.
    """
    with tempfile.TemporaryDirectory(prefix="flashinfer-bench-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps(spec.to_dict()))
        command = [python, "-m", "mlx_flashinfer.bench.worker"]
        command += [str(spec_file), str(out_file)]
        evicted = evict(files, drop_all)
        peak, kills = None, 0
        limited = cgroup is not None and spec.limit is not None
        if limited:
            name = f"flashinfer-bench-{os.getpid()}-{next(_counter)}"
            try:
                done, peak, kills = run_limited(cgroup, name, spec.limit, command)
            except OSError as err:
                raise ValueError(
                    f"cannot make a memory cgroup in {cgroup.parent} ({err}); "
                    "run with --no-limit"
                ) from None
        else:
            done = subprocess.run(command, capture_output=True, text=True)
        memory = {
            "limited": limited,
            "limit": spec.limit if limited else None,
            "peak": peak,
            "oom_kills": kills,
            "evicted": evicted,
            "cgroup": f"v{cgroup.version}" if limited else None,
        }
        if done.returncode == 0 and out_file.is_file():
            result = json.loads(out_file.read_text())
            result["memory"] = memory
            return result
    lines = done.stderr.strip().splitlines()
    reason = lines[-1] if lines else f"exit status {done.returncode}"
    if kills or done.returncode == -9:
        reason = f"killed by the OOM killer at the {spec.limit} byte limit"
    return {"row": spec.row, "backend": spec.backend, "error": reason, "memory": memory}
