"""What the cost model (plan/costs.py) predicts for each bench row, set beside what
the row measured: the validation of the model, row by row (`predicted_ms`,
`measured_ms` in the result).

Every row computes on one BLAS thread (worker.py), so every prediction uses the
one-thread rates.
"""

from __future__ import annotations

from dataclasses import replace

from ..flash.reader import DEFAULT_THREADS
from ..formats.layout import Layout
from ..plan.costs import (
    TokenCost,
    dense_cost,
    layer_streaming_cost,
    paging_cost,
    sparse_cost,
    streamed_cost,
)
from ..plan.machine import Machine
from ..plan.prompt_costs import prompt_cost
from ..predictors.kinds import predictor_nbytes
from .configs import RunSpec, flash_plan, streamed_plan

THREADS = "1"


def predict(spec: RunSpec, layout: Layout, source: Layout, machine: Machine):
    """The predicted cost of one decoded token of `spec` (None for a row the model
    does not cover)."""
    if spec.kind == "dense":
        return dense_cost(layout, machine, THREADS)
    if spec.kind == "mmap":
        return paging_cost(layout, spec.budget, machine, THREADS)
    if spec.kind == "stream":
        return layer_streaming_cost(layout, machine, spec.chunk_bytes, THREADS)
    if spec.kind == "streamed":
        return streamed_cost(layout, streamed_plan(spec, layout), machine, THREADS)
    plan = flash_plan(spec, layout, source)
    nbytes = predictor_nbytes(spec.predictor, source)
    # the compute-only row: its reads are copies in memory, through the same reader
    return sparse_cost(
        layout,
        plan,
        machine,
        spec.predictor,
        spec.window,
        nbytes,
        source,
        rows_in_dram=spec.rows_in_dram,
        read_gap=spec.read_gap,
        reader_threads=spec.threads or DEFAULT_THREADS,
    )


def predict_prompt(
    spec: RunSpec, layout: Layout, source: Layout, machine: Machine, tokens: int
) -> TokenCost | None:
    """The predicted cost of `spec`'s prompt of `tokens` tokens (None for a row
    the prompt model does not cover: layer streaming, mixtures of experts)."""
    if layout.args.is_moe or not tokens:
        return None
    if spec.kind in ("dense", "mmap"):  # on the one thread the worker leaves them
        place = "dense" if spec.kind == "dense" else "paging"
        return prompt_cost(
            layout, place, machine, tokens, budget=spec.budget, threads=THREADS
        )
    if spec.kind == "streamed":
        plan = streamed_plan(spec, layout)
        return prompt_cost(layout, "streamed", machine, tokens, plan=plan)
    if spec.kind != "flash":
        return None
    return prompt_cost(
        layout,
        "sparse",
        machine,
        tokens,
        plan=flash_plan(spec, layout, source),
        predictor=spec.predictor,
        stats_layout=source,
        rows_in_dram=spec.rows_in_dram,
        window=spec.window,
    )


def prompt_fields(cost: TokenCost | None, measured_ms: float) -> dict:
    """A prompt's prediction beside its measurement."""
    if cost is None:
        return {}
    predicted = 1e3 * cost.total_s
    return {
        "predicted_prefill_ms": predicted,
        "measured_prefill_ms": measured_ms,
        "prefill_predicted_over_measured": predicted / measured_ms,
        "predicted_prefill_io_ms": 1e3 * cost.io_s,
        "predicted_prefill_memory_ms": 1e3 * cost.memory_s,
        "predicted_prefill_compute_ms": 1e3 * cost.compute_s,
    }


def prediction_fields(
    cost: TokenCost | None, measured_ms: float, disk_gb_per_s: float | None = None
) -> dict:
    """The prediction as the result stores it, beside the measurement; with the
    rate the row's reads got (`disk_gb_per_s`), also the prediction at that rate
    (`predicted_at_disk_ms`): the model's own error, without the disk's drift
    between the probe and the row."""
    if cost is None:
        return {"measured_ms": measured_ms}
    predicted = 1e3 * cost.total_s
    at_disk = None
    if disk_gb_per_s and cost.bytes_read:
        at_disk = 1e3 * cost.at_disk_rate(1e9 * disk_gb_per_s).total_s
    elif not cost.bytes_read:
        at_disk = predicted
    return {
        "predicted_at_disk_ms": at_disk,
        "at_disk_over_measured": at_disk / measured_ms if at_disk else None,
        "predicted_ms": predicted,
        "measured_ms": measured_ms,
        "predicted_over_measured": predicted / measured_ms if measured_ms else None,
        "predicted_io_ms": 1e3 * cost.io_s,
        "predicted_memory_ms": 1e3 * cost.memory_s,
        "predicted_compute_ms": 1e3 * cost.compute_s,
        "predicted_mb_per_token": cost.bytes_read / 1e6,
        "prediction_note": cost.note,
    }


def repredict(result: dict, compute: dict | None = None) -> None:
    """Set every row's prediction again with today's cost model, from the curves the
    result kept (`machines`) and its layouts (which must still be on disk): how an
    improved model does on measurements already made. `compute`: probes by backend
    whose compute and memory rates replace the kept ones (the run's disk stays)."""
    machines = {b: Machine.from_dict(d) for b, d in result.get("machines", {}).items()}
    for backend, probe in (compute or {}).items():
        if backend in machines:
            machines[backend] = replace(probe, disk=machines[backend].disk)
    layouts: dict[str, Layout] = {}

    def opened(path: str) -> Layout:
        if path not in layouts:
            layouts[path] = Layout.open(path)
        return layouts[path]

    for row in result["rows"]:
        m, info = row.get("metrics"), row.get("spec")
        machine = machines.get(row["backend"])
        if not m or not info or machine is None:
            continue
        spec = RunSpec.from_dict({**info, "prompt": [], "targets": []})
        source = opened(spec.predictor_layout or spec.layout)
        layout = opened(spec.layout)
        cost = predict(spec, layout, source, machine)
        m.update(prediction_fields(cost, m["total_ms"], m.get("gb_per_s")))
        tokens = result["settings"].get("prompt_tokens", 0)
        prompt = predict_prompt(spec, layout, source, machine, tokens)
        m.update(prompt_fields(prompt, 1e3 * row["prefill_s"]))
