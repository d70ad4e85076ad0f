"""`flashinfer bench`: the paper's ablation and the baselines for one layout and budget,
each configuration measured in its own memory-limited process.

    specs = prepare(...)                    rows x backends, plans checked, limits set
    result = run_bench(specs, runner, ...)  one worker per spec, results + metadata
    report.markdown(result)                 the tables; plots.write_plots for PNGs
"""

from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass
from pathlib import Path

from ..flash.memory import model_bytes
from ..formats.layout import Layout
from ..loader import resolve_model
from ..plan.host import machine_info, ram_bytes
from .configs import (
    BASE_OVERHEAD,
    TITLES,
    RunSpec,
    build_specs,
    memory_limit,
    sequence_tokens,
)
from .layouts import check_same_model, unbundled_layout
from .predicted import predict, predict_prompt, prediction_fields, prompt_fields
from .report import row_metrics
from .runner import Runner

FORMAT = "mlx-flashinfer-bench"
VERSION = 1


@dataclass
class Prepared:
    """The layouts, the runs and the settings of one bench invocation."""

    bundled: Layout
    unbundled: Layout | None
    specs: list[RunSpec]
    settings: dict
    skipped: list[str]

    def layout_of(self, spec: RunSpec) -> Layout:
        """The layout a spec reads its FFN from."""
        other = self.unbundled
        return other if other and spec.layout == str(other.path) else self.bundled


def prepare(
    model: str | None,
    unbundled: str | None = None,
    budget: str | int = "50%",
    backends: tuple[str, ...] = ("numpy", "mlx"),
    rows: tuple[str, ...] | None = None,
    text: str | None = None,
    prompt_tokens: int = 128,
    tokens: int = 256,
    slow_tokens: int | None = None,
    window: int = 4,
    predictor: str | None = None,
    threads: int | None = None,
    limit: int | None = None,
    cache_dir: str | None = None,
    machines: dict | None = None,
) -> Prepared:
    """Open the layouts (writing the unbundled copy if none is given), build every
    run and its memory limit.

    Args:
        model: the model spec (layout directory, checkpoint, or None / "default"
            for the embedded SmolLM2).
        unbundled: the same model converted with arrangement "separate" (default:
            written into the cache folder on first use).
        budget: the memory budget of the flash rows (bytes, "1.5GB", "50%").
        rows: configurations to run (default: all of configs.ROWS; "plan" only
            with `machines`).
        text: the text whose tokens are the prompt and the decoded sequence
            (default: fixed pseudo-random token ids).
        slow_tokens: decoded tokens of the rows that read half the FFN or more
            (default: `tokens`).
        limit: one explicit memory limit in bytes for every row (default: per row,
            see configs.memory_limit).
        machines: this machine's curves per backend, for the "plan" row.

    Raises:
        FileNotFoundError, ValueError: a missing layout, an unbundled layout of
            another model, a bad budget or option.
    """
    from .configs import ROWS

    bundled = Layout.open(resolve_model(model, cache_dir=cache_dir))
    if bundled.args.is_moe:
        raise ValueError(
            "flashinfer bench runs the paper's ablation of dense FFNs; "
            "benchmarks/moe_speed.py measures a mixture of experts"
        )
    # the plan row, by default, only where this machine's curves are known
    rows = tuple(rows or (r for r in ROWS if r != "plan" or machines))
    other = None
    if {"+predictor", "+windowing"} & set(rows):
        if unbundled is None:
            other = unbundled_layout(bundled, cache_dir)
        else:
            other = Layout.open(unbundled)
        check_same_model(bundled, other)
    slow_tokens = slow_tokens or tokens
    count = prompt_tokens + max(tokens, slow_tokens)
    ids = sequence_tokens(bundled, text, count)
    planned = None
    if "plan" in rows and machines:
        from ..plan.planner import choose

        planned = {
            backend: choose(bundled, budget, machine, max_context=count).best
            for backend, machine in machines.items()
        }
    specs = build_specs(
        bundled,
        other,
        budget,
        list(backends),
        list(rows),
        ids,
        prompt_tokens,
        tokens,
        slow_tokens,
        window,
        predictor,
        threads,
        planned,
    )
    skipped, kept = [], []
    ram = ram_bytes()
    for spec in specs:
        layout = other if other and spec.layout == str(other.path) else bundled
        spec.limit = limit or memory_limit(spec, layout, bundled)
        if spec.kind == "dense" and ram and spec.limit > 0.8 * ram and not limit:
            skipped.append(f"{spec.backend} dense: needs {spec.limit} bytes of RAM")
            continue
        kept.append(spec)
    flash = next((s for s in specs if s.row == "all"), None)
    settings = {
        "model": str(bundled.path),
        "unbundled": str(other.path) if other else None,
        "budget": budget,
        "budget_bytes": specs[0].budget if specs else None,
        "backends": list(backends),
        "rows": list(rows),
        "prompt_tokens": prompt_tokens,
        "tokens": tokens,
        "slow_tokens": slow_tokens,
        "sequence": "teacher-forced: "
        + ("the start of --text" if text is not None else "seeded random token ids"),
        "window": window,
        "predictor": flash.predictor if flash else predictor,
        "threads": threads,
        "explicit_limit": limit,
        "base_overhead": BASE_OVERHEAD,
    }
    return Prepared(bundled, other, kept, settings, skipped)


def layout_files(*layouts: Layout | None) -> list[Path]:
    """Every file of the layouts (what is evicted before each run)."""
    return [
        layout.path / name
        for layout in layouts
        if layout is not None
        for name in layout.manifest["files"]
    ]


def model_facts(layout: Layout) -> dict:
    """The model's shape and sizes, for the report."""
    args = layout.args
    resident, ffn = model_bytes(layout)
    return {
        "name": layout.path.name,
        "family": args.family,
        "activation": args.hidden_act,
        "dtype": layout.dtype,
        "layers": args.num_hidden_layers,
        "d_model": args.hidden_size,
        "neurons": args.intermediate_size,
        "ffn_bytes": layout.ffn_bytes,
        "resident_bytes": layout.resident_bytes,
        "weight_bytes": resident + ffn,  # as stored, and as held
    }


def run_bench(
    prepared: Prepared,
    runner: Runner,
    probe: dict | None,
    limits: str,
    progress: bool = True,
    machines: dict | None = None,
) -> dict:
    """Run every spec with `runner`; the result document (see `FORMAT`).

    Args:
        limits: how memory was limited, for the report (e.g. "cgroup v1").
        machines: this machine's curves per backend (`plan.machine.Machine`): each
            row then carries the cost model's prediction beside its measurement.
    """
    rows = []
    ffn = prepared.bundled.ffn_bytes
    for i, spec in enumerate(prepared.specs):
        result = runner(spec)
        spec_info = spec.to_dict()
        spec_info.pop("prompt")
        spec_info["targets"] = len(spec.targets)
        result["spec"] = spec_info
        result["title"] = TITLES[spec.row]
        if "error" not in result:
            result["metrics"] = row_metrics(result, probe, ffn)
            machine = (machines or {}).get(spec.backend)
            if machine is not None:
                layout = prepared.layout_of(spec)
                cost = predict(spec, layout, prepared.bundled, machine)
                m = result["metrics"]
                fields = prediction_fields(cost, m["total_ms"], m["gb_per_s"])
                m.update(fields)
                prompt = predict_prompt(
                    spec, layout, prepared.bundled, machine, len(spec.prompt)
                )
                m.update(prompt_fields(prompt, 1e3 * result["prefill_s"]))
        rows.append(result)
        if progress:
            print(f"[{i + 1}/{len(prepared.specs)}] {_line(result)}", file=sys.stderr)
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": machine_info(),
        "probe": probe,
        "model": model_facts(prepared.bundled),
        "settings": prepared.settings,
        "memory_limits": limits,
        "machines": {b: m.to_dict() for b, m in (machines or {}).items()},
        "skipped": prepared.skipped,
        "rows": rows,
    }


def _line(result: dict) -> str:
    head = f"{result['backend']} {result['row']}"
    if "error" in result:
        return f"{head}: failed: {result['error']}"
    m, mem = result["metrics"], result["memory"]
    peak = mem.get("peak") or result.get("max_rss")
    limit = mem.get("limit")
    bound = f" of {limit / 1e6:.0f} MB" if limit else " (unlimited)"
    return (
        f"{head}: {m['total_ms']:.1f} ms/token, {m['mb_per_token']:.2f} MB/token, "
        f"peak {peak / 1e6:.0f} MB{bound}"
    )
