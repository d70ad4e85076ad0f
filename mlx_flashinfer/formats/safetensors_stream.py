"""Safetensors read and write, one tensor at a time, with bfloat16 on plain NumPy.

The `safetensors` package loads a whole file to write it and its NumPy side cannot read
bfloat16 (most Hugging Face checkpoints). Conversion must stream tensor by tensor so its
peak memory stays near one layer, so we read and write the (simple, documented) format
here: 8-byte little-endian header length, a JSON header of name -> dtype/shape/offsets,
raw data. Files written here are read back by `safetensors` and `mlx.core.load` in the
tests.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

# Storage dtypes: bfloat16 is kept as raw uint16 words and widened to float32 on decode;
# uint32 holds the packed integers of quantized matrices (quantize.py).
STORAGE = {
    "float16": np.float16,
    "float32": np.float32,
    "bfloat16": np.uint16,
    "uint32": np.uint32,
}
SAFETENSORS_NAMES = {
    "float16": "F16",
    "float32": "F32",
    "bfloat16": "BF16",
    "uint32": "U32",
}
_SOURCE_DTYPES = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "U32": np.uint32,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def encode(array: np.ndarray, dtype: str) -> np.ndarray:
    """Cast a float array to the storage form of `dtype`
    ("float16"/"float32"/"bfloat16")."""
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        # round to nearest even, as every framework does when it narrows to bfloat16
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        return (rounded >> np.uint32(16)).astype(np.uint16)
    return np.ascontiguousarray(array, dtype=STORAGE[dtype])


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Storage form of `dtype` -> float32 (float16/float32 pass through unchanged)."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return raw


def decode_into(raw: np.ndarray, dtype: str, out: np.ndarray) -> np.ndarray:
    """Storage form of `dtype` (any strides) -> float32 written into `out` (same
    shape, C-contiguous); returns `out`. What the flash path does to every byte it
    reads, so float16 takes a fast path (see `_widen_float16`)."""
    if dtype == "float16":
        return _widen_float16(raw.view(np.uint16), out)
    np.copyto(out, decode(raw, dtype), casting="unsafe")
    return out


_F16_BLOCK = 1 << 17  # elements per block: the passes below stay in the L2 cache
_F16_SCALE = np.float32(2.0**112)  # float32 exponent bias 127 - float16 bias 15


def _widen_float16(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float16 bits -> float32, exact for every value (subnormals, inf, nan).

    NumPy's own float16 cast is compute-bound on CPUs without a vectorized path,
    and slowest on float16 subnormals; these few integer passes are not (the flash
    path's memory management on OPT-1.3B: 192 -> 78 ms/token, measured with
    benchmarks/decode_profile.py before and after). The exponent and
    mantissa move to their float32 places, one multiply by 2**112 rebiases the
    exponent (and normalizes subnormals exactly), inf and nan get the top exponent
    back, then the sign goes on.
    """
    if out.size == 0:
        return out
    words = out.view(np.uint32).reshape(len(out), -1)
    bits = bits.reshape(len(bits), -1)
    step = max(1, _F16_BLOCK // max(words.shape[1], 1))
    sign = np.empty((min(step, len(words)), words.shape[1]), np.uint32)
    for i in range(0, len(words), step):
        u = words[i : i + step]
        s = sign[: len(u)]
        np.copyto(u, bits[i : i + step], casting="unsafe")
        np.bitwise_and(u, 0x8000, out=s)
        np.left_shift(s, 16, out=s)
        np.bitwise_and(u, 0x7FFF, out=u)
        np.left_shift(u, 13, out=u)
        f = u.view(np.float32)
        np.multiply(f, _F16_SCALE, out=f)
        special = f >= 65536.0  # was inf or nan: exponent all ones again
        if special.any():
            u[special] |= np.uint32(0x7F800000)
        np.bitwise_or(u, s, out=u)
    return out


def read_header(path: str | Path) -> tuple[dict, int]:
    """Return (header without __metadata__, offset of the data section).

    Raises:
        ValueError: the file is not a safetensors file, or is cut short (every
            tensor's offsets are checked against the file's size).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > min(100_000_000, size - 8):
            raise ValueError(
                f"{path}: not a safetensors file, or truncated (header length "
                f"{length}, file size {size})"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is no object)")
    header.pop("__metadata__", None)
    for name, info in header.items():
        _check_entry(path, name, info, size - 8 - length)
    return header, 8 + length


def _check_entry(path, name: str, info, data_bytes: int) -> None:
    try:
        begin, end = info["data_offsets"]
        shape = [int(n) for n in info["shape"]]
        dtype = info["dtype"]
        valid = (
            isinstance(begin, int)
            and isinstance(end, int)
            and 0 <= begin <= end
            and min(shape, default=0) >= 0
        )
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"{path}: tensor {name}: malformed header entry {info!r}")
    if end > data_bytes:
        raise ValueError(
            f"{path}: truncated: tensor {name} ends at byte {end} of the data, "
            f"which holds {data_bytes}"
        )
    itemsize = (
        np.dtype(_SOURCE_DTYPES[dtype]).itemsize if dtype in _SOURCE_DTYPES else 0
    )
    if itemsize and end - begin != itemsize * int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{path}: tensor {name}: offsets do not match its shape")


def read_tensor(
    path: str | Path, info: dict, data_start: int, stored: bool = False
) -> np.ndarray:
    """Read one tensor described by its header entry; floats come back as float32,
    or with `stored` as they are stored (float16, float32, bfloat16 as uint16 bits:
    the form the backends hold)."""
    kind = info["dtype"]
    if kind not in _SOURCE_DTYPES:
        raise ValueError(f"{path}: unsupported tensor dtype {kind}")
    begin, end = info["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = np.frombuffer(f.read(end - begin), dtype=_SOURCE_DTYPES[kind])
    if raw.nbytes != end - begin:
        raise ValueError(f"{path}: truncated tensor data")
    raw = raw.reshape(info["shape"])
    if stored and kind in ("F16", "F32", "BF16"):
        return raw
    if kind == "BF16":
        return decode(raw, "bfloat16")
    return raw.astype(np.float32) if kind in ("F16", "F64") else raw


class StreamingWriter:
    """Write a safetensors file whose tensors are declared first and given one by one.

    `specs` maps name -> (layout dtype, shape), in file order; `write` must then be
    called for each name in that order. `hasher` (e.g. hashlib.sha256()) sees every byte
    written.
    """

    def __init__(
        self, path: str | Path, specs: dict[str, tuple[str, tuple]], hasher=None
    ):
        header, offset = {}, 0
        for name, (dtype, shape) in specs.items():
            size = (
                int(np.prod(shape, dtype=np.int64)) * np.dtype(STORAGE[dtype]).itemsize
            )
            header[name] = {
                "dtype": SAFETENSORS_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (
            -len(text) % 8
        )  # keeps the data 8-byte aligned, as the spec advises
        self._pending = list(specs.items())
        self._file = open(path, "wb")  # noqa: SIM115 - stays open until close()
        self._hasher = hasher
        self._put(struct.pack("<Q", len(text)) + text)

    def _put(self, data) -> None:
        self._file.write(data)
        if self._hasher is not None:
            self._hasher.update(data)

    def write(self, name: str, array: np.ndarray) -> None:
        expected, (dtype, shape) = self._pending.pop(0)
        if name != expected or tuple(array.shape) != tuple(shape):
            raise ValueError(
                f"expected tensor {expected} {shape}, got {name} {array.shape}"
            )
        rows = array.reshape(array.shape[0], -1) if array.ndim > 1 else array[None]
        for start in range(
            0, rows.shape[0], 4096
        ):  # bounded temporaries for big tensors
            self._put(encode(rows[start : start + 4096], dtype).data)

    def close(self) -> None:
        if self._pending:
            raise ValueError(f"tensors never written: {[n for n, _ in self._pending]}")
        self._file.close()
