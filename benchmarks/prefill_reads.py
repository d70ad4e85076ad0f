"""Bytes a prompt reads from flash, per layer, after a conversation: issue 13's
"a 16-token prompt after a 256-token conversation reads <= 10% of the FFN bytes per
layer" (a chat turn must not stream the whole FFN).

Runs a `--history`-token prompt, decodes `--decode` tokens, then a `--turn`-token
prompt continuing the same KV cache, and reports what that last prompt read: bytes
per layer as a share of the layer, layers streamed whole vs read sparsely, time.
Token ids are seeded random (synthetic models) or the start of `--text`.

    python benchmarks/prefill_reads.py --model LAYOUT [--budget 50%] [--history 256]
        [--decode 16] [--turn 16] [--backend numpy] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

import mlx_flashinfer
from mlx_flashinfer.plan.host import machine_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--history", type=int, default=256)
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--turn", type=int, default=16)
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    model, _ = mlx_flashinfer.load(
        opts.model, backend=opts.backend, memory_budget=opts.budget
    )
    args = model.args
    rng = np.random.default_rng(opts.seed)
    ids = rng.integers(0, args.vocab_size, opts.history + opts.decode + opts.turn)
    ids = ids.tolist()
    cache = model.make_cache()
    model.prefill(ids[: opts.history], cache)
    for token in ids[opts.history : opts.history + opts.decode]:
        model([token], cache)
    before = model.ffn.prefill.bytes_read, model.ffn.prefill.prefill_streamed
    neurons_before = model.ffn.prefill.prefill_neurons
    started = time.perf_counter()
    model.backend.synchronize(model(ids[opts.history + opts.decode :], cache))
    seconds = time.perf_counter() - started
    stats = model.ffn.prefill
    layer_bytes = args.intermediate_size * model.plan.row_bytes
    layers = args.num_hidden_layers
    read = stats.bytes_read - before[0]
    result = {
        "model": str(opts.model),
        "options": vars(opts),
        "machine": machine_info(),
        "platform": platform.platform(),
        "turn_tokens": opts.turn,
        "bytes_read": read,
        "share_of_ffn": read / (layer_bytes * layers),
        "neurons_per_layer": (stats.prefill_neurons - neurons_before) / layers,
        "layers_streamed": stats.prefill_streamed - before[1],
        "layers": layers,
        "seconds": seconds,
    }
    print(
        f"{opts.turn}-token prompt after {opts.history} + {opts.decode} tokens: "
        f"read {read / 1e6:.1f} MB = {100 * result['share_of_ffn']:.1f}% of the FFN "
        f"({result['neurons_per_layer']:.0f} of {args.intermediate_size} neurons per "
        f"layer; {result['layers_streamed']} of {layers} layers streamed whole) in "
        f"{seconds:.2f} s"
    )
    if opts.out:
        Path(opts.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
