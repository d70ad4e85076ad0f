"""The memory budget and the plan it gives: what is held in DRAM, and how many neurons.

As in the paper, the budget bounds the weights held in DRAM: resident weights
(embeddings, attention, norms), the predictor, the per-layer neuron caches and the
scratch rows that carry overflow and prefill streaming. The KV cache at `max_context`
is planned beside it. Weights are held as float32, the compute precision of both CPU
backends, so sizes here are float32 sizes; a percentage budget is of the whole model
at that precision (for a float32 layout, its size on disk).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .layout import Layout
from .safetensors_stream import read_header

HELD_BYTES = 4  # float32 in DRAM
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
    """(resident, FFN) bytes of the model held in DRAM at float32."""
    header, _ = read_header(layout.resident_path)
    resident = sum(int(np.prod(info["shape"])) for info in header.values())
    ffn = sum(e.neurons for e in layout.layers) * len(layout.bundle_parts)
    return resident * HELD_BYTES, ffn * layout.args.hidden_size * HELD_BYTES


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
    row_bytes: int  # one cached neuron (its whole bundle) at float32
    capacity: list[int]  # cache rows per layer
    scratch_rows: int  # overflow / prefill-streaming rows, shared by all layers
    kv_cache: int  # at max_context
    max_context: int

    @property
    def cache_bytes(self) -> int:
        return sum(self.capacity) * self.row_bytes

    @property
    def scratch_bytes(self) -> int:
        return self.scratch_rows * self.row_bytes

    @property
    def weights(self) -> int:
        """Everything the budget bounds (never more than the budget)."""
        return self.resident + self.predictor + self.cache_bytes + self.scratch_bytes

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def rows(self, neurons: int) -> list[tuple[str, str]]:
        """Table rows (name, value) for display; `neurons` = FFN neurons per layer."""
        share = 100 * sum(self.capacity) / (neurons * len(self.capacity))
        caps = sorted(set(self.capacity))
        return [
            ("budget", format_bytes(self.budget)),
            ("resident", format_bytes(self.resident)),
            ("predictor", format_bytes(self.predictor)),
            (
                "neuron cache",
                f"{format_bytes(self.cache_bytes)} ({'/'.join(map(str, caps))} of "
                f"{neurons} neurons per layer, {share:.1f}% of the FFN)",
            ),
            (
                "scratch",
                f"{format_bytes(self.scratch_bytes)} ({self.scratch_rows} rows)",
            ),
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


def plan_memory(
    layout: Layout,
    budget: str | int,
    predictor_bytes: int,
    kv_cache: int,
    max_context: int,
) -> MemoryPlan:
    """Split a budget into resident weights, predictor, neuron caches and scratch rows.

    Every layer gets the same cache capacity (capped at its neuron count), and the
    shared scratch as much as one layer, so prefill can stream a layer in chunks of
    that size.

    Raises:
        ValueError: the budget cannot hold the resident weights, the predictor and at
        least
            one neuron row; the message gives the exact shortfall.
    """
    resident, ffn = model_bytes(layout)
    amount = parse_budget(budget, resident + ffn)
    args = layout.args
    row = len(layout.bundle_parts) * args.hidden_size * HELD_BYTES
    needed = resident + predictor_bytes + row
    if amount < needed:
        raise ValueError(
            f"memory budget {format_bytes(amount)} is too small: resident weights "
            f"{format_bytes(resident)} + predictor {format_bytes(predictor_bytes)} + "
            f"one neuron row need {format_bytes(needed)}, "
            f"{needed - amount} bytes more"
            + (
                "; a smaller predictor (flashinfer train-predictor) also helps"
                if predictor_bytes
                else ""
            )
        )
    rows = (amount - resident - predictor_bytes) // row
    layers, neurons = args.num_hidden_layers, args.intermediate_size
    scratch = min(neurons, max(1, rows // (layers + 1)))
    capacity = min(neurons, (rows - scratch) // layers)
    return MemoryPlan(
        budget=amount,
        resident=resident,
        predictor=predictor_bytes,
        row_bytes=row,
        capacity=[capacity] * layers,
        scratch_rows=scratch,
        kv_cache=kv_cache,
        max_context=max_context,
    )
