"""The cost model against the measurement, row by row, from `flashinfer bench`
results made on a probed machine (each row's `predicted_ms` beside `measured_ms`).

    python benchmarks/prediction_table.py benchmarks/results/plan_*.json [--out T.md]

Prints one markdown table: model, budget, backend, row, measured and predicted ms per
token with the predicted terms, predicted / measured, and whether it is within the
issue's +-25%.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TOLERANCE = 0.25


def table(paths: list[Path]) -> str:
    lines = [
        "| model | budget | backend | row | measured ms | predicted ms (I/O, memory, "
        "compute) | predicted / measured | within 25% |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for path in paths:
        result = json.loads(path.read_text())
        model = result["model"]["name"]
        budget = result["settings"]["budget"]
        for row in result["rows"]:
            m = row.get("metrics") or {}
            if "predicted_ms" not in m:
                continue
            ratio = m["predicted_over_measured"]
            terms = (
                f"{m['predicted_ms']:.0f} ({m['predicted_io_ms']:.0f}, "
                f"{m['predicted_memory_ms']:.0f}, {m['predicted_compute_ms']:.0f})"
            )
            ok = "yes" if abs(ratio - 1) <= TOLERANCE else "**no**"
            lines.append(
                f"| {model} | {budget} | {row['backend']} | {row['row']} | "
                f"{m['measured_ms']:.0f} | {terms} | {ratio:.2f} | {ok} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write it here")
    opts = parser.parse_args()
    text = table(opts.results)
    print(text, end="")
    if opts.out:
        opts.out.write_text(text)


if __name__ == "__main__":
    main()
