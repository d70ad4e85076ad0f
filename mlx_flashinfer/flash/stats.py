"""What the flash path cost: `ReadStats` totals a reader's reads, overall and per
layer; `FlashStats` counts bytes, reads, neurons and seconds of the FFN; and
`TokenCounters` keeps those per token and sums them apart for prompt and decoded
tokens (the FFN side of the model's token boundaries, shared by `FlashFFN` and the
baselines of `bench/`)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields


@dataclass
class FlashStats:
    """Counters of the flash path, for one token or summed over many."""

    tokens: int = 0
    bytes_read: int = 0  # what the disk delivered (alignment and read-through included)
    bytes_useful: int = 0  # bundles actually needed
    reads: int = 0
    neurons_predicted: int = 0
    neurons_hit: int = 0  # predicted and already cached
    neurons_loaded: int = 0  # read into the cache
    neurons_scratch: int = 0  # read for one token only (cache full)
    neurons_evicted: int = 0
    lru_evicted: int = 0  # evicted while still inside the window (budget too small)
    io_s: float = 0.0  # time the token waited for reads (background: only the wait)
    # reads in the background (reads ahead; an experts layer's misses while its
    # cached experts compute), hidden unless waited for
    io_ahead_s: float = 0.0
    ahead_wait_s: float = 0.0  # of io_s: waiting for a background read to finish
    ahead_bytes: int = 0  # of bytes_read: read ahead
    ahead_neurons: int = 0  # neurons read ahead
    ahead_used: int = 0  # of those, loaded into the cache (the guess was right)
    prefill_neurons: int = 0  # neurons read for prompts (per layer, each once)
    prefill_layers: int = 0  # prompt layers run (each once per prompt)
    prefill_streamed: int = 0  # of those, streamed whole (others read sparsely)
    # window bookkeeping, cache row moves (and writes, where rows are copied in)
    memory_s: float = 0.0
    predictor_s: float = 0.0  # part of compute: the predictor's own time
    total_s: float = 0.0  # wall time of whole tokens (compute = total - io - memory)

    def add(self, other: FlashStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def add_read(self, read: ReadTotals, background: bool = False) -> None:
        """Count a reader's call (`ReadTotals.since`): its time waited for, or
        (`background`) spent behind compute."""
        self.bytes_read += read.bytes_read
        self.bytes_useful += read.bytes_useful
        self.reads += read.reads
        if background:
            self.io_ahead_s += read.seconds
        else:
            self.io_s += read.seconds

    def summary(self) -> dict:
        """The counters plus derived figures (per token where it makes sense)."""
        out = asdict(self)
        n = max(self.tokens, 1)
        reading = self.io_s - self.ahead_wait_s + self.io_ahead_s
        out.update(
            bytes_per_token=self.bytes_read / n,
            mean_read_bytes=self.bytes_read / max(self.reads, 1),
            # the disk's rate while reading: reads ahead in the background count
            # their own time, not the wait for them
            gb_per_s=self.bytes_read / reading / 1e9 if reading > 0 else 0.0,
            hit_rate=self.neurons_hit / max(self.neurons_predicted, 1),
            # of the loads, the share read ahead; of the reads ahead, the share used
            ahead_coverage=self.ahead_used
            / max(self.neurons_loaded + self.neurons_scratch, 1),
            ahead_precision=self.ahead_used / max(self.ahead_neurons, 1),
            io_hidden_s=max(self.io_ahead_s - self.ahead_wait_s, 0.0),
            compute_s=max(self.total_s - self.io_s - self.memory_s, 0.0),
            ms_per_token=1e3 * self.total_s / n,
        )
        return out


class TokenCounters:
    """The FFN side of the model's token boundaries: FlashStats per token, summed
    apart for prompt and decoded tokens. Shared by FlashFFN and the baselines
    (baselines.py); subclasses set `backend` and fill `self._token` as they work."""

    def __init__(self):
        self.prefill = FlashStats()  # prompt tokens
        self.decode = FlashStats()  # decoded tokens
        self.last = FlashStats()  # the last decoded token
        self._token = FlashStats()
        self._started = 0.0

    @property
    def total(self) -> FlashStats:
        both = FlashStats()
        both.add(self.prefill)
        both.add(self.decode)
        return both

    def io_stats(self) -> dict:
        """Running totals since load (see `FlashStats.summary`), with the prompt and the
        decoded tokens also apart (per-token figures mean most for the latter)."""
        out = self.total.summary()
        out["prefill"] = self.prefill.summary()
        out["decode"] = self.decode.summary()
        out["last"] = self.last.summary()
        return out

    # -- token boundaries (called by Model) --------------------------------------------
    def begin_token(self) -> None:
        self._token = FlashStats()
        self._started = time.perf_counter()

    def end_token(self, logits, prompt_tokens: int) -> None:
        self.backend.synchronize(logits)
        self._token.total_s = time.perf_counter() - self._started
        self._token.tokens = prompt_tokens
        if prompt_tokens > 1:
            self.prefill.add(self._token)
        else:
            self.decode.add(self._token)
            self.last = self._token


@dataclass
class ReadTotals:
    calls: int = 0  # read / read_range calls
    reads: int = 0  # syscalls issued
    bytes_read: int = 0  # what the disk delivered, with alignment and read-through gaps
    bytes_useful: int = 0  # bundles asked for
    seconds: float = 0.0  # wall time inside read / read_range

    def add(self, reads: int, bytes_read: int, bytes_useful: int, seconds: float):
        self.calls += 1
        self.reads += reads
        self.bytes_read += bytes_read
        self.bytes_useful += bytes_useful
        self.seconds += seconds

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(ReadTotals)}

    def totals(self) -> ReadTotals:
        """The running totals now (a copy), for `since`."""
        return ReadTotals(**self.as_dict())

    def since(self, before: ReadTotals) -> ReadTotals:
        """What was counted after `before` (from `totals`)."""
        now, then = self.as_dict(), before.as_dict()
        return ReadTotals(**{name: now[name] - then[name] for name in now})


@dataclass
class ReadStats(ReadTotals):
    """Running totals of a FlashReader, overall and per layer."""

    per_layer: dict[int, ReadTotals] = field(default_factory=dict)

    def record(self, layer: int, *counts) -> None:
        self.add(*counts)
        self.per_layer.setdefault(layer, ReadTotals()).add(*counts)

    def snapshot(self) -> dict:
        """The totals as a plain dict, with "per_layer": {layer: totals}."""
        snap = self.as_dict()
        snap["per_layer"] = {k: v.as_dict() for k, v in sorted(self.per_layer.items())}
        return snap

    def reset(self) -> None:
        for f in fields(ReadTotals):
            setattr(self, f.name, f.default)
        self.per_layer.clear()
