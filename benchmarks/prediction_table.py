"""The cost model against the measurement, row by row, from `flashinfer bench`
results made on a probed machine (each row's `predicted_ms` beside `measured_ms`).

    python benchmarks/prediction_table.py benchmarks/results/plan_*.json [--out T.md]
        [--repredict]

Prints one markdown table: model, budget, backend, row, measured and predicted ms per
token with the predicted terms, predicted / measured, and the same prediction at the
rate the row's reads actually got from the disk (the model's own error, without the
disk's drift between the probe and the row), each marked within the issue's +-25% or
not. `--repredict` predicts every row again with today's cost model, from the curves
each result kept and its layouts (still on disk); `--compute-from PROBE` (per backend)
with a newer probe's compute rates. `--prefill`: the rows' prompts instead
(`plan/prompt_costs.py`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlx_flashinfer.bench.predicted import repredict
from mlx_flashinfer.plan.machine import load_machine

TOLERANCE = 0.25


def _mark(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}" + ("" if abs(ratio - 1) <= TOLERANCE else " **no**")


def _rows(paths: list[Path], key: str, again: bool, compute: dict | None):
    """(result, row, metrics) of every row whose metrics hold `key`, each result
    predicted again first with `again`."""
    for path in paths:
        result = json.loads(path.read_text())
        if again:
            repredict(result, compute)
        for row in result["rows"]:
            m = row.get("metrics") or {}
            if key in m:
                yield result, row, m


def _first_cells(result: dict, row: dict) -> str:
    settings = result["settings"]
    return (
        f"| {result['model']['name']} | {settings['budget']} | {row['backend']} | "
        f"{row['row']} |"
    )


def _terms(m: dict, prefix: str) -> str:
    """ "412 (105, 58, 249)": a prediction and its I/O, memory and compute terms,
    from the metrics `{prefix}ms`, `{prefix}io_ms`, ..."""
    return (
        f"{m[prefix + 'ms']:.0f} ({m[prefix + 'io_ms']:.0f}, "
        f"{m[prefix + 'memory_ms']:.0f}, {m[prefix + 'compute_ms']:.0f})"
    )


def table(paths: list[Path], again: bool = False, compute: dict | None = None) -> str:
    lines = [
        "| model | budget | backend | row | measured ms | disk GB/s | predicted ms "
        "(I/O, memory, compute) | predicted / measured | at the row's disk rate: "
        "ms | / measured |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result, row, m in _rows(paths, "predicted_ms", again, compute):
        terms = _terms(m, "predicted_")
        at_disk = m.get("predicted_at_disk_ms")
        rate = f"{m['gb_per_s']:.2f}" if m.get("gb_per_s") else "-"
        lines.append(
            f"{_first_cells(result, row)} {m['measured_ms']:.0f} | {rate} | {terms} | "
            f"{_mark(m['predicted_over_measured'])} | "
            f"{f'{at_disk:.0f}' if at_disk else '-'} | "
            f"{_mark(m.get('at_disk_over_measured'))} |"
        )
    return "\n".join(lines) + "\n"


def prefill_table(
    paths: list[Path], again: bool = False, compute: dict | None = None
) -> str:
    """The same for the rows' prompts (`predicted_prefill_ms` beside the measured
    prefill)."""
    lines = [
        "| model | budget | backend | row | prompt tokens | measured ms | predicted ms "
        "(I/O, memory, compute) | predicted / measured |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for result, row, m in _rows(paths, "predicted_prefill_ms", again, compute):
        terms = _terms(m, "predicted_prefill_")
        lines.append(
            f"{_first_cells(result, row)} {result['settings'].get('prompt_tokens')} | "
            f"{m['measured_prefill_ms']:.0f} | {terms} | "
            f"{_mark(m['prefill_predicted_over_measured'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write it here")
    parser.add_argument(
        "--repredict", action="store_true", help="predict again with today's model"
    )
    parser.add_argument(
        "--prefill", action="store_true", help="the rows' prompts instead of tokens"
    )
    parser.add_argument(
        "--compute-from",
        action="append",
        default=[],
        metavar="PROBE",
        help="a machine probe (flashinfer probe; repeat per backend) whose compute "
        "rates replace the kept ones; each run's disk stays",
    )
    opts = parser.parse_args()
    compute = {m.backend: m for m in map(load_machine, opts.compute_from)}
    tabulate = prefill_table if opts.prefill else table
    text = tabulate(opts.results, opts.repredict or bool(compute), compute)
    print(text, end="")
    if opts.out:
        opts.out.write_text(text)


if __name__ == "__main__":
    main()
