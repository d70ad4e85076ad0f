"""Dense decode and prefill speed of one layout on one backend: tokens/s of prompts
of several lengths and of greedy decode steps, best of a few repeats.

    python benchmarks/dense_speed.py --model LAYOUT [--backend numpy]
        [--prompts 16 128 512] [--decode 64] [--repeats 3] [--threads N]

Uses only the public API (`load`, `Model.prefill`, `Model.__call__`), so it also
measures an older checkout of the package (PYTHONPATH=OLD_CHECKOUT), in the same run
as the current one, for before/after ratios.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import mlx_flashinfer


def best_seconds(run, repeats: int) -> float:
    """The fastest of `repeats` runs of `run()`, which returns its own seconds,
    after one warm-up run (compilation, page cache, allocator)."""
    run()
    return min(run() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="compute threads")
    parser.add_argument("--label", default=None)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    model, _ = mlx_flashinfer.load(opts.model, backend=opts.backend)
    B = model.backend
    if opts.threads:
        B.limit_compute_threads(opts.threads)
    ids = np.random.default_rng(0).integers(10, model.args.vocab_size, 4096).tolist()
    row = {"label": opts.label or mlx_flashinfer.__file__, "backend": opts.backend}

    def prefill(n):
        def run():
            cache = model.make_cache()
            started = time.perf_counter()
            B.synchronize(model.prefill(ids[:n], cache))
            return time.perf_counter() - started

        return run

    for n in opts.prompts:
        row[f"prefill_{n}_tok_s"] = n / best_seconds(prefill(n), opts.repeats)

    def decode():
        cache = model.make_cache()
        B.synchronize(model.prefill(ids[:8], cache))
        started = time.perf_counter()
        for t in ids[8 : 8 + opts.decode]:
            logits = model([t], cache)
            B.synchronize(logits)
        return time.perf_counter() - started

    row["decode_tok_s"] = opts.decode / best_seconds(decode, opts.repeats)
    print(json.dumps(row))
    if opts.out:
        with open(opts.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
