"""The memory plan of the experts placement (`flash/experts.py`): a budget into
expert cache rows per layer, refused with the exact shortfall.

The budget bounds what the placement holds: resident weights (embeddings, attention,
norms, the routers, a shared expert), the reader's staging buffer, the windows'
bookkeeping and the expert caches, one row per expert (its whole bundle, as
stored). Every layer can hold at least one token's experts (`experts_per_token`), so
a decoded token never reads an expert twice; the rest of the budget is shared
equally between the layers, up to every expert.
"""

from __future__ import annotations

from ..formats.layout import Layout
from .direct_io import DEFAULT_STAGING, MAX_ALIGN, staging_size
from .memory import (
    MemoryPlan,
    format_bytes,
    held_as,
    io_buffer_bytes,
    model_bytes,
    parse_budget,
    share_rows,
)
from .window import SLOT_BYTES, LayerWindow


def ahead_buffer_bytes(layout: Layout) -> int:
    """The reads ahead's staging buffer: room for one token's experts of a layer in
    one round (a read ahead fetches one round), or the reader's default if larger."""
    args = layout.args
    experts = args.experts_per_token * (layout.bundle_bytes + 2 * MAX_ALIGN)
    return staging_size(
        layout.layers, layout.bundle_bytes, cap=max(DEFAULT_STAGING, experts)
    )


def experts_buffers(layout: Layout, lookahead: bool = False) -> int:
    """The read buffers: the reader's staging, and with `lookahead` the reads
    ahead's."""
    return io_buffer_bytes(layout) + (ahead_buffer_bytes(layout) if lookahead else 0)


def experts_floor(layout: Layout, lookahead: bool = False) -> int:
    """Bytes the experts placement holds before any expert row: resident weights,
    the read buffer(s) and the windows' fixed bookkeeping. Each row then costs
    `layout.bundle_bytes + SLOT_BYTES`."""
    args = layout.args
    resident, _ = model_bytes(layout)
    per_layer = LayerWindow.bookkeeping_bytes(args.num_experts, 0, decayed=True)
    window = args.num_hidden_layers * per_layer
    return resident + experts_buffers(layout, lookahead) + window


def plan_experts(
    layout: Layout,
    budget: str | int,
    kv_cache: int,
    max_context: int,
    lookahead: bool = False,
) -> MemoryPlan:
    """Split a budget into resident weights, the read buffer and expert caches
    (with `lookahead`, a second read buffer: the reads ahead's, `ahead_buffer_bytes`).

    Raises:
        ValueError: the budget cannot hold the resident weights, the read buffer and
            one token's experts in every layer; the message gives the exact
            shortfall.
    """
    args = layout.args
    resident, ffn = model_bytes(layout)
    amount = parse_budget(budget, resident + ffn)
    layers, experts, k = (
        args.num_hidden_layers,
        args.num_experts,
        args.experts_per_token,
    )
    row = layout.bundle_bytes + SLOT_BYTES
    floor = experts_floor(layout, lookahead)
    needed = floor + layers * k * row
    if amount < needed:
        raise ValueError(
            f"memory budget {format_bytes(amount)} is too small: resident weights "
            f"{format_bytes(resident)} + read buffer "
            f"{format_bytes(experts_buffers(layout, lookahead))} + window "
            "bookkeeping + "
            f"{k} experts of {format_bytes(layout.bundle_bytes)} in each of "
            f"{layers} layers need {format_bytes(needed)}, {needed - amount} bytes "
            "more"
        )
    capacity = share_rows((amount - floor) // row, [1.0] * layers, experts)
    return MemoryPlan(
        budget=amount,
        resident=resident,
        predictor=0,  # the routers are resident weights
        row_bytes=layout.bundle_bytes,
        capacity=capacity,
        scratch_rows=0,
        io_buffer=experts_buffers(layout, lookahead),
        kv_cache=kv_cache,
        max_context=max_context,
        dtype=held_as(layout),
        lookahead=lookahead,
        neurons=experts,
        placement="experts",
    )
