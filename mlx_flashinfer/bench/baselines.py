"""What users run instead of flash inference, as FFNs with the interface of
`model/transformer.py`.

- `MmapFFN`, OS paging (llama.cpp's way): ffn.bin is memory-mapped and every token
  computes each layer's whole FFN from the mapping, so the kernel pages the weights
  in, and out again when the memory limit presses. I/O time is the time to touch each
  page of a chunk once (the page faults: reads of what is not resident); bytes read
  are this process's block reads from /proc/self/io (`read_bytes`, page faults and
  readahead included; Linux only, zero elsewhere), reads the major page faults.
- `StreamFFN`, layer streaming (AirLLM's way): every token each layer's whole FFN is
  read with large sequential buffered reads, computed densely and dropped from the
  page cache (POSIX_FADV_DONTNEED), so nothing stays between tokens.

Both keep the resident weights (embeddings, attention, norms) in DRAM as stored, like
the flash runtime, so only the FFN's handling differs, and both compute on the stored
bytes where they are, in chunks of `chunk_bytes` (NumPy reads the mapping or buffer
itself; MLX copies each chunk in). They manage no cache, so their memory-management
time is zero.
The dense ceiling, every weight in DRAM, is `model.DenseFFN`.
"""

from __future__ import annotations

import mmap
import os
import resource
import time

import numpy as np

from ..flash.ffn import bundle_ffn, bundle_pieces
from ..flash.stats import TokenCounters

DEFAULT_CHUNK_BYTES = 32 << 20  # stored bytes computed at a time
PROC_IO = "/proc/self/io"


def process_read_bytes() -> int | None:
    """Bytes this process made the block layer read (Linux /proc/self/io), or None."""
    try:
        with open(PROC_IO) as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _ChunkedFFN(TokenCounters):
    """Shared by the baselines: FlashFFN's per-token counters, and the dense FFN of a
    layer over the chunks of neurons `_chunks` hands over."""

    def __init__(self, backend, layout, weights: dict, chunk_bytes: int):
        if layout.arrangement != "bundled":
            raise ValueError(
                f"{layout.path}: the baselines read bundled layouts, not "
                f"{layout.arrangement!r} ones"
            )
        if chunk_bytes < layout.bundle_bytes:
            raise ValueError(f"chunk_bytes {chunk_bytes} is smaller than one bundle")
        self.backend = backend
        self.layout = layout
        self.args = layout.args
        self.chunk_rows = chunk_bytes // layout.bundle_bytes
        layers = range(self.args.num_hidden_layers)
        self.fc1_bias = [weights.get(f"layers.{i}.fc1.bias") for i in layers]
        self.fc2_bias = [weights.get(f"layers.{i}.fc2.bias") for i in layers]
        super().__init__()

    # -- the FFN interface of model.py ------------------------------------------------
    def new_sequence(self) -> None:
        pass

    def __call__(self, layer: int, h):
        B = self.backend
        out = None
        for ids, raw in self._chunks(layer):
            pieces = bundle_pieces(B, self.layout, raw.reshape(len(ids), -1))
            part = bundle_ffn(B, self.layout, h, pieces, ids, self.fc1_bias[layer])
            out = part if out is None else out + part
            # MLX is lazy: evaluate now, or every chunk of every layer stays alive
            # until the token ends (the whole FFN copied in)
            B.synchronize(out)
        bias = self.fc2_bias[layer]
        return out if bias is None else out + bias

    def _chunks(self, layer: int):
        raise NotImplementedError

    def held_bytes(self) -> dict:
        """Arrays held beyond the resident weights (the page cache is the kernel's)."""
        return {}


class MmapFFN(_ChunkedFFN):
    """The FFN computed each token from a memory map of ffn.bin (OS paging).

    Args:
        backend: Backend API module.
        layout: a bundled layout.
        weights: prepared resident weights (OPT's FFN biases).
        chunk_bytes: stored bytes decoded and computed at a time.
        willneed: advise the kernel to read the whole file ahead once, as llama.cpp
            does when it maps a model (`posix_madvise(WILLNEED)`).
    """

    def __init__(
        self,
        backend,
        layout,
        weights: dict,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        willneed: bool = True,
    ):
        super().__init__(backend, layout, weights, chunk_bytes)
        with open(layout.ffn_path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if willneed and hasattr(mmap, "MADV_WILLNEED"):
            self._map.madvise(mmap.MADV_WILLNEED)
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self._io_before = (0, 0)
        self.io_source = (
            "/proc/self/io read_bytes; reads = major page faults"
            if process_read_bytes() is not None
            else "unmeasured (no /proc/self/io); reads = major page faults"
        )

    def begin_token(self) -> None:
        super().begin_token()
        self._io_before = (
            process_read_bytes() or 0,
            resource.getrusage(resource.RUSAGE_SELF).ru_majflt,
        )

    def end_token(self, logits, prompt_tokens: int) -> None:
        self._token.bytes_read = (process_read_bytes() or 0) - self._io_before[0]
        self._token.bytes_useful = self._token.bytes_read
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        self._token.reads = faults - self._io_before[1]
        super().end_token(logits, prompt_tokens)

    def _chunks(self, layer: int):
        extent, size = self.layout.layers[layer], self.layout.bundle_bytes
        for start in range(0, extent.neurons, self.chunk_rows):
            stop = min(start + self.chunk_rows, extent.neurons)
            lo = extent.offset + start * size
            raw = self._bytes[lo : extent.offset + stop * size]
            started = time.perf_counter()
            # one byte of every page: the faults bring in what is not resident
            np.add.reduce(raw[:: mmap.PAGESIZE], dtype=np.uint64)
            int(raw[-1])
            self._token.io_s += time.perf_counter() - started
            yield np.arange(start, stop), raw

    def close(self) -> None:
        self._bytes = None
        self._map.close()


class StreamFFN(_ChunkedFFN):
    """Each layer's whole FFN read from disk every token, in large sequential reads.

    Args:
        backend: Backend API module.
        layout: a bundled layout.
        weights: prepared resident weights (OPT's FFN biases).
        chunk_bytes: bytes per read (and computed at a time).
    """

    io_source = "read syscalls (buffered, dropped from the page cache after each)"

    def __init__(
        self, backend, layout, weights: dict, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ):
        super().__init__(backend, layout, weights, chunk_bytes)
        self._fd = os.open(layout.ffn_path, os.O_RDONLY)
        self._buffer = np.empty(self.chunk_rows * layout.bundle_bytes, dtype=np.uint8)

    def _chunks(self, layer: int):
        extent, size = self.layout.layers[layer], self.layout.bundle_bytes
        stats = self._token
        for start in range(0, extent.neurons, self.chunk_rows):
            stop = min(start + self.chunk_rows, extent.neurons)
            offset, need = extent.offset + start * size, (stop - start) * size
            started = time.perf_counter()
            view, done = memoryview(self._buffer)[:need], 0
            while done < need:
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n == 0:
                    raise ValueError(f"{self.layout.ffn_path}: truncated at {offset}")
                done += n
                stats.reads += 1
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._fd, offset, need, os.POSIX_FADV_DONTNEED)
            stats.io_s += time.perf_counter() - started
            stats.bytes_read += need
            stats.bytes_useful += need
            yield np.arange(start, stop), self._buffer[:need]

    def held_bytes(self) -> dict:
        return {"read buffer": int(self._buffer.nbytes)}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
