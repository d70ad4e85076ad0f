"""Quality and bytes of the predictors: perplexity of held-out text through the sparse
path, for dense, the gate predictor and the trained low-rank predictor.

Trains the low-rank predictor on the first half of a text (CATS-calibrated active sets
for SiLU models, so gate and low-rank predict at matched sparsity), then scores the
start of the second half: each chunk's first `--prefill` tokens run as a prompt and
every later token as its own decode step through the flash path (what the method
really computes). Also reports the predictor's share of the decode time.

    python benchmarks/predictor_quality.py --model LAYOUT --text alice.txt
        [--budget 100%] [--tokens 1024] [--context 256] [--prefill 32]
        [--train-tokens 8192] [--rank 64] [--sparsity 0.5] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import mlx_flashinfer
from mlx_flashinfer.perplexity import perplexity
from mlx_flashinfer.train_predictor import train_predictor


def score(layout, ids, opts, **flash) -> dict:
    model, _ = mlx_flashinfer.load(layout, backend=opts.backend, **flash)
    started = time.perf_counter()
    result = perplexity(model, ids, opts.context, prefill=opts.prefill)
    result["seconds"] = time.perf_counter() - started
    if flash:
        stats = model.io_stats()["decode"]
        n = max(stats["tokens"], 1)
        result.update(
            bytes_per_token=stats["bytes_per_token"],
            ms_per_token=stats["ms_per_token"],
            predictor_share=stats["predictor_s"] / max(stats["total_s"], 1e-9),
            predictor_ms=1e3 * stats["predictor_s"] / n,
            predictor_mb=model.plan.predictor / 1e6,
        )
        model.ffn.close()
    return result


def smallest_budget(layout, predictor: str) -> str:
    """The smallest budget (% of the weights as stored) that holds the predictor."""
    from mlx_flashinfer.layout import Layout
    from mlx_flashinfer.memory import SLOT_BYTES, model_bytes, plan_floor
    from mlx_flashinfer.predictors import predictor_nbytes

    lay = Layout.open(layout)
    resident, ffn = model_bytes(lay)
    held = plan_floor(lay, predictor_nbytes(predictor, lay)) + SLOT_BYTES
    return f"{100 * (held + lay.bundle_bytes) / (resident + ffn):.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--budget", default="100%")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--prefill", type=int, default=32)
    parser.add_argument("--train-tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="*",
        default=[],
        help="also score the low-rank predictor at these probability cuts",
    )
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    text = Path(opts.text).read_text(encoding="utf-8")
    half = len(text) // 2
    with tempfile.TemporaryDirectory() as tmp:
        layout = Path(tmp) / "layout"
        shutil.copytree(opts.model, layout)
        section = train_predictor(
            layout,
            texts=[text[:half]],
            tokens=opts.train_tokens,
            rank=opts.rank,
            silu_sparsity=opts.sparsity,
            progress=False,
        )
        _, tok = mlx_flashinfer.load(layout, backend="numpy")
        ids = tok.encode(text[half:])[: opts.tokens]
        flash = {"memory_budget": opts.budget, "window": opts.window}
        rows = {"dense": score(layout, ids, opts)}
        for name in ("gate", "lowrank"):
            try:
                rows[name] = score(layout, ids, opts, predictor=name, **flash)
            except ValueError as err:  # a budget too small for this predictor
                rows[name] = {
                    "refused": str(err),
                    "needs": smallest_budget(layout, name),
                }
        for cut in opts.thresholds:  # fewer misses for more reads
            rows[f"lowrank@{cut}"] = score(
                layout, ids, opts, predictor="lowrank", predictor_threshold=cut, **flash
            )
    report = section["report"]
    recall = sum(r["recall"] for r in report) / len(report)
    predicted = sum(r["predicted_fraction"] for r in report) / len(report)
    print(
        f"{opts.model}: predictor trained on {section['tokens']} tokens of the first "
        f"half in {section['seconds']:.0f} s (rank {opts.rank}, mean held-out recall "
        f"{recall:.3f}, predicts {predicted:.1%} of neurons); scored "
        f"{rows['dense']['tokens']} tokens of the second half, chunks of "
        f"{opts.context}, prefill {opts.prefill}, budget {opts.budget}, "
        f"k={opts.window}, {opts.backend}\n"
    )
    print(
        "| predictor | perplexity | MB read/token | ms/token | predictor MB | "
        "predictor ms/token (share of decode) |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "refused" in r:
            print(f"| {name} | refused at {opts.budget}: needs {r['needs']} | | | | |")
            continue
        if name == "dense":
            print(f"| dense (all in DRAM) | {r['perplexity']:.3f} | 0 | | | |")
            continue
        print(
            f"| {name} | {r['perplexity']:.3f} | {r['bytes_per_token'] / 1e6:.2f} | "
            f"{r['ms_per_token']:.0f} | {r['predictor_mb']:.1f} | "
            f"{r['predictor_ms']:.1f} ({r['predictor_share']:.1%}) |"
        )
    if opts.out:
        Path(opts.out).write_text(
            json.dumps(
                {"options": vars(opts), "rows": rows, "report": report}, indent=1
            )
        )


if __name__ == "__main__":
    main()
