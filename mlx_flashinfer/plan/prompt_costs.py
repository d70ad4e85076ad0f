"""What a prompt of T tokens costs under a plan: the wait for its first token.

- compute: every weight multiplied once over the T tokens (the head over the last
  alone: `Model.prefill` keeps no other logits), at the probe's rate for products
  of about that length (`machine.gemm`, measured at 8, 64 and 256 tokens and on
  both sides of NumPy's step from loops to BLAS, one token the decode rate;
  interpolated in log length, linear past the longest),
  plus each layer's small operations on the prompt (`machine.layer_prompt_s`,
  measured on a small model: its attention's T x T scores are in them, for 4
  heads of 16; a model of more heads pays more past a few hundred tokens).
- the FFN's reads: none dense; the streamed placement's spans behind compute, as a
  token's; the sparse placement (flash/ffn.py `_prefill`) reads each layer whole in
  scratch-fulls, each read then computed (or half-fulls, each read while the last
  computes, where a half holds PREFILL_AHEAD_BYTES), or, for a ReLU-family model,
  only the union of its tokens' predicted neurons where that is under 40% of the
  layer (the reader's own prior: a scattered neuron costs 2.5 streamed ones); OS
  paging reads the FFN, then computes.
"""

from __future__ import annotations

import math

import numpy as np

from ..flash.landing import lands_direct
from ..flash.memory import MemoryPlan
from ..flash.prompt_reads import ReadCosts, prompt_chunks
from ..flash.reader import DEFAULT_CHUNK, DEFAULT_THREADS
from ..flash.window import WINDOW_GRID
from ..formats.layout import Layout
from ..model.transformer import PREFILL_CHUNK
from ..predictors.kinds import predictor_nbytes
from .costs import (
    TokenCost,
    _add,
    disk_seconds,
    ffn_kinds,
    head_products,
    paging_cost,
    read_align,
    read_call,
    read_cpu_seconds,
    resident_products,
    streamed_cost,
)
from .expert_costs import routing_rates
from .machine import Machine
from .statistics import window_stats


def prompt_product_seconds(
    machine: Machine, kind: str, nbytes: float, tokens: int, threads: str = "all"
) -> float:
    """Seconds of one product of `tokens` tokens over `nbytes` of `kind` weights on
    every core (`threads` "1": one, slower by what one thread costs a 64-token
    product, where the probe measured it, else a decode step's)."""
    rates = machine.gemm.get(kind) or machine.gemm.get(kind.split()[0])
    rates = rates or machine.gemm.get("float16") or {}
    if not isinstance(rates, dict):  # an older probe: one rate, at 64 tokens
        rates = {"64": rates}
    decode = machine.gemv.get(kind) or machine.gemv.get(kind.split()[0]) or {}
    points = {1: decode.get("all")} | {
        int(t): r for t, r in rates.items() if t.isdigit()
    }
    points = {t: r for t, r in points.items() if r}
    # (MLX schedules its own threads: a limit does not reach it)
    if threads == "1" and machine.backend != "mlx" and decode.get("all"):
        step = decode.get("1", decode["all"]) / decode["all"]
        many = rates["64 on 1"] / rates["64"] if "64 on 1" in rates else step
        points = {t: r * (step if t == 1 else many) for t, r in points.items()}
    lengths = sorted(points)
    longest = lengths[-1]
    if tokens >= longest:  # past the longest product measured: linear in length
        return tokens / longest * nbytes / points[longest]
    logs = [math.log(t) for t in lengths]
    rate = np.exp(
        np.interp(math.log(tokens), logs, [math.log(points[t]) for t in lengths])
    )
    return nbytes / float(rate)


def prompt_compute_seconds(
    machine: Machine, layout: Layout, kinds: dict, tokens: int, threads: str = "all"
) -> float:
    """A prompt's products over `kinds` (bytes by stored kind, the head's among
    them, which runs on the last token alone) and its tokens' small operations."""
    head = head_products(layout)
    products = sum(
        prompt_product_seconds(
            machine, kind, nbytes - head.get(kind, 0), tokens, threads
        )
        + prompt_product_seconds(machine, kind, head.get(kind, 0), 1, threads)
        for kind, nbytes in kinds.items()
    )
    return products + layout.args.num_hidden_layers * prompt_layer_seconds(
        machine, tokens
    )


def prompt_layer_seconds(machine: Machine, tokens: int) -> float:
    """A layer's small operations on a prompt of `tokens` run at once: the probe's
    at one token (a decode step's) and its prompt lengths, linear between them
    and past the longest; `tokens` decode steps' where the probe has none."""
    points = {1: machine.layer_s} | {
        int(t): s for t, s in (machine.layer_prompt_s or {}).items()
    }
    if len(points) == 1:
        return tokens * machine.layer_s
    lengths = sorted(points)
    seconds = [points[t] for t in lengths]
    if tokens <= lengths[-1]:
        return float(np.interp(tokens, lengths, seconds))
    slope = (seconds[-1] - seconds[-2]) / (lengths[-1] - lengths[-2])
    return seconds[-1] + slope * (tokens - lengths[-1])


def union_share(layout: Layout, predictor: str, tokens: int) -> list[float]:
    """Per layer, the share of its neurons some token of a `tokens`-token prompt
    predicts: the union of a window of tokens - 1 past tokens and this one, from
    the predictor's report (its longest window reaches max(WINDOW_GRID) + 1
    tokens; longer prompts, as blocks of that many predicting apart)."""
    grid = max(WINDOW_GRID)
    k = min(tokens - 1, grid)
    stats, _ = window_stats(layout, predictor, k)
    shares = []
    for p, _, held in stats:
        union = held if k else p
        if tokens - 1 > grid:
            union = 1.0 - (1.0 - union) ** (tokens / (grid + 1))
        shares.append(min(1.0, union))
    return shares


def prompt_cost(
    layout: Layout,
    placement: str,
    machine: Machine,
    tokens: int,
    *,
    plan: MemoryPlan | None = None,
    predictor: str | None = None,
    budget: int | None = None,
    stats_layout: Layout | None = None,
    threads: str = "all",
    rows_in_dram: bool = False,
    window: int = 1,
) -> TokenCost | None:
    """A `tokens`-token prompt's predicted seconds under `placement` ("dense",
    "streamed", "sparse", "paging"; `plan` for the flash ones, `predictor` for
    sparse, `budget` for paging; `stats_layout`: where the predictor's report is;
    `threads` "1": dense and paging computing on one core, as `flashinfer bench`
    runs them; `rows_in_dram`: the sparse reads are copies from memory, the
    compute-only row; `window`: the sparse plan's k), as a TokenCost whose terms
    are the whole prompt's; None for a placement not modelled here (a mixture of
    experts' OS paging)."""
    if layout.args.is_moe:  # dense or experts: the union of the routed experts
        if placement not in ("dense", "experts"):
            return None
        return experts_prompt_cost(layout, machine, tokens, plan, threads)
    args = layout.args
    ffn = args.num_hidden_layers * args.intermediate_size
    kinds = _add(resident_products(layout), ffn_kinds(layout), ffn)
    compute = prompt_compute_seconds(machine, layout, kinds, tokens, threads)
    if placement == "dense":
        return TokenCost("dense", 0.0, 0.0, compute)
    if placement == "paging":  # a token's reads and faults: the FFN paged in once
        token = paging_cost(layout, budget or 0, machine)
        return TokenCost(
            "OS paging", token.io_s, token.memory_s, compute, token.bytes_read
        )
    if placement == "streamed" and plan is not None:  # a token's spans read once
        token = streamed_cost(layout, plan, machine)
        reads = token.io_s + token.hidden_io_s
        if token.bytes_read:  # its reads beside take a core: the SiLU Llama-2-7B's
            # streamed 8-token prompts ran at dense's one-thread speed (3.98-4.10 s
            # against 3.84)
            compute = prompt_compute_seconds(machine, layout, kinds, tokens, "1")
        hidden = min(reads, compute)  # the ring reads ahead of compute
        return TokenCost(
            "streamed",
            reads - hidden,
            token.memory_s,
            compute,
            token.bytes_read,
            hidden_io_s=hidden,
        )
    if placement != "sparse" or plan is None:
        return None
    # each layer: the union of the prompt's neurons, or the whole layer streamed
    n = args.intermediate_size
    union = args.is_relu_family and predictor not in (None, "all")
    if union:
        shares = union_share(stats_layout or layout, predictor, tokens)
    else:
        shares = [1.0] * args.num_hidden_layers
    io = cpu = nbytes = rows = behind = 0.0
    for share in shares:
        scattered = share * ReadCosts.PRIOR < 1.0  # the union's reads, else streamed
        wanted = share * n if scattered else n
        # a read call a scratch-full, each read then computed; or, where half the
        # scratch holds PREFILL_AHEAD_BYTES, a half at a time, each read while the
        # last computes: all but the first behind compute
        step, ahead = prompt_chunks(
            math.ceil(wanted), plan.scratch_rows, layout.bundle_bytes
        )
        calls = max(1, math.ceil(wanted / max(step, 1)))
        reads, call_bytes, call_cpu, call_disk = read_call(
            machine,
            layout,
            wanted / calls,
            share if scattered else 1.0,
            from_disk=not rows_in_dram,
        )
        io += calls * (call_cpu + call_disk)
        cpu += calls * call_cpu
        nbytes += calls * call_bytes
        rows += wanted
        behind += (calls - 1) * (call_cpu + call_disk) if ahead else 0.0
    # the products over the rows read (a union's only: its other neurons add zero)
    ffn = _add({}, ffn_kinds(layout), rows)
    kinds = _add(resident_products(layout), ffn)
    compute = prompt_compute_seconds(machine, layout, kinds, tokens, threads)
    # reads hide behind the FFN's products only
    hidden = min(behind, compute * sum(ffn.values()) / sum(kinds.values()))
    # the predictor over every token where their union may be read, else over the
    # last k, which seed the window (flash/ffn.py `_prefill`)
    held = predictor_nbytes(predictor or "all", stats_layout or layout)
    if held:
        kind = "q4" if predictor == "lowbit" else layout.dtype
        predicted = tokens if union or not window else min(window, tokens)
        compute += prompt_product_seconds(machine, kind, held, predicted, threads)
    read = 0.0 if rows_in_dram else nbytes
    return TokenCost(
        "sparse", io - hidden, 0.0, compute, read, hidden_io_s=hidden, io_fixed_s=cpu
    )


def experts_prompt_cost(
    layout: Layout,
    machine: Machine,
    tokens: int,
    plan: MemoryPlan | None = None,
    threads: str = "all",
) -> TokenCost:
    """A `tokens`-token prompt under the experts placement (`plan`; None: every
    expert in DRAM): per layer the union of the experts its tokens route to, read
    once into an empty cache in rounds of its capacity, each round read then
    computed; each expert multiplied over the tokens routed to it (expected from
    the routing rates, given it is routed at all); the resident weights over every
    token (the head over the last alone). A prompt longer than PREFILL_CHUNK runs
    in chunks of that many tokens, each reading its own union."""
    if tokens > PREFILL_CHUNK:
        whole, rest = divmod(tokens, PREFILL_CHUNK)
        chunk = experts_prompt_cost(layout, machine, PREFILL_CHUNK, plan, threads)
        parts = [chunk] * whole
        if rest:
            parts.append(experts_prompt_cost(layout, machine, rest, plan, threads))
        return TokenCost(
            chunk.placement,
            sum(c.io_s for c in parts),
            sum(c.memory_s for c in parts),
            sum(c.compute_s for c in parts),
            bytes_read=sum(c.bytes_read for c in parts),
            read_size=chunk.read_size,
            note=chunk.note,
            io_fixed_s=sum(c.io_fixed_s for c in parts),
        )
    row = layout.bundle_bytes
    rates, source = routing_rates(layout)
    parts = ffn_kinds(layout)  # an expert's bytes by kind
    compute = prompt_compute_seconds(
        machine, layout, resident_products(layout), tokens, threads
    )
    # an expert's product over n tokens, n = 1..tokens (rates change with n: NumPy's
    # kernels at 9 tokens), weighed by how likely the expert gets n of the prompt's
    # tokens (binomial; the mean alone foresaw 2.6 s of a 64-token OLMoE prompt's
    # 4.6 s of compute: half its experts get more than 8 tokens)
    counts = np.arange(1, tokens + 1)
    product = np.array(
        [
            sum(
                prompt_product_seconds(machine, kind, nbytes, int(n), threads)
                for kind, nbytes in parts.items()
            )
            for n in counts
        ]
    )
    union = []
    for layer_rates in rates:
        p = np.clip(layer_rates, 1e-12, 1 - 1e-12)[:, None]
        odds = binomial_log_choose(tokens)[1:] + counts * np.log(p)
        odds = odds + (tokens - counts) * np.log1p(-p)
        chances = np.exp(odds)  # (experts, n): P(n of the tokens route to it)
        union.append(float(chances.sum()))
        compute += float((chances @ product).sum())
        compute += union[-1] * machine.ffn_call_s
    if plan is None:
        return TokenCost("dense", 0.0, 0.0, compute, note=f"routing: {source}")
    align = read_align(machine)
    direct = lands_direct(layout, align)
    extra, landed = (0, 0.0) if direct else (align, 1.0)
    chunks = math.ceil((row + extra) / DEFAULT_CHUNK)
    cpu = disk = nbytes = 0.0
    for experts, cap in zip(union, plan.capacity, strict=True):
        rounds = max(1, math.ceil(experts / max(cap, 1)))
        per = experts / rounds  # a round's reads, each then computed
        call_bytes = per * (row + extra)
        cpu += rounds * read_cpu_seconds(
            machine, DEFAULT_THREADS, per * chunks, landed * call_bytes
        )
        disk += rounds * disk_seconds(machine, per * chunks, call_bytes)
        nbytes += rounds * call_bytes
    return TokenCost(
        "experts",
        cpu + disk,
        0.0,
        compute,
        bytes_read=nbytes,
        read_size=row,
        note=f"routing: {source}",
        io_fixed_s=cpu,
    )


def binomial_log_choose(n: int) -> np.ndarray:
    """log C(n, j) for j = 0..n."""
    steps = np.log(np.arange(n, 0, -1)) - np.log(np.arange(1, n + 1))
    return np.concatenate([[0.0], np.cumsum(steps)])
