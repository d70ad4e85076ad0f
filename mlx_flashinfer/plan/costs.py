"""What one decoded token costs under a plan: the paper's three terms (loading from
flash, managing memory in DRAM, computing; section 2, Table 3), with the overlap a
placement has, predicted from the machine's curves (`machine.py`), the layout's
bytes and the model's statistics (the predictor's report: the share of neurons
predicted per layer and what a window of k tokens loads and holds).

- compute: a decode step reads every weight it multiplies once, so its time is those
  bytes / the GEMV rate of their dtype (one thread while flash reads run beside it,
  every core otherwise; the caches' rate for small working sets), plus each layer's
  small operations.
- I/O: bytes / the disk's rate at the read size and parallelism the reads have.
- memory: the window's bookkeeping and the rows moved or copied in.

Every prediction states where its statistics came from; a measured run shows its
own figures beside them (`flashinfer bench`: `predicted_ms`, `measured_ms`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..flash.landing import lands_direct
from ..flash.memory import MemoryPlan, model_bytes
from ..flash.reader import DEFAULT_CHUNK, DEFAULT_MAX_GAP, DEFAULT_THREADS
from ..flash.uring import RING_ENTRIES
from ..formats.layout import Layout
from ..formats.safetensors_stream import read_header
from .compute_probe import CACHED_BYTES, COLUMNS, NARROW, SIDE, WIDE
from .disk import has_ring, throughput_at
from .machine import Machine
from .reader_cost import call_seconds
from .statistics import window_stats

# The fixed costs a token pays per layer on the sparse path beyond its products,
# measured here (NumPy, 2 cores): the window's bookkeeping (`LayerWindow.step`:
# 86-178 us from 1,536 to 16,384 neurons and 3% to 67% of them predicted) and,
# where the probe did not measure the reader, its hand-off to its threads
# (100-150 us a call).
WINDOW_STEP_S = 130e-6
READ_CALL_S = 120e-6
# The reader's own work per read (a run of neighbouring bundles) where the probe did
# not measure the reader, for reads from memory (from a disk, the probe's cells time
# it: `read_cpu_seconds`): planning it, the call, landing its rows. Measured once
# (Intel Xeon, 2 cores, NumPy, 2026-12-06): the compute-only row of a
# Llama-2-7B-shaped FATReLU layout at 50%
# (benchmarks/results/plan_llama2-7b-relu_50.json), whose reads are copies from
# DRAM, spent 819 ms on 42,832 reads per token, 62 ms of it the copies at memory's
# rate: 18 us a read.
READ_RUN_S = 18e-6
# OS paging's cost beyond the reads: a fault per 4 KiB page and the reclaim of the
# page cache at the memory limit, per GB paged in. Measured once (Intel Xeon, 2
# cores, 2026-12-06: Llama-2-7B-shaped SiLU layout at 50%, 8.54 GB paged per token:
# compute 1870 ms beside the faults against 1239 ms dense, reads at the probe's
# rate) and held to the other budgets' runs (docs/planner.md).
PAGING_S_PER_GB = 0.075
# where a decode step's weights stop coming from the CPU's caches (see gemv_rate)
MEMORY_REACHED = 4 * CACHED_BYTES
_DTYPE_KIND = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


@dataclass
class TokenCost:
    """Predicted seconds of one decoded token, by the paper's three terms."""

    placement: str
    io_s: float  # waiting for reads (what compute does not hide)
    memory_s: float
    compute_s: float
    bytes_read: float = 0.0  # per token
    read_size: float = 0.0  # mean bytes a read
    hidden_io_s: float = 0.0  # reads that run behind compute
    note: str = ""
    # how the reads overlap compute: hidden = min(overlap x reads, overlap_cap_s);
    # io_fixed_s: the reads' CPU share (the reader's calls and copies)
    overlap: float = 0.0
    overlap_cap_s: float = 0.0
    io_fixed_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.io_s + self.memory_s + self.compute_s

    def at_disk_rate(self, bytes_per_s: float) -> TokenCost:
        """The same token with its reads at `bytes_per_s`, the overlap kept: what
        the model predicts given the rate a run's reads actually got (a validation
        that separates the model's error from the disk's drift). That rate is a
        run's bytes over all its reads' time, the reader's own work included, so
        nothing is added to it (adding the foreseen work counted it twice: the
        default model's sparse row 1.39 of measured, 1.23 without)."""
        reads = self.bytes_read / bytes_per_s
        hidden = min(self.overlap * reads, self.overlap_cap_s)
        return replace(self, io_s=reads - hidden, hidden_io_s=hidden)

    def line(self) -> str:
        """ "412 ms/token (I/O 105, memory 58, compute 249)"."""
        return (
            f"{1e3 * self.total_s:.0f} ms/token (I/O {1e3 * self.io_s:.0f}, memory "
            f"{1e3 * self.memory_s:.0f}, compute {1e3 * self.compute_s:.0f})"
        )


def resident_products(layout: Layout, only: str | None = None) -> dict[str, int]:
    """Bytes of the resident matrices a decode step multiplies (attention, the head),
    by stored kind ("float16", "q4", ...): not the embedding table, of which a
    token reads one row (unless it is the head too). `only`: of that matrix alone."""
    header, _ = read_header(layout.resident_path)
    quantized = (layout.quantization or {}).get("tensors") or {}
    tied = layout.args.tie_word_embeddings
    out: dict[str, int] = {}
    for name, info in header.items():
        base = name.rsplit(".", 1)[0]
        if base in ("embed_tokens", "embed_positions") and not (
            tied and base == "embed_tokens"
        ):
            continue
        if only is not None and base != only:
            continue
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        if base + ".weight" in quantized:  # its packed integers, scales, biases
            kind = f"q{quantized[base + '.weight']}"
        elif len(info["shape"]) == 2:
            kind = _DTYPE_KIND.get(info["dtype"], "float32")
        else:
            continue  # norms and biases: counted in the layers' small operations
        out[kind] = out.get(kind, 0) + nbytes
    return out


def head_products(layout: Layout) -> dict[str, int]:
    """Bytes of the head's matrix by stored kind (the embedding's when tied), which
    a prompt multiplies for its last token alone (`Model.prefill`)."""
    tied = layout.args.tie_word_embeddings
    return resident_products(layout, only="embed_tokens" if tied else "lm_head")


def ffn_kinds(layout: Layout) -> dict[str, int]:
    """Bytes of one neuron's bundle, by the stored kind of each part; the last part
    (down, fc2) is multiplied as columns ("float16 columns"), at its own rate."""
    out: dict[str, int] = {}
    bits = layout.part_bits if layout.quantization else None
    last = len(layout.part_bytes) - 1
    for p, nbytes in enumerate(layout.part_bytes):
        kind = f"q{bits[p]}" if bits else layout.dtype
        if p == last:
            kind = f"{kind} {COLUMNS}"
        out[kind] = out.get(kind, 0) + nbytes
    return out


def gemv_rate(
    machine: Machine,
    kind: str,
    threads: str,
    working_set: float,
    width: int | None = None,
) -> float:
    """Weight bytes/s of a decode step's products of `kind`: the caches' rate for a
    working set up to CACHED_BYTES, memory's from MEMORY_REACHED, between them
    interpolated in log space. (A 255 MB working set, the default model's float16
    step, multiplied at memory's rate on the Xeon whose L3 says 480 MiB: 7.6 GB/s
    against 7.8 from memory and 16.5 cached, one thread.) Matrices `width` wide,
    narrower than the probe's, go toward the probe's narrow rate (its share of the
    SIDE-wide one's, at NARROW columns; interpolated in log width), wider ones
    toward its rate at WIDE columns."""
    # a probe made before the columns' rates were kept: the rows' rate
    rates = machine.gemv.get(kind) or machine.gemv.get(kind.split()[0])
    rates = rates or machine.gemv["float16"]
    cached = rates.get(f"{threads} cached", rates[threads])
    low, high = math.log(CACHED_BYTES), math.log(MEMORY_REACHED)
    w = min(1.0, max(0.0, (math.log(max(working_set, 1)) - low) / (high - low)))
    rate = math.exp((1 - w) * math.log(cached) + w * math.log(rates[threads]))
    half = machine.gemv.get("float16", {})
    if width and width < SIDE and "1 narrow" in half:
        narrow = math.log(SIDE / max(width, NARROW)) / math.log(SIDE / NARROW)
        rate *= (half["1 narrow"] / half["1"]) ** narrow
    if width and width > SIDE and "1 wide" in half:
        wide = math.log(min(width, WIDE) / SIDE) / math.log(WIDE / SIDE)
        rate *= (half["1 wide"] / half["1"]) ** wide
    return rate


def compute_seconds(
    machine: Machine,
    layout: Layout,
    kinds: dict[str, float],
    threads: str,
    ffn_calls: float | None = None,
) -> float:
    """A token's products over `kinds` (bytes by stored kind), plus every layer's
    small operations and the fixed cost of its FFN calls (`ffn_calls` in all;
    default one a layer)."""
    working_set = sum(kinds.values())
    width = layout.args.hidden_size  # of nearly every product's rows
    products = sum(
        nbytes / gemv_rate(machine, kind, threads, working_set, width)
        for kind, nbytes in kinds.items()
    )
    layers = layout.args.num_hidden_layers
    calls = layers if ffn_calls is None else ffn_calls
    return products + layers * machine.layer_s + calls * machine.ffn_call_s


def _add(a: dict, b: dict, scale: float = 1.0) -> dict:
    out = dict(a)
    for kind, nbytes in b.items():
        out[kind] = out.get(kind, 0) + scale * nbytes
    return out


def dense_cost(layout: Layout, machine: Machine, threads: str = "all") -> TokenCost:
    """Every weight in DRAM: products on `threads` ("all" cores, or "1"), nothing
    read."""
    ffn = layout.args.num_hidden_layers * layout.args.intermediate_size
    kinds = _add(resident_products(layout), ffn_kinds(layout), ffn)
    compute = compute_seconds(machine, layout, kinds, threads)
    return TokenCost("dense", 0.0, 0.0, compute)


def streamed_cost(
    layout: Layout, plan: MemoryPlan, machine: Machine, threads: str = "all"
) -> TokenCost:
    """The streamed placement: every neuron computed, the rows not held read in
    spans, each in one large read, behind compute (the ring runs ahead across layers
    and tokens): the token takes the longer of the two. MLX copies each span in
    (memory)."""
    args = layout.args
    n, row = args.intermediate_size, layout.bundle_bytes
    streamed = sum(n - held for held in plan.capacity) * row
    ffn = args.num_hidden_layers * n
    kinds = _add(resident_products(layout), ffn_kinds(layout), ffn)
    # an FFN call over the held rows and one a span
    spans = max(plan.chunk_rows, 1)
    calls = sum(1 + math.ceil((n - held) / spans) for held in plan.capacity)
    compute = compute_seconds(machine, layout, kinds, threads, calls)
    # a span read whole, one request at a time (flash/streamed.py)
    span = plan.chunk_rows * row
    # the reads run beside compute: the disk's rate then, where the probe has it
    busy = machine.disk.get("beside_compute")
    rate = busy["bytes_per_s"] if busy else throughput_at(machine.disk, span, 1, True)
    io = streamed / rate if streamed else 0.0
    memory = streamed / machine.memory_bytes_per_s if machine.backend == "mlx" else 0
    hidden = min(io, compute + memory)
    return TokenCost(
        "streamed",
        io - hidden,
        memory,
        compute,
        bytes_read=streamed,
        read_size=span if streamed else 0,
        hidden_io_s=hidden,
        overlap=1.0,
        overlap_cap_s=compute + memory,
    )


def paging_cost(
    layout: Layout, budget: int, machine: Machine, threads: str = "all"
) -> TokenCost:
    """OS paging (the FFN memory-mapped), for comparison: the page cache holds what
    the budget leaves beside the resident weights; a token scans the whole FFN in
    order, which an LRU cache smaller than the scan serves not at all, so every
    byte is read again every token, by the faulting thread with the kernel's
    readahead (a sequential stream), and compute waits for it. (Reads beside
    compute were tried: at the rate each paging row's reads got, they foresaw
    0.67-0.94 of eight measured rows, NumPy and MLX, where reads + compute foresee
    0.85-1.18.)"""
    resident, ffn = model_bytes(layout)
    room = max(budget - resident, 0)
    missed = ffn if ffn > room else 0
    rate = throughput_at(machine.disk, DEFAULT_CHUNK, 1, sequential=True)
    compute = dense_cost(layout, machine, threads).compute_s
    faults = missed / 1e9 * PAGING_S_PER_GB  # memory management: the kernel's
    return TokenCost(
        "OS paging", missed / rate, faults, compute, missed, read_size=DEFAULT_CHUNK
    )


def layer_streaming_cost(
    layout: Layout, machine: Machine, chunk_bytes: int, threads: str = "all"
) -> TokenCost:
    """Layer streaming (AirLLM's way, `bench/baselines.StreamFFN`), for comparison:
    the whole FFN read every token in large sequential reads on one thread, then
    computed: no overlap."""
    _, ffn = model_bytes(layout)
    rate = throughput_at(machine.disk, min(chunk_bytes, 4 << 20), 1, sequential=True)
    compute = dense_cost(layout, machine, threads).compute_s
    return TokenCost(
        "layer streaming",
        ffn / rate,
        0.0,
        compute,
        bytes_read=ffn,
        read_size=chunk_bytes,
    )


def sparse_cost(
    layout: Layout,
    plan: MemoryPlan,
    machine: Machine,
    predictor: str,
    window: int,
    predictor_bytes: int = 0,
    stats_layout: Layout | None = None,
    *,
    rows_in_dram: bool = False,
    read_gap: int | None = None,
    reader_threads: int = DEFAULT_THREADS,
) -> TokenCost:
    """The sparse placement (flash/ffn.py): per layer the predictor runs, the window
    loads what it does not hold (fewer hits where the cache is smaller than the
    window's union), the reader fetches those bundles (runs of neighbours merged
    across small gaps; in a separate arrangement each part apart) in one call for
    the cache's new rows and one per scratch-full of the rest, and the FFN computes
    over every held row; products on one thread (the reader's threads take the
    other cores). A call costs the reader's own work (`reader_cost.py`) and the
    disk's: its reads in waves of as many as the threads take, each wave as long as
    one read takes with that many beside it. `stats_layout`: where the predictor's
    report is (the bundled twin of a separate layout). `rows_in_dram`: the
    compute-only row, whose reads are copies from memory on the calling thread.
    `read_gap`: bytes a read runs through between wanted bundles (None: the
    reader's DEFAULT_MAX_GAP); `reader_threads`: its thread pool's (where no
    io_uring reads)."""
    args = layout.args
    n = args.intermediate_size
    stats, source = window_stats(
        stats_layout or layout, predictor, window, plan.capacity
    )
    threads = 1 if rows_in_dram else reader_threads
    bytes_read = rows = reads = cached_loads = cpu = disk = 0.0
    # FFN calls: over the cached rows, one per scratch-full, and the predictor's
    ffn_calls = float(args.num_hidden_layers * (1 + (predictor != "all")))
    for (p, loaded, held), cap in zip(stats, plan.capacity, strict=True):
        union = held * n
        hit_share = min(1.0, cap / union) if union else 1.0
        load = p * n - (p - loaded) * n * hit_share  # cached hits lost to a small cache
        load = min(max(load, 0.0), p * n)
        rows += min(cap, union) + max(0.0, p * n - cap)
        # what the cache cannot hold goes through scratch, a scratch-full a call
        scratch = min(load, max(0.0, p * n - cap))
        cached_loads += load - scratch
        calls = [(load - scratch, 1)]
        if scratch and plan.scratch_rows:
            count = math.ceil(scratch / plan.scratch_rows)
            calls.append((scratch / count, count))
            ffn_calls += count
        for ids, count in calls:
            if ids < 1:
                continue
            call = read_call(
                machine,
                layout,
                ids,
                load / n,
                read_gap=read_gap,
                threads=threads,
                from_disk=not rows_in_dram,
            )
            reads += count * call[0]
            bytes_read += count * call[1]
            cpu += count * call[2]
            disk += count * call[3]
    read_size = bytes_read / reads if reads else 0.0
    io = cpu + disk
    kinds = _add(resident_products(layout), ffn_kinds(layout), rows)
    if predictor_bytes:
        kind = "q4" if predictor == "lowbit" else layout.dtype
        kinds = _add(kinds, {kind: predictor_bytes})
    compute = compute_seconds(machine, layout, kinds, "1", ffn_calls)
    # a row loaded into the cache moves one out of the way (swap-delete): row copies
    # by index, at the rate the reader lands rows
    moved = cached_loads * layout.bundle_bytes
    memory = args.num_hidden_layers * WINDOW_STEP_S + moved * row_copy_seconds(machine)
    overlap = 0.5 if plan.lookahead else 0.0  # the next layer's reads behind
    hidden = overlap * min(io, compute)  # this layer's compute
    return TokenCost(
        "sparse",
        io - hidden,
        memory,
        compute,
        bytes_read=0.0 if rows_in_dram else bytes_read,
        read_size=read_size,
        hidden_io_s=hidden,
        note=f"statistics: {source}",
        overlap=overlap,
        overlap_cap_s=overlap * compute,
        io_fixed_s=cpu,
    )


def read_align(machine: Machine) -> int:
    """The blocks O_DIRECT reads start and end on: 512 B here, a page for macOS's
    F_NOCACHE (a run reads about one block more than it needs)."""
    return 4096 if machine.disk.get("mode") == "nocache" else 512


def read_call(
    machine: Machine,
    layout: Layout,
    ids: float,
    q: float,
    *,
    read_gap: int | None = None,
    threads: int = DEFAULT_THREADS,
    from_disk: bool = True,
) -> tuple[float, float, float, float]:
    """One reader call of `ids` bundles wanted at a share `q` of those where they
    lie (1: a contiguous range): (reads, bytes, the reader's CPU seconds, the disk's
    seconds). Gaps up to `read_gap` bytes (None: the reader's DEFAULT_MAX_GAP) are
    read through; in a separate arrangement each part is read apart; bundles whose
    pieces are on the alignment land in their cache rows (DMA, no CPU: float16 OPT
    and Llama), others are read into staging and copied (q4's scale rows are 128
    bytes), as is every byte read from memory (`from_disk` False: no disk time)."""
    align = read_align(machine)
    row, pieces = layout.bundle_bytes, 1
    if layout.arrangement == "separate":  # a read per part: as many, smaller
        pieces = len(layout.part_bytes)
        row /= pieces
    read_gap = DEFAULT_MAX_GAP if read_gap is None else read_gap
    reads, nbytes = _call_reads(ids, q, row, max(int(read_gap // row), 0), align)
    reads, nbytes = pieces * reads, pieces * nbytes
    copied = 0.0 if from_disk and lands_direct(layout, align) else 1.0
    cpu = read_cpu_seconds(machine, threads, reads, copied * nbytes, from_disk)
    disk = disk_seconds(machine, reads, nbytes, threads) if from_disk else 0.0
    return reads, nbytes, cpu, disk


def _call_reads(ids: float, q: float, row: float, gap: int, align: int):
    """(reads, bytes) of one read call of `ids` pieces of `row` bytes, wanted at a
    share `q` of the pieces where they lie (taken as independent): a gap of up to
    `gap` pieces is read through, a longer one starts a new run; runs are read in
    chunks of at most DEFAULT_CHUNK."""
    q = min(max(q, 1e-9), 1.0)
    runs = max(1.0, ids * (1 - q) ** (gap + 1))
    through = ids * sum(j * q * (1 - q) ** j for j in range(1, gap + 1))
    nbytes = (ids + through) * row + runs * align
    return runs * math.ceil(nbytes / runs / DEFAULT_CHUNK), nbytes


def read_cpu_seconds(
    machine: Machine,
    threads: int,
    reads: float,
    nbytes: float,
    from_disk: bool = True,
) -> float:
    """The reader's own seconds for a call of `reads` reads whose `nbytes` the CPU
    copies (`reader_cost.call_seconds`; without a measured reader, the constants
    measured here). From a disk, the probe's cells time each read end to end
    through the same ring or threads, so a read's own work is in the disk's time:
    only the call's and the copies add to it (counting both foresaw OPT-6.7B q4's
    reads at 1.3x what they took, 207 ms a token against 125). From memory (the
    compute-only row) every read is the CPU's, and so is the copy of its bytes,
    which the probe's per-byte cost leaves out (`reader_cost.py`)."""
    fallback = (READ_CALL_S, READ_RUN_S, 1 / machine.memory_bytes_per_s)
    work = call_seconds(
        machine.reader, threads, reads, nbytes, fallback, per_read=not from_disk
    )
    if from_disk or not machine.reader:  # the fallback's per-byte cost is the copy
        return work
    return work + nbytes / machine.memory_bytes_per_s


def row_copy_seconds(machine: Machine) -> float:
    """Seconds a byte of rows copied by index costs: the reader's landing rate where
    the probe measured it, else memory's."""
    reader = machine.reader.get("1") if machine.reader else None
    return reader["byte_s"] if reader else 1 / machine.memory_bytes_per_s


def disk_seconds(
    machine: Machine, reads: float, nbytes: float, threads: int = DEFAULT_THREADS
) -> float:
    """The disk's seconds for a call's reads: waves of as many as the reader's
    `threads` take (or its io_uring, where the probe measured one), each as long as
    one read of that size with that many in flight."""
    size = nbytes / reads
    depth = RING_ENTRIES if has_ring(machine.disk) else threads
    flight = max(1.0, min(float(depth), reads))
    waves = math.ceil(reads / flight)
    rate = throughput_at(machine.disk, max(size, 512), round(flight))
    return waves * flight * size / rate
