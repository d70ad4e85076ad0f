"""The streamed placement: exact for any activation (a SiLU model's too), with no
predictor. Each layer keeps its first `capacity[l]` neurons in DRAM (read once, at
load); the rest of the layer is read every token, in large direct reads and in file
order, by a background thread that runs ahead of compute, across layers and tokens,
into a ring of slots. The disk works while the FFN computes, so a token costs about
max(bytes streamed / the disk's large-read rate, compute) instead of their sum: the
placement that beats OS paging for models with no exploitable sparsity (FlexInfer,
arXiv 2503.03777; the paper's cost model with overlap).

Per layer and token (prompt or decoded: the same rows, the result of the dense FFN):
    out  = FFN over the resident rows           the ring fills meanwhile
    for each chunk of the streamed rows, in file order:
        chunk = ring.take(layer, start)         waits only when the disk is behind
        out  += FFN over the chunk's bundles    computed where they landed (NumPy;
                                                MLX copies each piece in)
        ring.release(chunk)                     once that FFN is evaluated

The rules that keep the ring safe:
  1. a slot is refilled only after `release`, and the FFN releases a slot only
     after evaluating what reads it;
  2. the order of reads is fixed (layers, then chunks, token after token), so the
     reader never has to be told what comes next; a token cut short (an error,
     Ctrl-C) leaves the ring ahead of the model, and the next layer asked for skips
     slots until it meets its own first chunk.
"""

from __future__ import annotations

import mmap
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from .ffn import bundle_ffn, bundle_pieces
from .memory import MemoryPlan
from .reader import FlashReader
from .stats import TokenCounters


@dataclass
class Chunk:
    """Bundles [start, stop) of a layer, landed in a ring slot at byte `at`."""

    layer: int
    start: int
    stop: int
    slot: int
    at: int
    reads: int  # syscalls
    bytes_read: int  # with the alignment around the span
    seconds: float  # the read's wall time (in the background)


class StreamRing:
    """A background reader of fixed spans of the FFN file, in a fixed order, into a
    ring of page-aligned slots (see the module's rules).

    Args:
        reader: the FlashReader whose file, threads and statistics the reads use.
        schedule: (layer, start, stop) of every span, in the order they are read,
            repeated token after token.
        slot_bytes: bytes of a slot: the largest span plus its alignment.
        slots: slots in the ring (2 at least: one read while one computes).
    """

    def __init__(self, reader: FlashReader, schedule: list, slot_bytes: int, slots):
        if slots < 2 or not schedule:
            raise ValueError(f"a ring needs 2+ slots and spans, got {slots}")
        self.reader = reader
        self.schedule = list(schedule)
        self.slot_bytes = slot_bytes
        self.buffer = mmap.mmap(-1, slot_bytes * slots)  # page-aligned: O_DIRECT
        self.bytes = np.frombuffer(self.buffer, dtype=np.uint8)
        self._free: queue.Queue = queue.Queue()
        for slot in range(slots):
            self._free.put(slot)
        self._filled: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=self._produce, name="flashinfer-stream", daemon=True
        )
        self._thread.start()

    @property
    def nbytes(self) -> int:
        return len(self.buffer)

    def take(self, layer: int, start: int) -> Chunk:
        """The next span read, which must be (layer, start): spans before it (left by
        a token cut short) are released unread.

        Raises:
            ValueError, OSError: the background read failed (the file changed, the
                disk refused).
        """
        while True:
            item = self._filled.get()
            if isinstance(item, BaseException):
                self._filled.put(item)  # every later take fails the same way
                raise item
            if (item.layer, item.start) == (layer, start):
                return item
            self.release(item)

    def release(self, chunk: Chunk) -> None:
        self._free.put(chunk.slot)

    def close(self) -> None:
        """Stop the background reader (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._free.put(None)
        self._thread.join()

    def _produce(self) -> None:
        spans = len(self.schedule)
        i = 0
        while True:
            slot = self._free.get()
            if slot is None or self._closed:
                return
            layer, start, stop = self.schedule[i % spans]
            began = time.perf_counter()
            try:
                at, reads, got = self.reader.read_span(
                    layer, start, stop, self.buffer, slot * self.slot_bytes
                )
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                self._filled.put(err)
                return
            seconds = time.perf_counter() - began
            self._filled.put(Chunk(layer, start, stop, slot, at, reads, got, seconds))
            i += 1


def stream_schedule(capacity: list[int], neurons: int, chunk_rows: int) -> list:
    """(layer, start, stop) spans of every layer's streamed rows [capacity, neurons),
    in chunks of at most `chunk_rows` bundles, layer after layer."""
    return [
        (layer, start, min(start + chunk_rows, neurons))
        for layer, resident in enumerate(capacity)
        for start in range(resident, neurons, chunk_rows)
    ]


class StreamedFFN(TokenCounters):
    """The FFN of every layer: resident rows held, the rest streamed (module doc).

    Args:
        backend: Backend API module.
        layout: the model's layout (bundled arrangement).
        weights: prepared resident weights (OPT's FFN biases).
        plan: a streamed memory plan (`memory.plan_streamed`): resident rows per
            layer (`capacity`), the chunk size and the ring's slots.
        threads: reader threads.
    """

    def __init__(self, backend, layout, weights: dict, plan: MemoryPlan, threads=None):
        if layout.arrangement != "bundled":
            raise ValueError(
                f"{layout.path}: the streamed placement reads bundled layouts, not "
                f"{layout.arrangement!r} ones"
            )
        self.backend = backend
        self.layout = layout
        self.args = layout.args
        self.plan = plan
        n = self.args.intermediate_size
        # A span is read whole, in one request: on this machine's virtio disk one
        # 8 MiB O_DIRECT read in flight streams at 2.0-2.2 GB/s for 30-40 ms of CPU
        # per GB, where 1 MiB reads over 16 threads reach 1.9-2.1 GB/s for 108 ms
        # per GB (and the GIL's hand-offs) taken from the FFN beside them.
        self.reader = FlashReader(
            layout.ffn_path,
            layout.layers,
            layout.bundle_bytes,
            parts=len(layout.bundle_parts),
            fields=layout.field_bytes,
            staging_bytes=plan.staging_bytes,
            chunk_bytes=max(plan.slot_bytes, 4096) if plan.chunk_rows else 1 << 20,
            **({} if threads is None else {"threads": threads}),
        )
        self.mode = self.reader.mode
        layers = range(self.args.num_hidden_layers)
        self.fc1_bias = [weights.get(f"layers.{i}.fc1.bias") for i in layers]
        self.fc2_bias = [weights.get(f"layers.{i}.fc2.bias") for i in layers]
        # the resident rows, one matrix per bundle piece as in FlashFFN, read once
        pieces = [(dtype, count) for part in layout.fields for _, dtype, count in part]
        self.caches = [
            self._held_rows(layer, rows, pieces)
            for layer, rows in enumerate(plan.capacity)
        ]
        step = max(plan.chunk_rows, 1)
        self.chunk_starts = [list(range(rows, n, step)) for rows in plan.capacity]
        self.ring = None
        schedule = stream_schedule(plan.capacity, n, step)
        if schedule:
            self.ring = StreamRing(
                self.reader, schedule, plan.slot_bytes, plan.ring_slots
            )
        self.backend.limit_compute_threads(None)  # the reads take little CPU
        super().__init__()

    def _held_rows(self, layer: int, rows: int, pieces: list) -> list:
        """The first `rows` bundles of `layer`, one backend matrix per piece, read
        in place where the backend shares its memory (else copied in)."""
        B = self.backend
        held = [B.zeros((rows, count), dtype) for dtype, count in pieces]
        if not rows:
            return held
        views = [B.host_view(m) for m in held]
        if all(v is not None for v in views):
            self.reader.read_range(layer, 0, rows, views)
            return held
        raw = self.reader.read_range(layer, 0, rows)
        for p, values in enumerate(self.layout.split_fields(raw)):
            held[p] = B.write_rows(held[p], np.arange(rows), B.weight_view(values))
            B.synchronize(held[p])  # `raw` is valid until the reader's next call
        return held

    def new_sequence(self) -> None:
        pass  # nothing depends on the sequence: every row is used every token

    def io_stats(self) -> dict:
        return {**super().io_stats(), "mode": self.mode, "landing": "streamed"}

    def held_bytes(self) -> dict:
        """Bytes of the arrays this FFN holds, by part of the memory plan."""
        return {
            "predictor": 0,
            "neuron cache": sum(int(m.nbytes) for layer in self.caches for m in layer),
            "scratch": 0,
            "read buffer": self.reader.staging_bytes
            + (self.ring.nbytes if self.ring else 0),
            "window": 0,
        }

    def __call__(self, layer: int, h):
        B, stats = self.backend, self._token
        resident = self.plan.capacity[layer]
        bias = self.fc1_bias[layer]
        ids = np.arange(resident)
        out = bundle_ffn(B, self.layout, h, self.caches[layer], ids, bias)
        n = self.args.intermediate_size
        for start in self.chunk_starts[layer]:
            began = time.perf_counter()
            chunk = self.ring.take(layer, start)
            waited = time.perf_counter() - began  # the disk is behind compute
            stats.io_s += waited
            stats.ahead_wait_s += waited
            stop = chunk.stop
            span = (stop - start) * self.layout.bundle_bytes
            raw = self.ring.bytes[chunk.at : chunk.at + span]
            pieces = bundle_pieces(B, self.layout, raw.reshape(stop - start, -1))
            ids = np.arange(start, stop)
            out = out + bundle_ffn(B, self.layout, h, pieces, ids, bias)
            B.synchronize(out)  # rule 1: evaluated before the slot is refilled
            self.ring.release(chunk)
            stats.reads += chunk.reads
            stats.bytes_read += chunk.bytes_read
            stats.bytes_useful += (stop - start) * self.layout.bundle_bytes
            stats.io_ahead_s += chunk.seconds
            stats.ahead_bytes += chunk.bytes_read
            stats.neurons_loaded += stop - start
        stats.neurons_predicted += n
        stats.neurons_hit += resident
        bias = self.fc2_bias[layer]
        return out if bias is None else out + bias

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
        self.reader.close()
