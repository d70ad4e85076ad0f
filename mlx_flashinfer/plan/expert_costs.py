"""What one decoded token of a mixture of experts costs under the experts placement
(`flash/experts.py`): per layer the router picks k experts, the cache holds some of
them, the rest are read straight into their rows (each expert one bundle, read
whole) while the cached ones compute, and the k experts compute; the same three
terms as `costs.py`, from the same curves.

Without a recorded routing the hit rate follows from how often each expert is
routed, as if the cache kept the least recently routed experts out first (the
runtime evicts by decayed routing counts, which does a little better: 6% fewer
reads on the OLMoE-shaped model): for a cache of c experts under independent
routings, Che's approximation of an LRU cache (Che, Tung and Wang 2002): the time T
(in tokens) an expert stays cached solves sum_e (1 - exp(-r_e T)) = c, and an
expert routed r_e times a token hits with probability 1 - exp(-r_e T). A layout
whose routing was recorded (`flashinfer train-predictor`, `predictors/routing.py`)
gives each expert's measured rate and, better, the hit rate measured by decoding
its calibration tokens through the window itself at a grid of capacities (reuse
from token to token included, which Che's independent routings miss): that curve
is used, interpolated. Without it every expert is taken as equally popular (hit
rate c / E): the floor, since real routers prefer some experts and reuse them token
to token; the prediction's note says which.
"""

from __future__ import annotations

import math

import numpy as np

from ..flash.experts import BACKGROUND_READ
from ..flash.landing import lands_direct
from ..flash.memory import MemoryPlan, model_bytes
from ..flash.reader import DEFAULT_CHUNK, DEFAULT_THREADS
from ..formats.layout import Layout
from ..predictors.routing import recorded_hit_rate, routing_source
from .costs import (
    PAGING_S_PER_GB,
    WINDOW_STEP_S,
    TokenCost,
    compute_seconds,
    disk_seconds,
    ffn_kinds,
    read_align,
    read_cpu_seconds,
    resident_products,
)
from .disk import throughput_at
from .machine import Machine

# Reads ahead (the next layer's router on this layer's input) read this much more
# for their wrong guesses, and hide this share of what is left of a layer's reads
# behind its compute. Measured with reads ahead into the cache (OLMoE- and
# Qwen3-30B-A3B-shaped q4 at 50%, Intel Xeon 2 vCPU, docs/moe.md): 35% more bytes
# on both; 217-234 ms a token against 180-220 without, which these two figures
# give (0.5 hidden and no extra bytes predicted 141 against 234, and made the
# planner choose reads ahead). Two cores: more would hide more.
AHEAD_EXTRA = 0.35
AHEAD_HIDDEN = 0.25
# OS paging's experts estimate is a floor: the kernel's page cache keeps fewer
# experts than an LRU of its room would, and its readahead reads their neighbours
# (OLMoE-shaped q4 at 50-90%: 4.1, 3.5, 2.4, 1.6, 0.8x the bytes, 1.8-3.5x the time;
# benchmarks/results/moe_paging_sweep_olmoe_q4.json)
PAGING_FLOOR = "a floor: measured 1.8-3.5x slower at 50-90% of an OLMoE-shaped model"


def lru_hit_rate(rates: np.ndarray, capacity: float) -> float:
    """The share of routings that find their expert cached, for a cache of
    `capacity` experts kept least recently routed first, `rates` the routings of
    each expert per token (Che's approximation, independent routings)."""
    rates = np.asarray(rates, dtype=float)
    if capacity >= np.count_nonzero(rates):
        return 1.0
    if capacity <= 0:
        return 0.0

    def held(t: float) -> float:
        return float(np.sum(1 - np.exp(-rates * t)))

    low, high = 0.0, 1.0
    while held(high) < capacity:
        high *= 2
    for _ in range(60):  # bisection: held(t) grows with t
        mid = (low + high) / 2
        low, high = (mid, high) if held(mid) < capacity else (low, mid)
    t = (low + high) / 2
    return float(np.sum(rates * (1 - np.exp(-rates * t))) / np.sum(rates))


def routing_rates(layout: Layout) -> tuple[list[np.ndarray], str]:
    """Per layer, each expert's routings per token (they sum to experts_per_token),
    and where they came from: as recorded (`predictors/routing.py`), else equal
    shares."""
    recorded = layout.manifest.get("routing")
    if recorded:
        return [np.array(r) for r in recorded["rates"]], routing_source(recorded)
    args = layout.args
    k, experts = args.experts_per_token, args.num_experts
    uniform = np.full(experts, k / experts)
    return [uniform] * args.num_hidden_layers, "every expert equally popular (assumed)"


def hit_rates(layout: Layout, capacities: list) -> tuple[list[float], str]:
    """Per layer, the share of its routings an experts cache of capacities[layer]
    experts finds cached: the recorded curve (`predictors/routing.py`) where the
    layout has one, else Che's approximation from the routing rates; and where
    they came from."""
    rates, source = routing_rates(layout)
    recorded = layout.manifest.get("routing")
    if recorded:
        hits = [recorded_hit_rate(recorded, i, c) for i, c in enumerate(capacities)]
    else:
        hits = [lru_hit_rate(r, c) for r, c in zip(rates, capacities, strict=True)]
    return hits, source


def routed_compute(layout: Layout, machine: Machine, threads: str) -> float:
    """A decoded token's products: the resident weights (attention, routers, shared
    experts) and each layer's k routed experts, with an FFN call per expert."""
    args = layout.args
    layers, k = args.num_hidden_layers, args.experts_per_token
    kinds = resident_products(layout)
    for kind, nbytes in ffn_kinds(layout).items():  # one bundle: an expert's parts
        kinds[kind] = kinds.get(kind, 0) + layers * k * nbytes
    shared = 1 if args.shared_expert_size else 0
    return compute_seconds(machine, layout, kinds, threads, layers * (k + shared))


def experts_dense_cost(
    layout: Layout, machine: Machine, threads: str = "1"
) -> TokenCost:
    """Every expert in DRAM: the routed experts' products, nothing read."""
    return TokenCost("dense", 0.0, 0.0, routed_compute(layout, machine, threads))


def experts_cost(
    layout: Layout,
    plan: MemoryPlan,
    machine: Machine,
    window: int,
    threads: str = "1",
) -> TokenCost:
    """The experts placement under `plan`: per layer, the routed experts the cache
    misses (all of them with `window` 0, which keeps nothing) read straight into
    their rows in calls of BACKGROUND_READ bytes (no staging copy: the reader's
    per-call and per-read work only, for bundles on the alignment; others copied
    from the staging buffer), while the cached ones compute (a layer's
    reads hide up to its hits' products); the k routed experts and the resident
    weights (attention, routers, shared experts) multiplied on `threads`; reads
    ahead (`plan.lookahead`) read AHEAD_EXTRA more for wrong guesses and hide
    AHEAD_HIDDEN of a layer's reads behind its compute."""
    args = layout.args
    k, row = args.experts_per_token, layout.bundle_bytes
    hits, source = hit_rates(layout, plan.capacity)
    hits = hits if window > 0 else [0.0] * len(hits)  # window 0 keeps nothing
    align = read_align(machine)
    # bundles on the alignment land straight in their rows; others go through the
    # staging buffer: aligned reads around them, and a copy of every byte
    direct = lands_direct(layout, align)
    extra, landed = (0, 0.0) if direct else (align, 1.0)
    chunks = math.ceil((row + extra) / DEFAULT_CHUNK)  # reads an expert takes
    # an expert's products, as a share of all routed ones (rates depend on size)
    routed = args.num_hidden_layers * k
    kinds = {kind: routed * nbytes for kind, nbytes in ffn_kinds(layout).items()}
    one_expert = compute_seconds(machine, layout, kinds, threads, routed) / routed
    bytes_read = reads = cpu = disk = behind = 0.0
    for hit in hits:
        misses = k * (1 - hit)
        if misses <= 0:
            continue
        calls = max(1.0, misses * row / BACKGROUND_READ)
        call_reads, call_bytes = misses * chunks, misses * (row + extra)
        reads += call_reads
        bytes_read += call_bytes
        layer_cpu = calls * read_cpu_seconds(
            machine, DEFAULT_THREADS, call_reads / calls, landed * call_bytes / calls
        )
        layer_disk = calls * disk_seconds(
            machine, call_reads / calls, call_bytes / calls
        )
        cpu += layer_cpu
        disk += layer_disk
        # the cached experts compute while the misses are read
        behind += min(layer_cpu + layer_disk, (k - misses) * one_expert)
    layers = args.num_hidden_layers
    compute = routed_compute(layout, machine, threads)
    io = cpu + disk - behind
    overlap = AHEAD_HIDDEN if plan.lookahead else 0.0
    if plan.lookahead:  # wrong guesses: more bytes, read beside the right ones
        bytes_read *= 1 + AHEAD_EXTRA
        io += AHEAD_EXTRA * (cpu + disk)
    hidden = overlap * min(io, compute)
    memory = layers * WINDOW_STEP_S  # loads land in evicted slots: no row moves
    ahead = (
        f"; reads ahead read {AHEAD_EXTRA:.0%} more and hide {AHEAD_HIDDEN:.0%} "
        "(measured on two cores)"
        if overlap
        else ""
    )
    return TokenCost(
        "experts",
        io - hidden,
        memory,
        compute,
        bytes_read=bytes_read,
        read_size=bytes_read / reads if reads else 0.0,
        hidden_io_s=hidden + behind,
        note=f"routing: {source}{ahead}",
        overlap=overlap,
        overlap_cap_s=overlap * compute,
        io_fixed_s=cpu,
    )


def experts_paging_cost(
    layout: Layout, budget: int, machine: Machine, threads: str = "1"
) -> TokenCost:
    """OS paging (the experts memory-mapped), for comparison: the page cache holds
    what the budget leaves beside the resident weights, shared by the layers, and
    evicts the least recently used; a routed expert not in it faults in whole, by
    the faulting thread with the kernel's readahead (a sequential stream), and
    compute waits for it. Measured against `benchmarks/moe_speed.py --paging` on
    moe-small (docs/moe.md): right where the page cache holds most experts,
    optimistic where it thrashes."""
    args = layout.args
    resident, _ = model_bytes(layout)
    row, k = layout.bundle_bytes, args.experts_per_token
    room = max(budget - resident, 0) / row / args.num_hidden_layers  # experts a layer
    hits, _ = hit_rates(layout, [room] * args.num_hidden_layers)
    missed = sum(k * (1 - hit) * row for hit in hits)
    rate = throughput_at(machine.disk, min(row, DEFAULT_CHUNK), 1, sequential=True)
    compute = routed_compute(layout, machine, threads)
    faults = missed / 1e9 * PAGING_S_PER_GB
    return TokenCost(
        "OS paging",
        missed / rate,
        faults,
        compute,
        missed,
        read_size=row,
        note=PAGING_FLOOR,
    )
