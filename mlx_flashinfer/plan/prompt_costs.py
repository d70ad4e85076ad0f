"""What a prompt of T tokens costs under a plan: the wait for its first token.

- compute: every weight multiplied once over the T tokens, at the probe's rate for
  products of about that length (`machine.gemm`, measured at 8, 16 and 64 tokens,
  one token the decode rate; interpolated in log length, linear past 64), plus
  each token's small operations per layer. Attention's T x T scores are left out:
  small beside the weights for prompts of a few hundred tokens.
- the FFN's reads: none dense; the streamed placement's spans behind compute, as a
  token's; the sparse placement (flash/ffn.py `_prefill`) reads each layer whole in
  scratch-fulls, each read then computed, or, for a ReLU-family model, only the
  union of its tokens' predicted neurons where that reads less than a third of the
  layer (the reader's own prior: a scattered neuron costs 2.5 streamed ones); OS
  paging reads the FFN, then computes.
"""

from __future__ import annotations

import math

import numpy as np

from ..flash.landing import lands_direct
from ..flash.memory import MemoryPlan, model_bytes
from ..flash.reader import DEFAULT_CHUNK, DEFAULT_THREADS
from ..formats.layout import Layout
from .costs import (
    PAGING_S_PER_GB,
    TokenCost,
    _add,
    _call_reads,
    disk_seconds,
    ffn_kinds,
    read_cpu_seconds,
    resident_products,
)
from .disk import throughput_at
from .machine import Machine
from .statistics import window_stats

SPARSE_PRIOR = 2.5  # flash/ffn.py ReadCosts.PRIOR: a scattered neuron's cost


def prompt_product_seconds(
    machine: Machine, kind: str, nbytes: float, tokens: int, threads: str = "all"
) -> float:
    """Seconds of one product of `tokens` tokens over `nbytes` of `kind` weights on
    every core (`threads` "1": one, slower by what one thread costs a decode
    step's product)."""
    rates = machine.gemm.get(kind) or machine.gemm.get(kind.split()[0])
    rates = rates or machine.gemm.get("float16") or {}
    if not isinstance(rates, dict):  # an older probe: one rate, at 64 tokens
        rates = {"64": rates}
    decode = machine.gemv.get(kind) or machine.gemv.get(kind.split()[0]) or {}
    points = {1: decode.get("all")} | {int(t): r for t, r in rates.items()}
    points = {t: r for t, r in points.items() if r}
    # (MLX schedules its own threads: a limit does not reach it)
    one = threads == "1" and machine.backend != "mlx"
    if one and decode.get("1") and decode.get("all"):
        points = {t: r * decode["1"] / decode["all"] for t, r in points.items()}
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
    """A prompt's products over `kinds` (bytes by stored kind) and its tokens'
    small operations."""
    products = sum(
        prompt_product_seconds(machine, kind, nbytes, tokens, threads)
        for kind, nbytes in kinds.items()
    )
    return products + tokens * layout.args.num_hidden_layers * machine.layer_s


def union_share(layout: Layout, predictor: str, tokens: int) -> list[float]:
    """Per layer, the share of its neurons some token of a `tokens`-token prompt
    predicts: the union of a window of tokens - 1 past tokens and this one, from
    the predictor's report (its windows reach 9 tokens; longer prompts, as blocks
    of 9 predicting apart)."""
    grid = 8  # the report's longest window
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
) -> TokenCost | None:
    """A `tokens`-token prompt's predicted seconds under `placement` ("dense",
    "streamed", "sparse", "paging"; `plan` for the flash ones, `predictor` for
    sparse, `budget` for paging; `stats_layout`: where the predictor's report is;
    `threads` "1": dense and paging computing on one core, as `flashinfer bench`
    runs them), as a TokenCost whose terms are the whole prompt's; None for a
    placement not modelled here (experts)."""
    args = layout.args
    ffn = args.num_hidden_layers * args.intermediate_size
    kinds = _add(resident_products(layout), ffn_kinds(layout), ffn)
    compute = prompt_compute_seconds(machine, layout, kinds, tokens, threads)
    row = layout.bundle_bytes
    if placement == "dense":
        return TokenCost("dense", 0.0, 0.0, compute)
    if placement == "paging":
        resident, ffn_bytes = model_bytes(layout)
        missed = ffn_bytes if ffn_bytes > max((budget or 0) - resident, 0) else 0
        rate = throughput_at(machine.disk, DEFAULT_CHUNK, 1, sequential=True)
        faults = missed / 1e9 * PAGING_S_PER_GB
        return TokenCost("OS paging", missed / rate, faults, compute, missed)
    if placement == "streamed" and plan is not None:
        streamed = sum(args.intermediate_size - held for held in plan.capacity) * row
        busy = machine.disk.get("beside_compute")
        span = max(plan.chunk_rows, 1) * row
        rate = (
            busy["bytes_per_s"] if busy else throughput_at(machine.disk, span, 1, True)
        )
        io = streamed / rate
        if streamed:  # its reads beside take a core: the SiLU Llama-2-7B's streamed
            # 8-token prompts ran at dense's one-thread speed (3.98-4.10 s, 3.84)
            compute = prompt_compute_seconds(machine, layout, kinds, tokens, "1")
        hidden = min(io, compute)  # the ring reads ahead of compute, as a token's
        return TokenCost(
            "streamed", io - hidden, 0.0, compute, streamed, hidden_io_s=hidden
        )
    if placement != "sparse" or plan is None:
        return None
    # each layer: the union of the prompt's neurons, or the whole layer streamed
    n = args.intermediate_size
    if args.is_relu_family and predictor not in (None, "all"):
        shares = union_share(stats_layout or layout, predictor, tokens)
    else:
        shares = [1.0] * args.num_hidden_layers
    align = 4096 if machine.disk.get("mode") == "nocache" else 512
    copied = 0.0 if lands_direct(layout, align) else 1.0
    io = cpu = nbytes = rows = 0.0
    for share in shares:
        wanted = share * n
        if share * SPARSE_PRIOR < 1.0:  # the union: scattered reads
            reads, layer_bytes = _call_reads(wanted, share, row, 0, align)
        else:  # streamed whole, in the reader's large reads
            wanted, layer_bytes = n, n * row
            reads = math.ceil(layer_bytes / DEFAULT_CHUNK)
        # a read call a scratch-full, each read then computed
        calls = max(1, math.ceil(wanted / max(plan.scratch_rows, 1)))
        call_reads, call_bytes = reads / calls, layer_bytes / calls
        cpu += calls * read_cpu_seconds(
            machine, DEFAULT_THREADS, call_reads, copied * call_bytes
        )
        io += calls * disk_seconds(machine, call_reads, call_bytes)
        nbytes += layer_bytes
        rows += wanted
    # the products over the rows read (a union's only: its other neurons add zero)
    kinds = _add(resident_products(layout), ffn_kinds(layout), rows)
    compute = prompt_compute_seconds(machine, layout, kinds, tokens, threads)
    return TokenCost("sparse", io + cpu, 0.0, compute, nbytes, io_fixed_s=cpu)
