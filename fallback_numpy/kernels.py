"""TEMPORARY pure-NumPy stand-in for the compiled 16-bit kernels (same API); the
numba kernels replace this file."""

from __future__ import annotations

import numpy as np

from mlx_flashinfer.safetensors_stream import _widen_float16

_BLOCK = 256


def widen(w, out=None):
    w = np.asarray(w)
    if out is None:
        out = np.empty(w.shape, np.float32)
    if w.dtype == np.float32:
        np.copyto(out, w)
    elif w.dtype == np.float16:
        _widen_float16(
            w.view(np.uint16), out.reshape(len(out), -1) if out.ndim > 1 else out[None]
        )
    else:
        out.view(np.uint32)[...] = w.astype(np.uint32) << np.uint32(16)
    return out


def matmul_t(x, w, out=None):
    if w.dtype == np.float32:
        return np.matmul(x, w.T, out=out)
    out = np.empty((x.shape[0], w.shape[0]), np.float32) if out is None else out
    for s in range(0, w.shape[0], _BLOCK):
        out[:, s : s + _BLOCK] = x @ widen(w[s : s + _BLOCK]).T
    return out


def matmul(x, w, out=None):
    if w.dtype == np.float32:
        return np.matmul(x, w, out=out)
    out = np.zeros((x.shape[0], w.shape[1]), np.float32) if out is None else out
    out[...] = 0
    for s in range(0, w.shape[0], _BLOCK):
        out += x[:, s : s + _BLOCK] @ widen(w[s : s + _BLOCK])
    return out


_threads = 1


def set_threads(n: int) -> None:
    global _threads
    _threads = n


def get_threads() -> int:
    return _threads
