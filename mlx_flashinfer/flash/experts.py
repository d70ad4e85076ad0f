"""The experts placement: a mixture of experts from flash, through the same reader,
window and cache as neurons, with the router as an exact predictor.

Each expert is one bundle in ffn.bin (its gate rows, up rows, down columns: one read
of the whole expert, formats/experts.py), and each layer caches `capacity` experts,
as many as the memory plan gives it (`expert_plan.py`), at least one token's.
Per layer and decoded token:
    ids, w = router.route(layer, h)     top-k experts and weights, on the host
    plan   = window.step(ids)           which experts to load, into which free slots
    rows   = reader.read(layer, loads)  every routed expert not cached, at once,
                                        landing in its slot of the layer's cache (a
                                        preallocated matrix per part and layer)
    out    = sum of w * expert(h)       + the shared expert, if the family has one
No routed expert is ever skipped: the output is the dense one (`model/moe.py`, the
same sums in the same order). The window keeps experts past the last k tokens
while the cache has room and evicts the expert of fewest routings (counted with a
decay of EXPERT_DECAY a token) first, so the last k tokens' experts stay cached
whenever the cache holds k * top_k of them and evictions were only needed for
older ones; k = 0 keeps
nothing (every routed expert read every token: the naive baseline). An expert's rows
stay in the slot they landed in until it is evicted, and the next load lands in that
slot (`LayerWindow(compact=False)`): the experts are computed by slot, so the rows
need not be contiguous, and no megabyte row is ever moved.

A prompt routes all its tokens first and reads the union of their experts once per
layer, in rounds of at most the cache's capacity (sorted by expert id): each round's
experts compute for the tokens routed to them, evaluated before the next round's
reads land (rule 2 below); the last rounds' experts stay cached for the tokens after.

Reads ahead (`lookahead`, the in-place path): once a decoded token's experts for
layer l are loaded, layer l+1's router applied to layer l's FFN input guesses layer
l+1's experts, and a second reader reads those layer l+1 does not cache, in the
background, while layer l's experts and layer l+1's attention compute: with a
window, straight into layer l+1's cache (`LayerWindow.reserve` makes their slots,
evicting what the next step would evict first; a guess never routed is dropped at
that step); with none (k = 0), into its staging buffer, landed from there. At layer
l+1 the router decides as always. A wrong guess costs reads, never the answer.

Reads land in the cache rows through host views, as in `ffn.py`, under its rules:
  1. a layer's cache rows change only between its computations: the token before
     was evaluated, and this token's graph over them is built after the writes;
  2. within a prompt, each round's sum is evaluated before the next round's reads.
Where MLX will not share an array's memory, rows are copied in with `write_rows`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np

from ..model.moe import expert_outputs, expert_weights, experts_forward, with_shared
from .ffn import bundle_pieces
from .memory import MemoryPlan, io_buffer_bytes
from .reader import FlashReader
from .stats import TokenCounters
from .window import LayerWindow

# A window of k >= 1 tokens keeps experts past it until their rows are needed: as
# LayerWindow, with a window longer than any sequence.
KEEP_PAST_WINDOW = 1 << 40
# A decoded token's missing experts are read in groups of about this many bytes, each
# computed once it has landed while the next group is read: a read large enough to
# keep the disk's parallel reads busy. On the OLMoE-shaped q4 model (4.6 MB experts)
# at 50%, one read per expert, 8 MiB, 16 MiB and all at once gave 183-283 ms/token at
# window 4, within this VM's run-to-run spread (the same row: 386-583 at window 0).
BACKGROUND_READ = 8 << 20
# Evicting the expert of lowest routing count decayed by this factor a token (not the
# least recently routed) keeps a popular expert that skipped a few tokens. OLMoE-
# shaped q4 at 50%, window 4, 8 + 32 tokens: 52.5 experts read a token least recent
# first, 49.2 at 0.9, 48.8 at 0.98 (synthetic routing: skewed popularity, no reuse
# built in, which favours counts; 0.9 still forgets in about ten tokens).
EXPERT_DECAY = 0.9


def expert_window(experts: int, capacity: int, k: int) -> LayerWindow:
    """A layer's experts window as the experts placement keeps it: loads in freed
    slots (no compaction), evictions by decayed routing counts; `k` 0 keeps nothing,
    any other k keeps experts past the window while there is room."""
    keep = KEEP_PAST_WINDOW if k else 0
    return LayerWindow(experts, capacity, keep, compact=False, decay=EXPERT_DECAY)


class ExpertFFN(TokenCounters):
    """Every MoE layer's experts, read from the layout's ffn.bin under a memory plan.

    Args:
        backend: Backend API module.
        layout: a mixture-of-experts layout (float, bundled).
        weights: prepared resident weights (routers, shared experts).
        plan: an experts memory plan (`expert_plan.plan_experts`).
        router: the router predictor (`predictors/router.py`): route(layer, h).
        window: k, tokens whose experts stay cached (0: none; see the module doc).
        threads: reader threads.
        guess: the router whose choice is read ahead (default `router`; tests give
            a wrong one to show it cannot change the output).
    """

    def __init__(
        self,
        backend,
        layout,
        weights: dict,
        plan: MemoryPlan,
        router,
        window: int,
        threads: int | None = None,
        guess=None,
    ):
        args = layout.args
        if layout.arrangement != "bundled":
            raise ValueError(
                f"{layout.path}: the experts placement reads bundled layouts"
            )
        if min(plan.capacity) < args.experts_per_token:
            raise ValueError(
                f"an expert cache of {min(plan.capacity)} rows cannot hold one "
                f"token's {args.experts_per_token} experts"
            )
        self.backend = backend
        self.layout = layout
        self.args = args
        self.weights = weights
        self.plan = plan
        self.router = router
        self.predictor = router  # as FlashFFN names it (reports, verify)
        self.guess = guess or router
        self.k = window
        reader_options = dict(
            parts=len(layout.bundle_parts),
            fields=layout.field_bytes,
            land_direct=True,  # whole experts of megabytes: no copy from staging
            **({} if threads is None else {"threads": threads}),
        )
        staging = io_buffer_bytes(layout)  # the plan's io_buffer, reads ahead's aside
        self.reader = FlashReader(
            layout.ffn_path,
            layout.layers,
            layout.bundle_bytes,
            staging_bytes=staging,
            **reader_options,
        )
        pieces = [(dtype, n) for part in layout.fields for _, dtype, n in part]
        self.caches = [
            [backend.zeros((cap, n), dtype) for dtype, n in pieces]
            for cap in plan.capacity
        ]
        self._views = [[backend.host_view(m) for m in layer] for layer in self.caches]
        in_place = all(v is not None for v in sum(self._views, []))
        self.landing = "in place" if in_place else "copy"
        # reads ahead: their own reader and a thread waiting on it (in place only)
        self.ahead = None
        self._pending = None  # (layer, future of a Fetched, ids reserved or None)
        if plan.lookahead and in_place:
            self.ahead = FlashReader(
                layout.ffn_path,
                layout.layers,
                layout.bundle_bytes,
                staging_bytes=plan.io_buffer - staging,
                **reader_options,
            )
            self._ahead_thread = ThreadPoolExecutor(1)
        # a decoded token's missing experts: read by this thread while the cached
        # ones compute (in place only: rows written are not the ones computed on)
        self._miss_thread = ThreadPoolExecutor(1) if in_place else None
        self.new_sequence()
        super().__init__()

    def new_sequence(self) -> None:
        """Forget every window (a fresh KV cache); cached rows just get overwritten."""
        self.windows = [
            expert_window(self.args.num_experts, cap, self.k)
            for cap in self.plan.capacity
        ]
        if self._pending is not None:  # a read ahead of an old token
            self._pending[1].result()
            self._pending = None

    def io_stats(self) -> dict:
        # the counters named for neurons count experts here
        return {
            **super().io_stats(),
            "unit": "expert",
            "mode": self.reader.mode,
            "landing": self.landing,
        }

    def held_bytes(self) -> dict:
        """Bytes of the arrays this FFN holds, by part of the memory plan."""
        return {
            "predictor": int(self.router.nbytes),
            "neuron cache": sum(int(m.nbytes) for layer in self.caches for m in layer),
            "scratch": 0,
            "read buffer": self.reader.staging_bytes
            + (self.ahead.staging_bytes if self.ahead else 0),
            "window": sum(w.nbytes for w in self.windows),
        }

    def __call__(self, layer: int, h):
        B, args, stats = self.backend, self.args, self._token
        fetched, reserved = self._fetched_ahead(layer)
        started = time.perf_counter()
        ids, weights = self.router.route(layer, h)
        stats.predictor_s += time.perf_counter() - started
        routed = np.unique(ids)
        if reserved is not None:  # read ahead into the cache: a right guess is a
            # load read early, not a hit from an earlier token (as step counts it)
            used = int(np.count_nonzero(np.isin(reserved, routed)))
            stats.ahead_used += used
            stats.neurons_loaded += used
            stats.neurons_hit -= used
            stats.bytes_useful += used * self.reader.bundle_bytes
        cap = self.plan.capacity[layer]
        cache, slot_of = self.caches[layer], self.windows[layer].slot_of

        def expert(e: int) -> list:  # where the window put it, this round
            parts = self.layout.join_fields(cache)  # pieces -> parts
            return expert_weights(B, args, parts, int(slot_of[e]))

        out = None
        rounds = range(0, len(routed), cap)
        for start in rounds:
            wanted = routed[start : start + cap]
            # in one round (a decoded token's), the missing experts are read in
            # the background while the cached ones compute
            background = len(rounds) == 1 and self._miss_thread is not None
            reading = self._load(layer, wanted, fetched, background)
            ahead = self.ahead is not None and h.shape[0] == 1
            if ahead and layer + 1 < len(self.windows):
                self._read_ahead(layer + 1, h)  # while this layer computes
            if reading is not None:
                out = self._compute_while_reading(h, ids, weights, expert, *reading)
            else:
                out = experts_forward(B, args, h, ids, weights, expert, out, wanted)
            if len(rounds) > 1:
                B.synchronize(out)  # rule 2: before the next round's reads land
        if h.shape[0] > 1:
            stats.prefill_layers += 1
            stats.prefill_neurons += len(routed)
        return with_shared(B, args, self.weights, layer, h, out)

    def _compute_while_reading(self, h, ids, weights, expert, wanted, groups):
        """The sum of the routed experts `wanted`: the cached ones computed while
        the miss thread reads the rest, group by group (`groups`: (ids, future of
        their read), in order), then each group's experts once it has landed while
        the next groups are read; summed in id order, as `experts_forward` (and
        dense) sums them. NumPy computes as it goes; MLX builds the graph, evaluated
        at the next sync."""
        B, args, stats = self.backend, self.args, self._token
        loaded = np.concatenate([group for group, _ in groups])
        parts = {}
        for group, future in [(wanted[~np.isin(wanted, loaded)], None), *groups]:
            if future is not None:  # wait for the group's read
                began = time.perf_counter()
                future.result()
                waited = time.perf_counter() - began
                stats.io_s += waited  # counted as a wait, as for reads ahead
                stats.ahead_wait_s += waited
            outputs = expert_outputs(B, args, h, ids, weights, expert, group)
            parts.update(zip(group.tolist(), outputs, strict=True))
        out = None
        for e in wanted:
            part = parts[int(e)]
            if part is not None:
                out = part if out is None else out + part
        return out

    def _load(self, layer: int, wanted: np.ndarray, fetched=None, background=False):
        """Make the experts `wanted` (sorted, at most the capacity) cached; those in
        `fetched` (read ahead) land from the prefetch buffer. `background`: the
        rest are read by the miss thread in groups of about BACKGROUND_READ bytes;
        returns (wanted, [(group's ids, future of its read)]), or None when all is
        in place on return."""
        B, stats, window = self.backend, self._token, self.windows[layer]
        started, io_before = time.perf_counter(), stats.io_s
        first = None
        if fetched is not None:
            first = np.zeros(self.args.num_experts, dtype=bool)
            first[fetched.ids] = True
        plan = window.step(wanted, first)
        stats.neurons_predicted += len(wanted)
        stats.neurons_hit += plan.hits
        stats.neurons_loaded += len(plan.load_ids)
        stats.neurons_evicted += plan.evicted
        stats.lru_evicted += plan.lru_evicted
        cache, views, loads = self.caches[layer], self._views[layer], plan.load_ids
        slots = plan.load_slots  # free slots, where evicted experts were: no moves
        if self.landing == "in place":
            if len(loads):
                # the loads read ahead come first (window.step's `first`)
                ready = 0 if first is None else int(np.count_nonzero(first[loads]))
                if ready:
                    self._take(fetched, loads[:ready], views, slots[:ready])
                if ready < len(loads) and background:
                    stats.memory_s += time.perf_counter() - started
                    stats.memory_s -= stats.io_s - io_before
                    # in groups of reads of about BACKGROUND_READ bytes: the first
                    # group's experts compute while the next land
                    rest, at = loads[ready:], slots[ready:]
                    size = -(-BACKGROUND_READ // self.reader.bundle_bytes)
                    groups = []
                    for i in range(0, len(rest), size):
                        task = (layer, rest[i : i + size], views, at[i : i + size])
                        future = self._miss_thread.submit(self._read, *task, True)
                        groups.append((rest[i : i + size], future))
                    return wanted, groups
                if ready < len(loads):
                    self._read(layer, loads[ready:], views, slots[ready:])
        else:
            if len(loads):
                raw = self._read(layer, loads, None)
                for p, rows in enumerate(bundle_pieces(B, self.layout, raw)):
                    cache[p] = B.write_rows(cache[p], slots, rows)
                    B.synchronize(cache[p])  # `raw` is valid until the next read
        stats.memory_s += time.perf_counter() - started - (stats.io_s - io_before)
        return None

    def _read_ahead(self, layer: int, h) -> None:
        """Start fetching the experts `layer`'s router picks for `h` (the layer
        before's FFN input) that `layer` does not cache."""
        stats = self._token
        started = time.perf_counter()
        guessed = np.unique(self.guess.route(layer, h)[0])
        window = self.windows[layer]
        # with no window (k = 0) the cache is emptied before each token's loads
        missing = guessed[window.slot_of[guessed] < 0] if self.k else guessed
        stats.predictor_s += time.perf_counter() - started
        if len(missing) and self.k:
            # straight into the cache: slots made now, evicting what the next
            # step would evict first; the guess's rows land while this layer
            # computes, and a wrong guess is dropped at the next step
            slots = window.reserve(missing, guessed)
            missing = missing[: len(slots)]
            if len(missing):
                views = self._views[layer]
                task = (self._read_reserved, layer, missing, views, slots)
                self._pending = (layer, self._ahead_thread.submit(*task), missing)
        elif len(missing):
            future = self._ahead_thread.submit(self.ahead.fetch, layer, missing)
            self._pending = (layer, future, None)

    def _fetched_ahead(self, layer: int):
        """What was read ahead for `layer`, waiting for it if still reading, counted
        into this token's I/O: (a Fetched to land from, or None; the ids read into
        reserved cache rows, or None)."""
        if self._pending is None:
            return None, None
        ahead_layer, future, reserved = self._pending
        self._pending = None
        stats = self._token
        began = time.perf_counter()
        fetched = future.result()
        waited = time.perf_counter() - began
        stats.io_s += waited
        stats.ahead_wait_s += waited
        stats.io_ahead_s += fetched.seconds
        stats.bytes_read += fetched.bytes_read
        stats.reads += fetched.reads
        stats.ahead_bytes += fetched.bytes_read
        stats.ahead_neurons += len(fetched.ids)
        if ahead_layer != layer:
            return None, None
        if reserved is not None:  # landed in the cache: nothing to take
            return None, reserved
        return fetched, None

    def _read_reserved(self, layer: int, ids, views, slots):
        """Reads ahead into reserved cache rows (the ahead reader's thread): what
        `_fetched_ahead` counts, as a `Fetched` would say it."""
        before = self.ahead.stats.totals()
        self.ahead.read(layer, ids, views, slots=slots)
        return SimpleNamespace(ids=ids, **self.ahead.stats.since(before).as_dict())

    def _take(self, fetched, ids: np.ndarray, into: list, slots) -> None:
        """Land experts read ahead into their rows `slots` of `into`, counted as I/O."""
        stats = self._token
        began = time.perf_counter()
        fetched.take(ids, into, slots=slots)
        stats.io_s += time.perf_counter() - began
        stats.ahead_used += len(ids)
        stats.bytes_useful += len(ids) * self.reader.bundle_bytes

    def _read(self, layer: int, ids: np.ndarray, into, slots=None, background=False):
        """`reader.read` of `ids` into rows `slots` of `into`, counted (its time as
        a background read's, `io_ahead_s`, when the miss thread reads it)."""
        before = self.reader.stats.totals()
        raw = self.reader.read(layer, ids, into, slots=slots)
        self._token.add_read(self.reader.stats.since(before), background)
        return raw

    def close(self) -> None:
        if self._miss_thread is not None:
            self._miss_thread.shutdown()
        if self.ahead is not None:
            self._ahead_thread.shutdown()
            self.ahead.close()
        self.reader.close()
