"""The memory budget and the plan it gives: what is held in DRAM, and how many neurons.

As in the paper, the budget bounds the weights held in DRAM: resident weights
(embeddings, attention, norms), the predictor, the per-layer neuron caches, the
scratch rows that carry overflow and prefill streaming, and the flash reader's
staging buffer. The KV cache at `max_context` is planned beside it. Both backends
hold weights as the layout stores them (float16, bfloat16 or float32; norms and
biases float32), so every size here is a stored size, and a percentage budget is of
the layout's weights as stored: "50%" of a float16 model is half its bytes on disk,
the paper's "model twice the DRAM".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..formats.layout import Layout
from ..formats.safetensors_stream import read_header
from .direct_io import MAX_ALIGN, staging_size
from .window import SLOT_BYTES, LayerWindow

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def model_bytes(layout: Layout) -> tuple[int, int]:
    """(resident, FFN) bytes of the model's weights as stored, and as held."""
    header, _ = read_header(layout.resident_path)
    resident = sum(
        end - begin for begin, end in (i["data_offsets"] for i in header.values())
    )
    return resident, layout.ffn_bytes


def held_as(layout: Layout) -> str:
    """What the weights are held as: the layout's storage, never widened."""
    q = layout.quantization
    if not q:
        return f"{layout.dtype} (as stored; norms and biases float32)"
    bits = "/".join(map(str, layout.part_bits))
    return (
        f"{layout.dtype}, packed as stored (FFN parts at {bits} bits, groups of "
        f"{q['group_size']} with float16 scales and biases; norms and biases float32)"
    )


def io_buffer_bytes(layout: Layout, lookahead: bool = False) -> int:
    """The flash reader's staging buffer for this layout (see `staging_size`); with
    `lookahead`, twice that: a second reader's buffer keeps the reads ahead."""
    separate = layout.arrangement == "separate"
    largest = max(layout.part_bytes) if separate else layout.bundle_bytes
    one = staging_size(layout.layers, layout.bundle_bytes, largest)
    return 2 * one if lookahead else one


def parse_size(value: str) -> int:
    """Bytes of a size given as bytes or "1.5GB" / "800MiB" (1 MB = 10**6 bytes, as
    `format_bytes` prints them).

    Raises:
        ValueError: not a size.
    """
    text = value.strip().lower().replace(" ", "")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)([kmgt]i?b|b)?", text)
    if not match:
        raise ValueError(
            f"bad size {value!r}: use bytes or a size like 1.5GB or 800MiB"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def parse_budget(value: str | int | float, whole_model: int) -> int:
    """Bytes of a budget given as bytes, "1.5GB" / "800MiB", or "50%" of `whole_model`.

    Raises:
        ValueError: an unparseable or non-positive budget.
    """
    if isinstance(value, int | float):
        amount = int(value)
    else:
        text = value.strip().lower().replace(" ", "")
        match = re.fullmatch(r"([0-9]*\.?[0-9]+)(%|[kmgt]i?b|b)?", text)
        if not match:
            raise ValueError(
                f"bad memory budget {value!r}: use bytes, a size like 1.5GB or 800MiB, "
                "or a percentage like 50%"
            )
        number, unit = float(match.group(1)), match.group(2) or ""
        amount = (
            int(whole_model * number / 100)
            if unit == "%"
            else int(number * _UNITS[unit])
        )
    if amount <= 0:
        raise ValueError(f"memory budget must be positive, got {value!r}")
    return amount


@dataclass
class MemoryPlan:
    """Bytes held in DRAM, by part, for one budget."""

    budget: int
    resident: int
    predictor: int
    row_bytes: int  # one cached neuron: its whole bundle, as stored
    capacity: list[int]  # cache rows per layer
    scratch_rows: int  # overflow / prefill-streaming rows, shared by all layers
    io_buffer: int  # the flash readers' staging buffers
    kv_cache: int  # at max_context (float32 keys and values)
    max_context: int
    dtype: str = "float16"  # what weights are held as (`held_as`): as stored
    lookahead: bool = False  # reads ahead: half of io_buffer is the prefetch buffer
    neurons: int = 0  # FFN neurons per layer (for the window's bookkeeping)
    # "sparse": neurons read when predicted, cached over a window (flash/ffn.py);
    # "streamed": capacity rows per layer held, the rest read every token into a
    # ring of ring_slots spans of chunk_rows bundles (flash/streamed.py); "experts":
    # capacity experts per layer cached, routed ones read at once (flash/experts.py,
    # expert_plan.py: `neurons` and rows are experts)
    placement: str = "sparse"
    chunk_rows: int = 0
    ring_slots: int = 0

    @property
    def slot_bytes(self) -> int:
        return slot_bytes(self.chunk_rows, self.row_bytes)

    @property
    def ring_bytes(self) -> int:
        return self.ring_slots * self.slot_bytes

    @property
    def staging_bytes(self) -> int:
        """The reader's own staging buffer (io_buffer without the ring)."""
        return self.io_buffer - self.ring_bytes

    @property
    def cache_bytes(self) -> int:
        return sum(self.capacity) * self.row_bytes

    @property
    def scratch_bytes(self) -> int:
        return self.scratch_rows * self.row_bytes

    @property
    def window_bytes(self) -> int:
        """The window manager's bookkeeping arrays, per layer."""
        if self.placement == "streamed":  # no window: every row serves every token
            return 0
        n, decayed = self.neurons, self.placement == "experts"  # experts: counts
        return sum(
            LayerWindow.bookkeeping_bytes(n, cap, decayed) for cap in self.capacity
        )

    @property
    def weights(self) -> int:
        """Everything the budget bounds (never more than the budget)."""
        return (
            self.resident
            + self.predictor
            + self.cache_bytes
            + self.scratch_bytes
            + self.io_buffer
            + self.window_bytes
        )

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def rows(self, neurons: int) -> list[tuple[str, str]]:
        """Table rows (name, value) for display; `neurons` = FFN neurons per layer."""
        share = 100 * sum(self.capacity) / (neurons * len(self.capacity))
        low, high = min(self.capacity), max(self.capacity)
        caps = f"{low}" if low == high else f"{low}-{high}"
        if self.placement == "experts":
            share = 100 * sum(self.capacity) / (self.neurons * len(self.capacity))
            middle = [
                (
                    "expert cache",
                    f"{format_bytes(self.cache_bytes)} ({caps} of {self.neurons} "
                    f"experts per layer, {share:.1f}% of them)",
                ),
                (
                    "read buffer",
                    format_bytes(self.io_buffer)
                    + (" (half of it for reads ahead)" if self.lookahead else ""),
                ),
                ("window", format_bytes(self.window_bytes)),
            ]
        elif self.placement == "streamed":
            streamed = 100 - share
            middle = [
                (
                    "FFN held",
                    f"{format_bytes(self.cache_bytes)} ({caps} of {neurons} neurons "
                    f"per layer, {share:.1f}% of the FFN)",
                ),
                (
                    "FFN streamed",
                    f"{streamed:.1f}% of the FFN read every token, ahead of compute",
                ),
                (
                    "read buffer",
                    f"{format_bytes(self.io_buffer)} (a ring of {self.ring_slots} "
                    f"spans of {self.chunk_rows} neurons)",
                ),
            ]
        else:
            middle = [
                ("predictor", format_bytes(self.predictor)),
                (
                    "neuron cache",
                    f"{format_bytes(self.cache_bytes)} ({caps} of {neurons} neurons "
                    f"per layer, {share:.1f}% of the FFN)",
                ),
                (
                    "scratch",
                    f"{format_bytes(self.scratch_bytes)} ({self.scratch_rows} rows)",
                ),
                (
                    "read buffer",
                    format_bytes(self.io_buffer)
                    + (" (half of it for reads ahead)" if self.lookahead else ""),
                ),
                ("window", format_bytes(self.window_bytes)),
            ]
        return [
            ("budget", format_bytes(self.budget)),
            ("placement", self.placement),
            ("held as", self.dtype),
            ("resident", format_bytes(self.resident)),
            *middle,
            ("weights total", f"{format_bytes(self.weights)} (<= budget)"),
            ("KV cache", f"{format_bytes(self.kv_cache)} at {self.max_context} tokens"),
            ("total", format_bytes(self.total)),
        ]


def format_bytes(n: float) -> str:
    """Human-readable bytes (decimal units: 1 MB = 10**6 bytes)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def share_rows(rows: int, demand: list[float], cap: int) -> list[int]:
    """`rows` split in proportion to `demand`, none above `cap` (what a full layer
    cannot take goes to the others); whole rows, never more than `rows` in all."""
    # a layer with no measured demand still takes rows the others cannot
    demand = [max(d, 1e-12) for d in demand]
    shares = [0] * len(demand)
    open_layers = list(range(len(demand)))
    left = rows
    while open_layers and left > 0:
        total = sum(demand[i] for i in open_layers)
        want = {i: left * demand[i] / total for i in open_layers}  # fractional rows
        full = [i for i in open_layers if shares[i] + want[i] >= cap]
        if not full:
            for i in open_layers:
                shares[i] += int(want[i])
            left = rows - sum(shares)
            # the rows lost to rounding down: one each, largest demand first
            for i in sorted(open_layers, key=lambda i: -demand[i])[:left]:
                shares[i] += 1
            break
        for i in full:
            left -= cap - shares[i]
            shares[i] = cap
        open_layers = [i for i in open_layers if i not in full]
    return shares


def layer_demand(layout: Layout, predictor: str) -> list[float] | None:
    """Each layer's share of neurons needed per token, as the predictor's report in
    the manifest measured it (on calibration text, or simulated for a synthetic
    model): what the trained predictor selects ("lowrank", "lowbit"), the truly active
    neurons for "gate" and "oracle". None (equal shares) without a report, or for
    "all", which needs every neuron everywhere."""
    report = (layout.manifest.get("predictor") or {}).get("report") or []
    key = {
        "lowrank": "predicted_fraction",
        "lowbit": "predicted_fraction",
        "gate": "true_fraction",
    }.get("gate" if predictor == "oracle" else predictor)
    if key is None or len(report) != layout.args.num_hidden_layers:
        return None
    values = [r.get(key) for r in report]
    if not all(isinstance(v, int | float) and v > 0 for v in values):
        return None
    return [float(v) for v in values]


def window_floor_bytes(layout: Layout) -> int:
    """The windows' bookkeeping before any cached row (one window per layer)."""
    args = layout.args
    return args.num_hidden_layers * LayerWindow.bookkeeping_bytes(
        args.intermediate_size, 0
    )


def plan_floor(layout: Layout, predictor_bytes: int, lookahead: bool = False) -> int:
    """Bytes a plan holds before any neuron row: resident weights, the predictor,
    the read buffer(s) and the windows' fixed bookkeeping. Each row then costs
    `layout.bundle_bytes + SLOT_BYTES`."""
    resident, _ = model_bytes(layout)
    buffers = io_buffer_bytes(layout, lookahead)
    return resident + predictor_bytes + buffers + window_floor_bytes(layout)


def plan_memory(
    layout: Layout,
    budget: str | int,
    predictor_bytes: int,
    kv_cache: int,
    max_context: int,
    lookahead: bool = False,
    demand: list[float] | None = None,
) -> MemoryPlan:
    """Split a budget into resident weights, predictor, neuron caches and scratch rows.

    The shared scratch gets as much as one layer's share (so prefill can stream a
    layer in chunks of that size); the cache rows go to the layers in proportion to
    `demand` (`layer_demand`: each layer's share of neurons predicted per token,
    measured when the predictor was made; default: equal), none above its neuron
    count.

    Raises:
        ValueError: the budget cannot hold the resident weights, the predictor, the
            read buffer and one neuron row; the message gives the exact shortfall.
    """
    resident, ffn = model_bytes(layout)
    amount = parse_budget(budget, resident + ffn)
    args = layout.args
    row = layout.bundle_bytes
    io_buffer = io_buffer_bytes(layout, lookahead)
    layers, neurons = args.num_hidden_layers, args.intermediate_size
    window = window_floor_bytes(layout)
    floor = plan_floor(layout, predictor_bytes, lookahead)
    needed = floor + row + SLOT_BYTES
    if amount < needed:
        raise ValueError(
            f"memory budget {format_bytes(amount)} is too small: resident weights "
            f"{format_bytes(resident)} + predictor {format_bytes(predictor_bytes)} + "
            f"read buffer {format_bytes(io_buffer)} + window bookkeeping "
            f"{format_bytes(window)} + one neuron row need "
            f"{format_bytes(needed)}, "
            f"{needed - amount} bytes more"
            + (
                "; a smaller predictor also helps (the low-rank one: `flashinfer "
                "train-predictor DIR --kind lowrank [--rank R]`)"
                if predictor_bytes
                else ""
            )
        )
    # each row: its bundle and (cached rows) its window slot
    rows = (amount - floor) // (row + SLOT_BYTES)
    scratch = min(neurons, max(1, rows // (layers + 1)))
    capacity = share_rows(rows - scratch, demand or [1.0] * layers, neurons)
    return MemoryPlan(
        budget=amount,
        resident=resident,
        predictor=predictor_bytes,
        row_bytes=row,
        capacity=capacity,
        scratch_rows=scratch,
        io_buffer=io_buffer,
        kv_cache=kv_cache,
        max_context=max_context,
        dtype=held_as(layout),
        lookahead=lookahead,
        neurons=neurons,
    )


# The streamed placement's ring: spans of about 8 MiB (the disk's large-read rate is
# reached from 1 MiB reads over 16 threads: disk probe), 8 slots, so the reads run up
# to 64 MiB ahead: enough to cover the compute of a layer's held rows, when the disk
# is idle otherwise (a 7B layer computes in ~20 ms, in which ~50 MB stream).
STREAM_CHUNK_BYTES = 8 << 20
STREAM_SLOTS = 8


def slot_bytes(chunk_rows: int, row_bytes: int) -> int:
    """A ring slot: a span of `chunk_rows` bundles with the alignment around it, in
    whole aligned blocks (so every slot starts aligned for O_DIRECT)."""
    return -(-(chunk_rows * row_bytes + 2 * MAX_ALIGN) // MAX_ALIGN) * MAX_ALIGN


def plan_streamed(
    layout: Layout,
    budget: str | int,
    kv_cache: int,
    max_context: int,
    chunk_bytes: int = STREAM_CHUNK_BYTES,
    slots: int = STREAM_SLOTS,
) -> MemoryPlan:
    """A streamed plan (`flash/streamed.py`): resident weights, the reader's staging
    buffer and the ring first; the rest of the budget holds the same share of every
    layer's neurons, and the others are streamed every token.

    Raises:
        ValueError: the budget cannot hold the resident weights, the buffers and the
            ring; the message gives the exact shortfall.
    """
    resident, ffn = model_bytes(layout)
    amount = parse_budget(budget, resident + ffn)
    args = layout.args
    layers, neurons, row = (
        args.num_hidden_layers,
        args.intermediate_size,
        layout.bundle_bytes,
    )
    staging = io_buffer_bytes(layout)
    chunk_rows = max(1, min(neurons, chunk_bytes // row))
    # at most half a token's spans: a deeper ring reads no sooner (and a small
    # model's would outgrow its FFN)
    slots = max(2, min(slots, layers * -(-neurons // chunk_rows) // 2))
    ring = slots * slot_bytes(chunk_rows, row)
    if amount >= resident + staging + layers * neurons * row:  # the FFN fits whole
        capacity, chunk_rows, slots, ring = [neurons] * layers, 0, 0, 0
    else:
        floor = resident + staging + ring
        if amount < floor:
            raise ValueError(
                f"memory budget {format_bytes(amount)} is too small to stream: "
                f"resident weights {format_bytes(resident)} + read buffer "
                f"{format_bytes(staging)} + the ring of {slots} spans "
                f"{format_bytes(ring)} need {format_bytes(floor)}, "
                f"{floor - amount} bytes more"
            )
        held = (amount - floor) // row
        capacity = share_rows(held, [1.0] * layers, neurons)
    return MemoryPlan(
        budget=amount,
        resident=resident,
        predictor=0,
        row_bytes=row,
        capacity=capacity,
        scratch_rows=0,
        io_buffer=staging + ring,
        kv_cache=kv_cache,
        max_context=max_context,
        dtype=held_as(layout),
        neurons=neurons,
        placement="streamed",
        chunk_rows=chunk_rows,
        ring_slots=slots,
    )
