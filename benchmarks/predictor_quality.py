"""Quality and bytes of the predictors: perplexity of held-out text through the sparse
path, for dense, the gate predictor and the trained predictor (low-bit or low-rank).

The predictor is trained as `flashinfer train-predictor` trains it (by
default on the package's calibration text, chapters I-VI of Alice; `--recall`,
`--max-loss` as there), or taken as the layout has it (`--use-trained`). Scored: the
start of the held-out part of Alice (chapters VII-XII, `texts.held_out_part` of
`--text`, the whole book): each chunk's first `--prefill` tokens run as a prompt and
every later token as its own decode step through the flash path (what the method
really computes). Also reports the share of FFN neurons each decoded token skipped
(predicted neither for it nor cached), the bytes read and the predictor's time.

    python benchmarks/predictor_quality.py --model LAYOUT --text alice.txt
        [--budget 100%] [--tokens 1024] [--context 256] [--prefill 32]
        [--train-tokens 8192] [--kind lowbit|lowrank] [--rank 64]
        [--recall 0.99 | --max-loss 3%] [--use-trained] [--predictors gate lowbit]
        [--out results.json]
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
from mlx_flashinfer.predictors.texts import held_out_part
from mlx_flashinfer.predictors.train import parse_max_loss, train_predictor


def score(layout, ids, opts, **flash) -> dict:
    model, _ = mlx_flashinfer.load(layout, backend=opts.backend, **flash)
    started = time.perf_counter()
    result = perplexity(model, ids, opts.context, prefill=opts.prefill)
    result["seconds"] = time.perf_counter() - started
    if flash:
        stats = model.io_stats()["decode"]
        n = max(stats["tokens"], 1)
        args = model.args
        neurons = n * args.num_hidden_layers * args.intermediate_size
        result.update(
            bytes_per_token=stats["bytes_per_token"],
            ms_per_token=stats["ms_per_token"],
            predicted_share=stats["neurons_predicted"] / neurons,
            predictor_share=stats["predictor_s"] / max(stats["total_s"], 1e-9),
            predictor_ms=1e3 * stats["predictor_s"] / n,
            predictor_mb=model.plan.predictor / 1e6,
        )
        model.ffn.close()
    return result


def smallest_budget(layout, predictor: str) -> str:
    """The smallest budget (% of the weights as stored) that holds the predictor."""
    from mlx_flashinfer.flash.memory import SLOT_BYTES, model_bytes, plan_floor
    from mlx_flashinfer.formats.layout import Layout
    from mlx_flashinfer.predictors.kinds import predictor_nbytes

    lay = Layout.open(layout)
    resident, ffn = model_bytes(lay)
    held = plan_floor(lay, predictor_nbytes(predictor, lay)) + SLOT_BYTES
    return f"{100 * (held + lay.bundle_bytes) / (resident + ffn):.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--text", required=True, help="the whole of Alice (eBook #11)")
    parser.add_argument("--budget", default="100%")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--prefill", type=int, default=32)
    parser.add_argument("--train-tokens", type=int, default=8192)
    parser.add_argument(
        "--kind", choices=["lowbit", "lowrank"], default=None, help="as train-predictor"
    )
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--recall", type=float, default=0.99)
    parser.add_argument("--max-loss", default=None)
    parser.add_argument(
        "--use-trained",
        action="store_true",
        help="score the layout's own predictor (no training)",
    )
    parser.add_argument(
        "--predictors",
        nargs="+",
        default=None,
        choices=["gate", "lowrank", "lowbit"],
        help="default: gate and the trained one",
    )
    parser.add_argument(
        "--thresholds",
        type=float,
        nargs="*",
        default=[],
        help="also score the low-rank predictor at these probability cuts",
    )
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    held_out = held_out_part(Path(opts.text).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        layout = Path(tmp) / "layout"
        shutil.copytree(opts.model, layout)
        max_loss = None if opts.max_loss is None else parse_max_loss(opts.max_loss)
        if opts.use_trained:
            section = mlx_flashinfer.Layout.open(layout).manifest["predictor"]
        else:
            section = train_predictor(
                layout,
                tokens=opts.train_tokens,
                kind=opts.kind,
                rank=opts.rank,
                recall=opts.recall,
                max_loss=max_loss,
                silu_sparsity=opts.sparsity,
                progress=False,
            )
        _, tok = mlx_flashinfer.load(layout, backend="numpy")
        ids = tok.encode(held_out)[: opts.tokens]
        flash = {"memory_budget": opts.budget, "window": opts.window}
        rows = {"dense": score(layout, ids, opts)}
        kind = section.get("kind", "lowrank")
        for name in opts.predictors or ["gate", kind]:
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
    measured = section.get("quality") or {}
    print(
        f"{opts.model}: predictor trained on {section['tokens']} tokens "
        f"({section['source']}) in {section['seconds']:.0f} s ({kind}"
        f"{f' rank {opts.rank}' if kind == 'lowrank' else ''}, "
        f"mean tune-split recall {recall:.3f}, predicts {predicted:.1%} of neurons, "
        f"calibration loss {measured.get('loss', float('nan')):+.1%}); scored "
        f"{rows['dense']['tokens']} held-out tokens, chunks of {opts.context}, "
        f"prefill {opts.prefill}, budget {opts.budget}, k={opts.window}, "
        f"{opts.backend}\n"
    )
    print(
        "| predictor | perplexity | vs dense | FFN skipped (predicted) | "
        "MB read/token | ms/token | predictor MB | predictor ms/token (share) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    dense = rows["dense"]["perplexity"]
    for name, r in rows.items():
        if "refused" in r:
            print(f"| {name} | refused at {opts.budget}: needs {r['needs']} |||||||")
            continue
        if name == "dense":
            print(f"| dense (all in DRAM) | {r['perplexity']:.3f} | | 0 | 0 | | | |")
            continue
        print(
            f"| {name} | {r['perplexity']:.3f} | {r['perplexity'] / dense - 1:+.1%} | "
            f"{1 - r['predicted_share']:.1%} | {r['bytes_per_token'] / 1e6:.2f} | "
            f"{r['ms_per_token']:.0f} | {r['predictor_mb']:.1f} | "
            f"{r['predictor_ms']:.1f} ({r['predictor_share']:.1%}) |"
        )
    if opts.out:
        Path(opts.out).write_text(
            json.dumps(
                {"options": vars(opts), "rows": rows, "predictor": section}, indent=1
            )
        )


if __name__ == "__main__":
    main()
