"""A prompt's time on flash (the sparse placement), in this process: the same
prompt run `--runs` times from a fresh KV cache, each timed. Compare two versions
of the code by running it on each in turn (git stash), as for the prompt's reads
ahead (flash/prompt_reads.py PREFILL_AHEAD_BYTES).

    python benchmarks/prompt_time.py [--model LAYOUT] [--budget 50%] [--tokens 128]
        [--backend numpy] [--predictor P] [--runs 3]
"""

from __future__ import annotations

import argparse
import time

from mlx_flashinfer.loader import load
from mlx_flashinfer.plan.host import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a layout (default: embedded)")
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--tokens", type=int, default=128, help="prompt tokens")
    parser.add_argument("--backend", default="numpy", choices=("numpy", "mlx"))
    parser.add_argument("--predictor", default=None)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model, _ = load(
        args.model,
        backend=args.backend,
        memory_budget=args.budget,
        placement="sparse",
        predictor=args.predictor,
        max_context=args.tokens + 8,
    )
    ids = [100 + 7 * i for i in range(args.tokens)]
    seconds = []
    for _ in range(args.runs):
        cache = model.make_cache()
        model.ffn.new_sequence()
        began = time.perf_counter()
        model.backend.synchronize(model.prefill(ids, cache))
        seconds.append(time.perf_counter() - began)
    model.ffn.close()
    print(
        f"{args.tokens}-token prompt, {args.backend}, budget {args.budget}, "
        f"scratch {model.ffn.plan.scratch_rows} rows, {cpu_model()}: "
        f"{[round(s, 2) for s in seconds]} s"
    )


if __name__ == "__main__":
    main()
