"""The configurations of the ablation and the baselines, and the memory limit of each.

Rows (the paper's Tables 2 and 3), every one decoding the same teacher-forced tokens:

- naive: predictor "all", window 0, at the budget. Nothing survives a token, so every
  FFN weight is read each token; the neuron cache is only a read buffer.
- hybrid: predictor "all", window k, at a budget whose cache holds exactly half of
  each layer's neurons (and whose scratch the other half): the cached half stays,
  the other half is read each token.
- +predictor: the predictor (the trained one when there is one, else gate when the
  budget holds it, else oracle), window 0, on the unbundled layout, at the budget.
- +windowing: the same with window k.
- all: the same on the bundled layout, i.e. "+bundling". The paper lists
  "+bundling" (Table 2) and "all" (Table 3) apart; here both are this one
  configuration, the full method at the budget, measured once.
- +lookahead: "all" with reads ahead (flash/ffn.py): the next layer's guessed neurons
  read while this layer computes, a second read buffer in the same budget.
- compute-only: "all" with the FFN file copied into DRAM first, read by memcpy
  (bench/in_memory.py): the method's compute and memory management without I/O,
  the yardstick of latency hiding. Its limit adds the file's size.
- dense: every weight in DRAM (the ceiling), under its own, larger limit.
- mmap, stream: OS paging and layer streaming (`baselines.py`) under the limit of
  the "all" row.
- streamed: the streamed placement (flash/streamed.py) at the budget: an equal share
  of every layer held, the rest read every token ahead of compute; exact for any
  activation, no predictor.
- plan: what the planner (plan/planner.py) chooses at the budget on this machine's
  curves, run as that placement.

Memory limit of a row: its budget (everything the memory plan bounds, the flash
reader's buffer included) + the KV cache at the context the run needs + the process
overhead (`process_overhead`: the interpreter and libraries, and the transient copies
while weights are loaded) + for the baselines the buffers of a chunk
(`chunk_buffers`). The dense row's budget is the whole model as stored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..flash.memory import (
    SLOT_BYTES,
    MemoryPlan,
    layer_demand,
    model_bytes,
    parse_budget,
    plan_floor,
    plan_memory,
    plan_streamed,
)
from ..formats.layout import Layout
from ..formats.safetensors_stream import read_header
from ..model.transformer import kv_cache_bytes
from ..predictors.kinds import predictor_nbytes, trained_kind
from .baselines import DEFAULT_CHUNK_BYTES

ABLATION_ROWS = (
    "naive",
    "hybrid",
    "+predictor",
    "+windowing",
    "all",
    "+lookahead",
    "compute-only",
)
BASELINE_ROWS = ("dense", "mmap", "stream")
PLANNED_ROWS = ("streamed", "plan")
ROWS = ABLATION_ROWS + BASELINE_ROWS + PLANNED_ROWS
# rows that read (about) half the FFN or more every token: --slow-tokens shortens them
SLOW_ROWS = ("naive", "hybrid", "mmap", "stream", "streamed")
TITLES = {
    "naive": "naive (every FFN weight read)",
    "hybrid": "hybrid (half the FFN cached)",
    "+predictor": "+ predictor (unbundled, k=0)",
    "+windowing": "+ windowing (unbundled)",
    "all": "+ bundling = all",
    "+lookahead": "+ reads ahead",
    "compute-only": "compute only (rows in DRAM, no I/O)",
    "dense": "dense, all in DRAM",
    "mmap": "OS paging (mmap, llama.cpp)",
    "stream": "layer streaming (AirLLM)",
    "streamed": "streamed placement (exact, ahead of compute)",
    "plan": "the planner's choice",
}
# Memory of a worker beyond its plan: the interpreter, NumPy, numba, the tokenizers
# library (and the MLX runtime), plus `process_overhead`'s transient copies. The
# worker measures its own base (RSS after the imports) and reports it.
BASE_OVERHEAD = {"numpy": 96 << 20, "mlx": 112 << 20}


@dataclass
class RunSpec:
    """What one worker process runs (JSON-able)."""

    row: str
    kind: str  # "flash", "streamed", "dense", "mmap" or "stream"
    backend: str
    layout: str  # the layout the FFN is read from
    prompt: list[int]
    targets: list[int]  # fed one per decode step
    predictor_layout: str | None = None  # the predictor's layout (the bundled one)
    budget: int | None = None
    predictor: str | None = None
    window: int = 0
    lookahead: bool = False  # reads ahead (flash rows)
    read_gap: int | None = None  # bytes read through between wanted bundles
    rows_in_dram: bool = False  # the compute-only row: no I/O
    threads: int | None = None
    max_context: int = 0
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    limit: int | None = None  # bytes, None: unlimited
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunSpec:
        return cls(**data)


def hybrid_budget(layout: Layout) -> int:
    """The budget whose plan (predictor "all") caches ceil(n/2) neurons per layer and
    has as many scratch rows: plan_memory gives rows // (layers + 1) to scratch and
    the rest evenly to the layers."""
    args = layout.args
    half = -(-args.intermediate_size // 2)
    rows = (args.num_hidden_layers + 1) * half
    return plan_floor(layout, 0) + rows * (layout.bundle_bytes + SLOT_BYTES)


def check_hybrid(plan: MemoryPlan, neurons: int) -> None:
    """The hybrid plan must cache half of every layer and stream the rest through
    scratch in one piece (raises RuntimeError otherwise: a planner change)."""
    half = -(-neurons // 2)
    if set(plan.capacity) != {half} or plan.scratch_rows < neurons - half:
        raise RuntimeError(
            f"hybrid plan caches {sorted(set(plan.capacity))} of {neurons} neurons "
            f"with {plan.scratch_rows} scratch rows, not half and half"
        )


def pick_predictor(layout: Layout, budget: int, max_context: int) -> str:
    """The trained one (lowrank, lowbit) when there is one; else gate when the budget
    holds it; else oracle."""
    if layout.has_predictor:
        return trained_kind(layout)
    try:
        plan_memory(
            layout,
            budget,
            predictor_nbytes("gate", layout),
            kv_cache_bytes(layout.args, max_context),
            max_context,
        )
    except ValueError:
        return "oracle"
    return "gate"


def sequence_tokens(
    layout: Layout, text: str | None, count: int, seed: int = 0
) -> list[int]:
    """`count` token ids: the start of `text`, or (no text) ids drawn uniformly from
    the vocabulary with a fixed seed (the built-in generic sequence).

    Raises:
        ValueError: the text is shorter than `count` tokens.
    """
    if text is None:
        rng = np.random.default_rng(seed)
        return rng.integers(0, layout.args.vocab_size, count).tolist()
    from ..formats.tokenizer import Tokenizer

    ids = Tokenizer(layout.path, layout.manifest["tokenizer"]).encode(text)
    if len(ids) < count:
        raise ValueError(
            f"the text has {len(ids)} tokens; {count} are needed (prompt + decoded)"
        )
    return ids[:count]


def flash_plan(spec: RunSpec, layout: Layout, source: Layout) -> MemoryPlan:
    """The plan the worker will use for a flash row (raises ValueError if the budget
    cannot hold it)."""
    return plan_memory(
        layout,
        spec.budget,
        predictor_nbytes(spec.predictor, source),
        kv_cache_bytes(layout.args, spec.max_context),
        spec.max_context,
        spec.lookahead,
        layer_demand(source, spec.predictor),
    )


def streamed_plan(spec: RunSpec, layout: Layout) -> MemoryPlan:
    """The plan of a streamed row (raises ValueError if the budget cannot hold it)."""
    kv = kv_cache_bytes(layout.args, spec.max_context)
    return plan_streamed(layout, spec.budget, kv, spec.max_context)


def chunk_buffers(layout: Layout, rows: int, backend: str) -> int:
    """Memory beyond the budget while a baseline computes `rows` bundles at once:
    the stored bytes in its buffer (or mapping), and MLX's copy of them."""
    return rows * layout.bundle_bytes * (2 if backend == "mlx" else 1)


def process_overhead(layout: Layout, backend: str) -> int:
    """BASE_OVERHEAD of the backend + the transient copies while weights load: the
    largest resident tensor as read (and MLX's copy of it), and one layer's FFN as
    read (the gate predictor and the dense FFN keep parts of it)."""
    header, _ = read_header(layout.resident_path)
    largest = max(
        (e - b for b, e in (t["data_offsets"] for t in header.values())), default=0
    )
    copies = 1 if backend == "numpy" else 2
    layer = layout.args.intermediate_size * layout.bundle_bytes
    return BASE_OVERHEAD.get(backend, BASE_OVERHEAD["mlx"]) + copies * largest + layer


def memory_limit(spec: RunSpec, layout: Layout, source: Layout) -> int:
    """The memory limit of a row: budget + KV cache + process overhead (+ chunk
    buffers for the baselines; see the module docstring)."""
    kv = kv_cache_bytes(layout.args, spec.max_context)
    overhead = process_overhead(layout, spec.backend)
    if spec.kind == "flash":
        image = layout.ffn_path.stat().st_size if spec.rows_in_dram else 0
        return flash_plan(spec, layout, source).budget + kv + overhead + image
    if spec.kind == "streamed":
        return streamed_plan(spec, layout).budget + kv + overhead
    if spec.kind == "dense":
        resident, ffn = model_bytes(layout)
        return resident + ffn + kv + overhead
    layer = layout.args.intermediate_size
    chunk = min(spec.chunk_bytes // layout.bundle_bytes, layer)
    return spec.budget + kv + overhead + chunk_buffers(layout, chunk, spec.backend)


def build_specs(
    bundled: Layout,
    unbundled: Layout | None,
    budget: str | int,
    backends: list[str],
    rows: list[str],
    tokens: list[int],
    prompt_tokens: int,
    decode_tokens: int,
    slow_tokens: int,
    window: int,
    predictor: str | None,
    threads: int | None,
    planned: dict | None = None,
) -> list[RunSpec]:
    """One RunSpec per (backend, row), in table order, every plan checked.

    Args:
        tokens: the sequence; the first `prompt_tokens` are the prompt, the next
            `decode_tokens` (`slow_tokens` for SLOW_ROWS) are decoded.
        planned: the "plan" row's choice per backend (`plan.planner.Candidate`).

    Raises:
        ValueError: a bad budget, window or row, or a budget a row cannot use.
    """
    bad = [r for r in rows if r not in ROWS]
    if bad:
        raise ValueError(f"unknown row {bad[0]!r}: expected some of {', '.join(ROWS)}")
    if window < 1:
        raise ValueError(f"--window must be >= 1 (the windowed rows), got {window}")
    if min(prompt_tokens, decode_tokens, slow_tokens) < 1:
        raise ValueError("--prompt-tokens, --tokens and --slow-tokens must be >= 1")
    resident, ffn = model_bytes(bundled)
    amount = parse_budget(budget, resident + ffn)
    context = prompt_tokens + max(decode_tokens, slow_tokens)
    chosen = predictor or pick_predictor(bundled, amount, context)
    half = hybrid_budget(bundled)
    separate = unbundled or bundled
    if unbundled is None and {"+predictor", "+windowing"} & set(rows):
        raise ValueError("the +predictor and +windowing rows need an unbundled layout")
    flash = {
        "naive": (bundled, "all", 0, amount),
        "hybrid": (bundled, "all", window, half),
        "+predictor": (separate, chosen, 0, amount),
        "+windowing": (separate, chosen, window, amount),
        "all": (bundled, chosen, window, amount),
        "+lookahead": (bundled, chosen, window, amount),
        "compute-only": (bundled, chosen, window, amount),
    }
    specs = []
    for backend in backends:
        for row in rows:
            count = slow_tokens if row in SLOW_ROWS else decode_tokens
            spec = RunSpec(
                row=row,
                kind="flash" if row in flash else row,
                backend=backend,
                layout=str(bundled.path),
                prompt=tokens[:prompt_tokens],
                targets=tokens[prompt_tokens : prompt_tokens + count],
                predictor_layout=str(bundled.path),
                budget=amount,
                threads=threads,
                max_context=context,
            )
            if row == "plan":
                if not planned or backend not in planned:
                    raise ValueError("the plan row needs this machine's probe")
                apply_choice(spec, planned[backend], bundled)
            if row == "streamed":
                spec.kind = "streamed"
                streamed_plan(spec, bundled)  # refuses a budget too small
            if row in flash:
                layout, spec.predictor, spec.window, spec.budget = flash[row]
                spec.layout = str(layout.path)
                spec.lookahead = row == "+lookahead"
                spec.rows_in_dram = row == "compute-only"
                plan = flash_plan(spec, layout, bundled)  # refuses a budget too small
                if row == "hybrid":
                    check_hybrid(plan, bundled.args.intermediate_size)
            specs.append(spec)
    return specs


def apply_choice(spec: RunSpec, choice, layout: Layout) -> None:
    """Make the "plan" row run the planner's choice (a `Candidate`)."""
    spec.notes.append(f"the planner chose {choice.name}")
    if choice.placement == "dense":
        spec.kind = "dense"
    elif choice.placement == "streamed":
        spec.kind = "streamed"
    else:
        spec.kind, spec.predictor = "flash", choice.predictor
        spec.window, spec.lookahead = choice.window, choice.lookahead
        spec.read_gap = choice.read_gap
        flash_plan(spec, layout, layout)
