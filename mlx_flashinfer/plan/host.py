"""What machine a result came from, so results of different machines can be compared:
platform, CPU model and cores, RAM, GPU (Metal through MLX) and package versions."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from importlib import metadata


def cpu_model() -> str:
    """The CPU's marketing name, or the platform's processor string."""
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if out.stdout.strip():
                return out.stdout.strip()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ram_bytes() -> int | None:
    """Physical memory, if the platform says."""
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
            out = subprocess.run(
                ["sysctl", "-n", "hw.memsize"], capture_output=True, text=True
            )
            return int(out.stdout)
    return None


def gpu_info() -> dict | None:
    """MLX's Metal device, when MLX is installed and Metal available; else None."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    with contextlib.suppress(AttributeError, RuntimeError):
        if mx.metal.is_available():
            info = mx.metal.device_info()
            return {"api": "metal", **{k: _plain(v) for k, v in info.items()}}
    return None


def _plain(value):
    return value if isinstance(value, int | float | str | bool) else str(value)


def package_versions() -> dict:
    """Versions of python, numpy, mlx and mlx-flashinfer (None: not installed)."""
    out = {"python": platform.python_version()}
    for name in ("numpy", "mlx", "mlx-flashinfer"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict:
    """Everything above, as one JSON-able dict."""
    return {
        "platform": platform.platform(),
        "system": platform.system(),
        "machine": platform.machine(),
        "node": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": ram_bytes(),
        "gpu": gpu_info(),
        "versions": package_versions(),
    }
