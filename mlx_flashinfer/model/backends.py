"""Backend choice: MLX on macOS arm64 when importable, NumPy otherwise."""

from __future__ import annotations

import importlib.util
import platform
import sys

BACKENDS = ("mlx", "numpy")
MLX_HINT = 'pip install "mlx-flashinfer[mlx]"'


def default_backend_name() -> str:
    on_apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
    if on_apple_silicon and importlib.util.find_spec("mlx") is not None:
        return "mlx"
    return "numpy"


def get_backend(name: str | None = None):
    """The Backend API module for `name` ("mlx", "numpy" or None for the default).

    Raises:
        ValueError: unknown name.
        ImportError: MLX asked for but not installed (the message gives the pip
            command).
    """
    name = name or default_backend_name()
    if name == "numpy":
        from fallback_numpy import backend

        return backend
    if name == "mlx":
        try:
            from . import mlx_backend
        except ImportError:
            raise ImportError(f"the MLX backend needs mlx: {MLX_HINT}") from None
        return mlx_backend
    raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
