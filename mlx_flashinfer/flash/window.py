"""The window manager: which neurons each layer keeps cached, and where (paper section
3.1).

A neuron stays cached while any of the last k tokens used it; each token loads only
the predicted neurons not already cached. This module is bookkeeping only (NumPy
ints): it turns one token's predicted set into a `StepPlan` that the neuron cache
carries out on the backend's matrix (swap-delete moves, then appends), so no row is
ever reallocated. A cache that computes on its rows by slot (the experts placement)
keeps them where they landed instead (`compact=False`): a freed slot stays a hole
and the next load lands in it, so no row ever moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EMPTY = np.zeros(0, dtype=np.int64)
SLOT_BYTES = 8  # neuron_at's entry for each cached row


@dataclass
class StepPlan:
    """What one layer must do for one token, in order: move, then load, then compute.

    move_src/move_dst: rows to copy within the cache (last used rows into freed slots;
        none when the window does not compact).
    load_ids/load_slots: neurons to read from flash into the cache, and where they go
        (consecutive slots when compacting, holes first otherwise).
    scratch_ids: predicted neurons that do not fit in the cache this token (read into a
        scratch buffer, used once, dropped: exact, only costlier).
    used: cached rows after the step (the FFN runs over rows [:used]).
    """

    move_src: np.ndarray
    move_dst: np.ndarray
    load_ids: np.ndarray
    load_slots: np.ndarray
    scratch_ids: np.ndarray
    used: int  # compact=False: rows [:used] hold every cached neuron, and holes
    hits: int  # predicted neurons already cached before this token
    evicted: int  # neurons dropped from the cache (left the window or pushed out)
    lru_evicted: int  # of those, still inside the window but evicted for lack of room


class LayerWindow:
    """Window and slot bookkeeping of one layer's neuron cache.

    Args:
        neurons: FFN neurons in the layer.
        capacity: rows of the layer's cache matrix (from the memory budget).
        k: window length in tokens (paper: 4-5 for OPT, 2 for Llama 2); 0 keeps
            nothing across tokens (every predicted neuron is read: the paper's
            "predictor only" row).
        compact: keep the cached rows in slots [0, used) by moving the last rows into
            freed slots (the neuron cache multiplies rows [:used] at once); False
            leaves every row where it landed and loads into the freed slots (a cache
            that picks its rows by slot: experts, whose rows are megabytes to move).
        decay: when the cache must evict within the window, evict the lowest
            routing count decayed by this factor per token (ties: least recent)
            instead of the least recently active: a popular expert that skipped a
            few tokens stays (None: least recent first).
    """

    def __init__(
        self,
        neurons: int,
        capacity: int,
        k: int,
        *,
        compact: bool = True,
        decay: float | None = None,
    ):
        if k < 0:
            raise ValueError(f"window must be at least 0 tokens, got {k}")
        self.capacity = capacity
        self.k = k
        self.compact = compact
        self.slot_of = np.full(
            neurons, -1, dtype=np.int64
        )  # neuron -> slot, -1: absent
        self.neuron_at = np.full(capacity, -1, dtype=np.int64)  # slot -> neuron, -1
        self.used = 0
        self.last_active = np.full(neurons, -(1 << 40), dtype=np.int64)
        self.decay = decay
        # decayed counts (decay set), kept scaled by decay^-token so a step adds
        # decay^-t to the active ones instead of multiplying every count; renormed
        # before the scale overflows
        self.counts = np.zeros(neurons if decay else 0)
        self._scale = 1.0
        self.token = 0
        self._keep = np.zeros(neurons, dtype=bool)  # scratch mask of step(), all False

    @staticmethod
    def bookkeeping_bytes(neurons: int, capacity: int, decayed: bool = False) -> int:
        """Bytes of a window's arrays (counted by the memory plan): slot_of,
        last_active and the keep mask per neuron (and its decayed count), neuron_at
        per cache slot."""
        return neurons * (8 + 8 + 1 + 8 * decayed) + capacity * SLOT_BYTES

    @property
    def nbytes(self) -> int:
        arrays = (self.slot_of, self.neuron_at, self.last_active, self._keep)
        arrays += (self.counts,)
        return sum(int(a.nbytes) for a in arrays)

    @property
    def cached(self) -> np.ndarray:
        """Neuron ids cached, in slot order (slots [0, used), holes skipped)."""
        rows = self.neuron_at[: self.used]
        return rows if self.compact else rows[rows >= 0]

    def step(self, active: np.ndarray, first: np.ndarray | None = None) -> StepPlan:
        """Plan the cache for the next token, whose predicted neurons are `active`.

        Args:
            active: sorted unique neuron ids predicted for this token.
            first: optional bool mask over the neurons: loads it marks take the first
                load slots (the prefetched ones: they land in one block, the rest is
                read into the block after them). Each group stays sorted.
        """
        t = self.token
        self.token += 1
        self.last_active[active] = t
        if self.decay:
            self._scale /= self.decay
            if self._scale > 1e100:  # renorm
                self.counts /= self._scale
                self._scale = 1.0
            self.counts[active] += self._scale
        dropped = 0
        if self.k == 0:  # no reuse: forget the previous token's neurons first
            cached = self.cached
            self.slot_of[cached] = -1
            self.neuron_at[: self.used] = -1
            dropped, self.used = len(cached), 0
        cached = self.cached
        is_cached = self.slot_of[active] >= 0
        hits = int(np.count_nonzero(is_cached))
        # The neurons to keep, as a mask over all neurons: boolean passes cost a few
        # microseconds where sorted set operations (union1d, setdiff1d) cost a few
        # hundred, per layer and token.
        keep = self._keep
        if len(active) > self.capacity:
            # Keep the predicted neurons already cached, fill the rest with new ones;
            # what still does not fit goes through scratch for this token only.
            already, new = active[is_cached], active[~is_cached]
            room = self.capacity - len(already)
            keep[already] = True
            keep[new[:room]] = True
            scratch = new[room:]
            lru = 0
        else:
            in_window = cached[self.last_active[cached] > t - self.k]
            keep[active] = True
            keep[in_window] = True
            lru = int(np.count_nonzero(keep)) - self.capacity
            if lru > 0:  # this token's neurons never go
                others = in_window[self.last_active[in_window] != t]
                keep[self._first_out(others)[:lru]] = False
            scratch = _EMPTY
        evict = cached[~keep[cached]]
        kept = np.flatnonzero(keep)
        load = kept[self.slot_of[kept] < 0]
        if first is not None:
            ahead = first[load]
            load = np.concatenate([load[ahead], load[~ahead]])
        keep[kept] = False  # clean for the next step
        move_src, move_dst = self._evict(evict)
        load_slots = self._place(load)
        return StepPlan(
            move_src=move_src,
            move_dst=move_dst,
            load_ids=load,
            load_slots=load_slots,
            scratch_ids=scratch,
            used=self.used,
            hits=hits,
            evicted=len(evict) + dropped,
            lru_evicted=max(lru, 0),
        )

    def reserve(self, ids: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Cache `ids` (sorted, none cached) ahead of the token that may use them
        (reads ahead into the cache itself; compact=False only): evict what they
        need room for, the cached neurons not in `keep` that `step` would evict
        first, and give them slots. Returns the slots; ids that find no room (the
        cache holds only `keep`) are left out: the first len(slots) are cached.
        They are not marked active: never routed, they are the first to go."""
        if self.compact:
            raise ValueError("reserve needs a window that does not compact")
        cached = self.cached
        others = cached[~np.isin(cached, keep)]
        room = self.capacity - len(cached)
        n = min(len(ids), room + len(others))
        if n > room:
            self._evict(self._first_out(others)[: n - room])
        return self._place(ids[:n])

    def _first_out(self, candidates: np.ndarray) -> np.ndarray:
        """`candidates` in eviction order: the least recently active first (or the
        lowest decayed count, then least recent); ties by id, not slot: which stay
        must not depend on where rows happen to sit (reads ahead reorder slots)."""
        recency = self.last_active[candidates]
        if self.decay:
            order = np.lexsort((candidates, recency, self.counts[candidates]))
        else:
            order = np.lexsort((candidates, recency))
        return candidates[order]

    def _place(self, ids: np.ndarray) -> np.ndarray:
        """Give `ids` slots, the holes first (compact=False), then those past the
        last used one; returns the slots."""
        n = len(ids)
        holes = _EMPTY
        if not self.compact:
            holes = np.flatnonzero(self.neuron_at[: self.used] < 0)[:n]
        tail = np.arange(self.used, self.used + n - len(holes), dtype=np.int64)
        slots = np.concatenate([holes, tail]) if len(holes) else tail
        self.neuron_at[slots] = ids
        self.slot_of[ids] = slots
        self.used += len(tail)
        return slots

    def _evict(self, evict: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Free the slots of `evict`; when compacting, fill holes below the new end
        with the last rows (the moves to make)."""
        freed = self.slot_of[evict]
        self.slot_of[evict] = -1
        self.neuron_at[freed] = -1
        if not self.compact:
            return _EMPTY, _EMPTY
        end = self.used - len(evict)
        holes = np.sort(freed[freed < end])
        tail = np.arange(end, self.used, dtype=np.int64)
        live = np.ones(len(tail), dtype=bool)
        live[freed[freed >= end] - end] = False
        movers = tail[live]  # live rows past the new end
        moved = self.neuron_at[movers]
        self.neuron_at[holes] = moved
        self.slot_of[moved] = holes
        self.used = end
        return movers, holes


WINDOW_GRID = (0, 1, 2, 4, 8)  # window lengths the statistics are kept for


def window_reuse(masks: np.ndarray, ks=WINDOW_GRID) -> dict:
    """What a window of k tokens would load and hold, over a sequence of predicted
    sets (a layer's masks (T, neurons), in token order), with room for all: the
    model statistics of the cost model (`plan/costs.py`).

    Returns:
        {"k": [...], "loaded": [fraction of the neurons read per token], "cached":
        [fraction held per token: the union of the last k sets, this one's
        included]}, from token max(ks) on (a full window).
    """
    masks = np.asarray(masks, dtype=bool)
    tokens, neurons = masks.shape
    start = min(max(ks), max(tokens - 1, 0))
    last = np.full(neurons, -(1 << 40), dtype=np.int64)  # token each was last used
    loaded = np.zeros(len(ks))
    cached = np.zeros(len(ks))
    for t in range(tokens):
        used = masks[t]
        if t >= start:
            age = t - last
            for i, k in enumerate(ks):
                before = age <= k  # used by one of the k tokens before this one
                loaded[i] += np.count_nonzero(used & ~before)
                cached[i] += np.count_nonzero(used | before)
        last[used] = t
    counted = max(tokens - start, 1) * neurons
    return {
        "k": list(ks),
        "loaded": (loaded / counted).tolist(),
        "cached": (cached / counted).tolist(),
    }


# cache rows, of the neurons; sets simulated at most. A report's time stays small
# (its calibration simulates every layer): the default model's first use took 29.8
# s with shares 0.02-0.5 over 256 sets, 25.1 with these, 23.3-24.0 without
CACHE_SHARES = (0.05, 0.1, 0.2, 0.35)
CACHE_TOKENS = 128


def cache_loads(masks: np.ndarray, ks=WINDOW_GRID, shares=CACHE_SHARES) -> dict:
    """What a cache smaller than its window's union loads: the window manager itself
    run over a sequence of predicted sets (a layer's masks (T, neurons), the first
    CACHE_TOKENS) for each window k and a cache of each share of the neurons.

    A small cache is not a shorter window: it keeps the neurons used again and
    again (they are never the least recent), so it hits more than the share of
    the union it holds. On the FATReLU Llama-2-7B shape at 50% (caches of 16% of a
    layer, windows' unions of 35-67%), interpolating over the rows held foresaw
    1642 MB read a token, these loads 1367, and the run read 1357.

    Returns:
        {"share": [...], "loaded_at": [[fraction of the neurons read per token (into
        the cache or through scratch) at each share] per k]}, from token max(ks)
        on, as `window_reuse`.
    """
    masks = np.asarray(masks, dtype=bool)[:CACHE_TOKENS]
    tokens, neurons = masks.shape
    start = min(max(ks), max(tokens - 1, 0))
    sets = [np.flatnonzero(m) for m in masks]
    # no window (k = 0) reads every set whatever the cache, and a cache with room
    # for the window's union loads what the window does: nothing to simulate
    reuse = window_reuse(masks, ks)
    loaded = []
    for i, k in enumerate(ks):
        row = []
        for share in shares:
            if k == 0 or share >= reuse["cached"][i]:
                row.append(reuse["loaded"][i])
                continue
            window = LayerWindow(neurons, max(int(share * neurons), 1), k)
            read = 0
            for t, active in enumerate(sets):
                plan = window.step(active)
                if t >= start:
                    read += len(plan.load_ids) + len(plan.scratch_ids)
            row.append(read / (max(tokens - start, 1) * neurons))
        loaded.append(row)
    return {"share": list(shares), "loaded_at": loaded}
