"""The flash FFN: neurons read from flash when predicted, cached over a window of
tokens.

Per layer and decoded token (paper section 3):
    ids  = predictor(h)                 neurons expected to fire
    plan = window.step(ids)             what to load, which rows move (swap-delete)
    rows = reader.read(layer, loads)    one coalesced, parallel, cache-bypassing read
    cache: move rows, append new rows   a preallocated matrix, never reallocated
    out  = FFN over EVERY cached row    + overflow rows through scratch, if any
A cached neuron that does not fire adds exactly zero, so for ReLU-family models the
output equals the dense output whenever the predictor has full recall.

A prompt (prefill) of a ReLU-family model reads, per layer, either the union of its
tokens' predicted sets or the whole layer streamed in large sequential reads,
whichever the measured costs say is faster (a short chat turn reads a few percent
of the FFN, a long prompt streams), computes the FFN over those rows and seeds the
window with the last k tokens' predicted sets. SiLU models always stream and compute
densely: their prompts, which every later token attends to, stay exact.

Rows are held as stored (float16, bfloat16, float32) and reads land where they are
used: the reader copies each bundle part from its aligned staging buffer straight into
the cache (or scratch) rows, through a NumPy view of the backend array's memory
(`host_view`; on MLX the memory of an evaluated array: unified memory on Apple
silicon). The rules that make writing behind MLX's back safe:
  1. a layer's cache rows change only between its computations: the token before
     was evaluated (Model ends each token by evaluating its logits), and this
     token's FFN graph over them is built after the writes;
  2. whatever reads the scratch rows is evaluated before the next read into them.
Where MLX will not share an array's memory, rows are copied in with `write_rows`
(`io_stats()["landing"]` says which path ran).

Reads ahead (`lookahead`, the in-place path): once layer l knows its FFN input, the
next layer's predictor guesses layer l+1's set from that same input (the residual
stream changes little across one layer), and a second reader fetches the guessed
bundles that layer l+1 does not cache, in the background, while layer l's FFN and
layer l+1's attention compute. At layer l+1 the exact predictor decides as always:
the loads that were fetched ahead land from the prefetch buffer, the rest is read
then. A wrong guess costs reads, never the answer.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..model.transformer import ffn_forward
from .memory import MemoryPlan
from .prompt_reads import ReadCosts, prompt_chunks
from .reader import FlashReader
from .stats import TokenCounters
from .window import LayerWindow


def bundle_pieces(backend, layout, raw: np.ndarray) -> list:
    """Stored bundles (the bytes of n whole bundles, (n, bundle_bytes) uint8) -> one
    backend array per piece (each part's fields: its (n, d) values, or its packed
    integers, scales and biases), at the stored dtype (`weight_view`: NumPy computes
    on `raw` where it is, MLX copies each piece in)."""
    return [backend.weight_view(v) for v in layout.split_fields(raw)]


def bundle_ffn(backend, layout, h, pieces: list, ids: np.ndarray, fc1_bias=None):
    """FFN contribution (T, d_model) of the neurons `ids`, whose bundle pieces are
    `pieces` (backend arrays, as `bundle_pieces` or the cache rows give them);
    `fc1_bias`: the layer's whole fc1 bias (OPT), taken at `ids`."""
    if len(ids) == 0:
        return backend.zeros((h.shape[0], layout.args.hidden_size))
    # gate/up (OPT: fc1) rows, then down (fc2) columns
    *inputs, output = layout.join_fields(pieces)
    weights = [backend.rows_weight(r) for r in inputs]
    weights.append(backend.columns_weight(output))
    bias = None if fc1_bias is None else backend.take_rows(fc1_bias, ids)
    return ffn_forward(backend, layout.args, h, weights, bias)


class FlashFFN(TokenCounters):
    """The FFN of every layer, streamed from the layout's ffn.bin under a memory plan.

    Args:
        backend: Backend API module.
        layout: the model's layout.
        weights: prepared resident weights (for OPT's FFN biases).
        plan: the memory plan (cache capacity per layer, scratch rows).
        predictor: an object with predict(layer, h) -> bool mask (T, neurons).
        window: k, tokens whose neurons stay cached.
        threads: reader threads.
        guess: optional predictor for the reads ahead (default: `predictor`; tests
            give a wrong one to show it cannot change the output). Reads ahead run
            when the plan has room for them (`plan.lookahead`).
        read_gap: gaps of up to this many bytes between wanted bundles are read
            through (fewer, larger reads); None: the reader's DEFAULT_MAX_GAP.
    """

    def __init__(
        self,
        backend,
        layout,
        weights: dict,
        plan: MemoryPlan,
        predictor,
        window: int,
        threads: int | None = None,
        guess=None,
        *,
        read_gap: int | None = None,
    ):
        self.backend = backend
        self.args = layout.args
        self.layout = layout
        self.predictor = predictor
        self.plan = plan
        self.k = window
        parts = len(layout.bundle_parts)
        options = {} if threads is None else {"threads": threads}
        if read_gap is not None:  # the plan's (plan/planner.py), else the reader's
            options["max_gap_bytes"] = read_gap
        # Decoding computes on one thread and leaves the other cores to the reader
        # threads; a prompt computes on all of them (its reads are few and large).
        # Measured (AMD EPYC, 2 cores), SmolLM2 at 100%, a 460-token prompt: 227-232
        # tok/s on one thread, 385-396 on both; decoding after it unchanged or faster.
        self._compute_threads = None
        self._use_threads(1)
        reader_options = dict(
            parts=parts,
            separate=layout.arrangement == "separate",
            staging_bytes=plan.io_buffer // (2 if plan.lookahead else 1),
            fields=layout.field_bytes,
            **options,
        )
        self.reader = FlashReader(
            layout.ffn_path, layout.layers, layout.bundle_bytes, **reader_options
        )
        if self.reader.mode == "buffered":
            warnings.warn(
                f"{layout.ffn_path}: this filesystem refuses O_DIRECT/F_NOCACHE; "
                "reading through the page cache (dropped after each read)",
                stacklevel=3,
            )
        # One preallocated (capacity, values) matrix per piece of a bundle (a part,
        # or a quantized part's packed integers, scales, biases) and layer, not one
        # (capacity, bundle) matrix: matmuls over column slices of the latter cost
        # 10x on MLX's CPU backend (measured), while each piece alone is contiguous.
        pieces = [(dtype, n) for part in layout.fields for _, dtype, n in part]
        self.caches = [
            [backend.zeros((cap, n), dtype) for dtype, n in pieces]
            for cap in plan.capacity
        ]
        self.scratch = [
            backend.zeros((plan.scratch_rows, n), dtype) for dtype, n in pieces
        ]
        self._views = [[backend.host_view(m) for m in layer] for layer in self.caches]
        self._scratch_views = [backend.host_view(m) for m in self.scratch]
        in_place = all(
            v is not None for v in [*self._scratch_views, *sum(self._views, [])]
        )
        self.landing = "in place" if in_place else "copy"
        # Reads ahead: their own reader (staging buffer, threads) and one thread that
        # waits on it, so the main thread computes meanwhile. Only where reads land in
        # place (the copy path gains nothing from it).
        self.ahead = None
        self.guess = guess or predictor
        self._pending = None  # (layer, future of a Fetched)
        self._prefill_thread = None  # a prompt's next chunk's reads (made at need)
        if plan.lookahead and in_place:
            self.ahead = FlashReader(
                layout.ffn_path, layout.layers, layout.bundle_bytes, **reader_options
            )
            self._ahead_thread = ThreadPoolExecutor(1)
        layers = range(self.args.num_hidden_layers)
        self.fc1_bias = [weights.get(f"layers.{i}.fc1.bias") for i in layers]
        self.fc2_bias = [weights.get(f"layers.{i}.fc2.bias") for i in layers]
        self.observer = None  # optional (layer, h, ids, rows) hook on prefill chunks
        self._cost = ReadCosts()
        self.new_sequence()
        super().__init__()  # counters: prompt tokens stream densely, decoded go sparse

    def new_sequence(self) -> None:
        """Forget every window (a fresh KV cache); cached rows just get overwritten."""
        n = self.args.intermediate_size
        self.windows = [LayerWindow(n, cap, self.k) for cap in self.plan.capacity]
        if self._pending is not None:  # a read ahead of an old token
            self._pending[1].result()
            self._pending = None

    def io_stats(self) -> dict:
        return {
            **super().io_stats(),
            "mode": self.reader.mode,
            "landing": self.landing,
        }

    def held_bytes(self) -> dict:
        """Bytes of the arrays this FFN holds, by part of the memory plan."""
        return {
            "predictor": int(self.predictor.nbytes),
            "neuron cache": sum(int(m.nbytes) for layer in self.caches for m in layer),
            "scratch": sum(int(m.nbytes) for m in self.scratch),
            "read buffer": self.reader.staging_bytes
            + (self.ahead.staging_bytes if self.ahead else 0),
            "window": sum(w.nbytes for w in self.windows),
        }

    # -- the FFN -----------------------------------------------------------------------
    def _use_threads(self, threads: int | None) -> None:
        if threads != self._compute_threads:  # a call costs ~0.6 ms: only on change
            self.backend.limit_compute_threads(threads)
            self._compute_threads = threads

    def __call__(self, layer: int, h):
        prompt = h.shape[0] > 1
        self._use_threads(None if prompt else 1)
        out = self._prefill(layer, h) if prompt else self._decode(layer, h)
        bias = self.fc2_bias[layer]
        return out if bias is None else out + bias

    def _decode(self, layer: int, h):
        B, stats, window = self.backend, self._token, self.windows[layer]
        started = time.perf_counter()
        active = np.flatnonzero(self.predictor.predict(layer, h)[0])
        stats.predictor_s += time.perf_counter() - started
        fetched = self._fetched_ahead(layer)
        started, io_before = time.perf_counter(), stats.io_s
        first = None
        if fetched is not None:
            first = np.zeros(self.args.intermediate_size, dtype=bool)
            first[fetched.ids] = True
        plan = window.step(active, first)
        stats.neurons_predicted += len(active)
        stats.neurons_hit += plan.hits
        stats.neurons_loaded += len(plan.load_ids)
        stats.neurons_scratch += len(plan.scratch_ids)
        stats.neurons_evicted += plan.evicted
        stats.lru_evicted += plan.lru_evicted
        cache, views = self.caches[layer], self._views[layer]
        loads = plan.load_ids
        if self.landing == "in place":
            # swap-delete moves, then the new rows land after the last used one
            for view in views if len(plan.move_src) else ():
                view[plan.move_dst] = view[plan.move_src]
            if len(loads):
                slot = int(plan.load_slots[0])  # load slots are consecutive
                block = [view[slot : slot + len(loads)] for view in views]
                # the loads read ahead come first (window.step's `first`)
                ready = 0 if first is None else int(np.count_nonzero(first[loads]))
                self._take(fetched, loads[:ready], [b[:ready] for b in block])
                if ready < len(loads):
                    self._read(layer, loads[ready:], [b[ready:] for b in block])
        else:
            for p in range(len(cache)) if len(plan.move_src) else ():
                cache[p] = B.move_rows(cache[p], plan.move_src, plan.move_dst)
            if len(loads):
                rows = self._read_rows(layer, loads)
                for p in range(len(cache)):
                    cache[p] = B.write_rows(cache[p], plan.load_slots, rows[p])
        # predictor time counts as compute; bookkeeping and row moves as memory
        # management, the reads (landing in the rows included) as I/O
        stats.memory_s += time.perf_counter() - started - (stats.io_s - io_before)
        out = None
        step = self.plan.scratch_rows
        for s in range(0, len(plan.scratch_ids), step):  # overflow: used once, dropped
            ids = plan.scratch_ids[s : s + step]
            ready = 0
            if fetched is not None:  # what was read ahead first, then the rest
                ahead = first[ids]
                ids, ready = np.concatenate([ids[ahead], ids[~ahead]]), ahead.sum()
            rows = self._read_rows(layer, ids, fetched=fetched, ready=int(ready))
            part = self._ffn(layer, h, rows, ids)
            out = part if out is None else out + part
            B.synchronize(out)  # rule 2: evaluated before the scratch rows change
        # The next layer's reads ahead start once this layer's are done (they share
        # nothing with them but the disk), and run while this FFN computes.
        if self.ahead is not None and layer + 1 < len(self.windows):
            self._read_ahead(layer + 1, h)
        used = [part[: plan.used] for part in cache]
        cached = self._ffn(layer, h, used, window.cached)
        return cached if out is None else cached + out

    def _read_ahead(self, layer: int, h) -> None:
        """Start fetching the bundles `layer` is guessed to load, from this layer's
        FFN input `h`: the guessed set minus what `layer` caches now. Where the
        backend's ops may run on a second thread (NumPy's release the GIL), the
        guess is made there too, beside this layer's FFN: OPT-6.7B q4 at 50%
        spent 20 ms a token on it before its FFN."""
        if self.backend.OPS_ON_ANY_THREAD:
            # a copy: the thread must not see the caller reuse h's memory
            task = (self._guess_and_fetch, layer, h.copy())
        else:
            started = time.perf_counter()
            task = (self._fetch, layer, self._guessed_missing(layer, h))
            self._token.predictor_s += time.perf_counter() - started
        self._pending = (layer, self._ahead_thread.submit(*task))

    def _guessed_missing(self, layer: int, h) -> np.ndarray:
        """The neurons `layer` is guessed to use for `h` that it does not cache
        (its window is not stepped before the reads ahead are taken)."""
        guessed = np.flatnonzero(self.guess.predict(layer, h)[0])
        return guessed[self.windows[layer].slot_of[guessed] < 0]

    def _guess_and_fetch(self, layer: int, h):
        return self._fetch(layer, self._guessed_missing(layer, h))

    def _fetch(self, layer: int, missing: np.ndarray):
        """Fetch `missing` into the reads-ahead buffer (None: nothing to)."""
        return self.ahead.fetch(layer, missing) if len(missing) else None

    def _take(self, fetched, ids: np.ndarray, into: list) -> None:
        """Land bundles read ahead into rows; counted as I/O (the copy out of the
        prefetch buffer: the one copy every read makes)."""
        if not len(ids):
            return
        stats = self._token
        began = time.perf_counter()
        fetched.take(ids, into)
        stats.io_s += time.perf_counter() - began
        stats.ahead_used += len(ids)
        stats.bytes_useful += len(ids) * self.reader.bundle_bytes

    def _fetched_ahead(self, layer: int):
        """What was read ahead for `layer` (waiting for it if still reading), or
        None; counted into this token's I/O."""
        if self._pending is None:
            return None
        ahead_layer, future = self._pending
        self._pending = None
        stats = self._token
        began = time.perf_counter()
        fetched = future.result()  # the background read has finished after this
        waited = time.perf_counter() - began
        stats.io_s += waited
        stats.ahead_wait_s += waited
        if fetched is None:  # the guess found nothing to read
            return None
        stats.io_ahead_s += fetched.seconds
        stats.bytes_read += fetched.bytes_read
        stats.reads += fetched.reads
        stats.ahead_bytes += fetched.bytes_read
        stats.ahead_neurons += len(fetched.ids)
        return fetched if ahead_layer == layer else None

    def _prefill(self, layer: int, h):
        """FFN of a prompt over the union of its tokens' predicted neurons or over
        the whole layer streamed (`_prefill_ids`), in scratch-sized chunks; the
        window is seeded with the last k tokens' predicted sets, filled from the
        rows read."""
        B, window = self.backend, self.windows[layer]
        # every token's set only where their union may be read (the ReLU family);
        # else the last k seed the window (a low-bit predictor over a 128-token
        # prompt took 4 of 11 s on MLX's CPU, for the default model)
        union = self.args.is_relu_family or self.observer is not None
        masks = self.predictor.predict(
            layer, h if union or not self.k else h[-self.k :]
        )
        for mask in masks[-self.k :]:
            window.step(np.flatnonzero(mask))
        cache, views = self.caches[layer], self._views[layer]
        wanted, streaming = self._prefill_ids(masks)
        self._token.prefill_layers += 1
        self._token.prefill_streamed += streaming
        self._token.prefill_neurons += len(wanted)
        out = None
        for ids, at, rows in self._prefill_reads(layer, wanted, streaming):
            part = self._ffn(layer, h, rows, ids)
            out = part if out is None else out + part
            if self.observer is not None:  # predictor training records activations
                self.observer(layer, h, ids, rows)
            slots = window.slot_of[ids]
            keep = np.flatnonzero(slots >= 0)
            for p in range(len(cache)) if len(keep) else ():
                if self.landing == "in place":
                    views[p][slots[keep]] = self._scratch_views[p][at + keep]
                else:
                    cache[p] = B.write_rows(
                        cache[p], slots[keep], B.take_rows(rows[p], keep)
                    )
            B.synchronize(out)  # rule 2: evaluated before the scratch rows change
        if out is None:  # no neuron predicted for any token: the FFN adds nothing
            out = B.zeros((h.shape[0], self.args.hidden_size))
        return out

    def _prefill_reads(self, layer: int, wanted: np.ndarray, streaming: bool):
        """(ids, their first scratch row, their rows) for each chunk of `wanted`.
        Where reads land in place and half the scratch holds PREFILL_AHEAD_BYTES,
        the scratch is used in two halves: the next chunk is read into one while
        the caller computes over the other (it evaluates a chunk before asking for
        the next, so a half is written again only once computed over)."""
        step, ahead = prompt_chunks(
            len(wanted),
            self.plan.scratch_rows,
            self.layout.bundle_bytes,
            in_place=self.landing == "in place",
        )
        chunks = [wanted[i : i + step] for i in range(0, len(wanted), step)]
        if not ahead:
            for ids in chunks:
                began = time.perf_counter()
                rows = self._read_rows(layer, ids, whole_range=streaming)
                self._cost.record(streaming, len(ids), time.perf_counter() - began)
                yield ids, 0, rows
            return
        if self._prefill_thread is None:
            self._prefill_thread = ThreadPoolExecutor(1)

        def read(ids, at: int) -> float:  # into host views only: an MLX array
            began = time.perf_counter()  # belongs to the stream of its thread
            into = [v[at : at + len(ids)] for v in self._scratch_views]
            self._read(layer, ids, into, whole_range=streaming)
            return time.perf_counter() - began

        future = self._prefill_thread.submit(read, chunks[0], 0)
        try:
            for i, ids in enumerate(chunks):
                at = (i % 2) * step
                self._cost.record(streaming, len(ids), future.result())
                if i + 1 < len(chunks):  # into the other half, computed over already
                    future = self._prefill_thread.submit(read, chunks[i + 1], step - at)
                yield ids, at, [m[at : at + len(ids)] for m in self.scratch]
        finally:  # a prompt cut short leaves no read writing into the scratch
            future.exception()

    def _prefill_ids(self, masks: np.ndarray) -> tuple[np.ndarray, bool]:
        """The neurons a prompt's FFN runs over, and whether that is the whole layer
        streamed: the union of the tokens' predicted sets when reading it is
        expected to be faster than streaming (ReLU family only: a neuron no token
        fires adds exactly zero), else every neuron."""
        n = self.args.intermediate_size
        union = np.flatnonzero(masks.any(axis=0))
        if (
            self.observer is None  # predictor training records every neuron
            and self.args.is_relu_family
            and self._cost.sparse_is_faster(len(union), n)
        ):
            return union, False
        return np.arange(n), True

    def _read_rows(
        self,
        layer: int,
        ids: np.ndarray,
        whole_range: bool = False,
        fetched=None,
        ready: int = 0,
    ):
        """Bundles of `ids` (at most scratch_rows of them) as one backend array per
        piece: the scratch rows, or copies where rows cannot land in place. The
        first `ready` of `ids` were read ahead and land from `fetched`."""
        n = len(ids)
        if self.landing == "in place":
            rows = [v[:n] for v in self._scratch_views]
            if ready:
                self._take(fetched, ids[:ready], [r[:ready] for r in rows])
            if ready < n:
                self._read(layer, ids[ready:], [r[ready:] for r in rows], whole_range)
            return [m[:n] for m in self.scratch]
        raw = self._read(layer, ids, None, whole_range)
        return bundle_pieces(self.backend, self.layout, raw)

    def _read(self, layer: int, ids: np.ndarray, into, whole_range: bool = False):
        """`reader.read` (or `read_range`) of `ids` into `into`, counted."""
        before = self.reader.stats.totals()
        if whole_range:
            raw = self.reader.read_range(layer, int(ids[0]), int(ids[-1]) + 1, into)
        else:
            raw = self.reader.read(layer, ids, into)
        self._token.add_read(self.reader.stats.since(before))
        return raw

    def _ffn(self, layer: int, h, rows: list, ids: np.ndarray):
        """FFN contribution of the neurons `ids`, whose bundle pieces are `rows`."""
        return bundle_ffn(self.backend, self.layout, h, rows, ids, self.fc1_bias[layer])

    def close(self) -> None:
        if self._prefill_thread is not None:
            self._prefill_thread.shutdown()
        if self.ahead is not None:
            self._ahead_thread.shutdown()
            self.ahead.close()
        self.reader.close()
