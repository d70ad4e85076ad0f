"""A prompt's time with the head run on every prompt token against on its last
alone (what `Model.prefill` and generation do): both in this process, alternating.

    python benchmarks/prompt_logits.py [--model LAYOUT] [--backend numpy]
        [--tokens 128] [--pairs 4]

Prints the milliseconds of each run and the ratio of the medians. Default model:
the embedded SmolLM2-135M-Instruct (its head is 21% of its weights).
"""

from __future__ import annotations

import argparse
import statistics
import time

from mlx_flashinfer.loader import load
from mlx_flashinfer.plan.host import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a layout (default: embedded)")
    parser.add_argument("--backend", default="numpy", choices=("numpy", "mlx"))
    parser.add_argument("--tokens", type=int, default=128, help="prompt tokens")
    parser.add_argument("--pairs", type=int, default=4, help="alternating pairs")
    args = parser.parse_args()
    model, _ = load(args.model, backend=args.backend)
    B = model.backend
    ids = [100 + i for i in range(args.tokens)]

    def run(last_only: bool) -> float:
        cache = model.make_cache()
        began = time.perf_counter()
        B.synchronize(model(ids, cache, last_only=last_only))
        return time.perf_counter() - began

    run(True), run(False)  # warm up
    times = {True: [], False: []}
    for pair in range(args.pairs):
        for last_only in (True, False) if pair % 2 == 0 else (False, True):
            times[last_only].append(run(last_only))
    every, last = (statistics.median(times[k]) for k in (False, True))
    print(f"{args.backend}, {args.tokens}-token prompt, {cpu_model()}")
    print("head on every token, ms:", [round(t * 1000) for t in times[False]])
    print("head on the last one, ms:", [round(t * 1000) for t in times[True]])
    print(f"ratio of medians: {every / last:.2f}")


if __name__ == "__main__":
    main()
