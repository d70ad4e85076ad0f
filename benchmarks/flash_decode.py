"""Per-token decode cost of the flash runtime against dense, on both backends.

For one layout and budget: bytes read per token, reads and mean read size, achieved GB/s
next to this disk's measured random-read throughput at that read size (a probe JSON from
tools/disk_probe.py), and the latency split into I/O, memory management and compute.

    python benchmarks/flash_decode.py --model DIR [--budget 50%] [--window 4]
        [--predictor oracle] [--backends numpy mlx] [--tokens 64]
        [--probe /work/probe/probe.json] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import deque
from pathlib import Path

import mlx_flashinfer
from mlx_flashinfer.flash.reader import DEFAULT_THREADS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from disk_probe import throughput_at  # noqa: E402

PROMPT = "Alice was beginning to get very tired of sitting by her sister on the bank"


def run(model_dir, backend, tokens, **flash) -> dict:
    model, tok = mlx_flashinfer.load(model_dir, backend=backend, **flash)
    started = time.perf_counter()
    responses = mlx_flashinfer.stream_generate(model, tok, PROMPT, max_tokens=tokens)
    last = deque(responses, maxlen=1)[0]
    out = {
        "backend": backend,
        "mode": "flash" if flash else "dense",
        "tokens": last.generation_tokens,
        "decode_tok_s": last.generation_tps,
        "prompt_tok_s": last.prompt_tps,
        "seconds": time.perf_counter() - started,
        "peak_memory_gb": last.peak_memory_gb,
    }
    if flash:
        out["stats"] = model.io_stats()["decode"]
        out["plan"] = dict(model.plan.rows(model.args.intermediate_size))
        out["reader_mode"] = model.io_stats()["mode"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--predictor", default="oracle")
    parser.add_argument("--backends", nargs="+", default=["numpy", "mlx"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--probe", default=None, help="JSON of tools/disk_probe.py")
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    probe = json.loads(Path(opts.probe).read_text()) if opts.probe else None
    flash = {
        "memory_budget": opts.budget,
        "window": opts.window,
        "predictor": opts.predictor,
    }
    results = []
    for backend in opts.backends:
        results.append(run(opts.model, backend, opts.tokens))
        results.append(run(opts.model, backend, opts.tokens, **flash))
    print(
        f"model {opts.model}, budget {opts.budget}, k={opts.window}, predictor "
        f"{opts.predictor}, {opts.tokens} tokens, {platform.machine()}\n"
    )
    print(
        "| backend | mode | tok/s | MB read/token | reads/token | mean read KiB | "
        "GB/s | disk GB/s at that size | I/O ms | mem ms | compute ms | total ms | "
        "hit rate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["mode"] == "dense":
            print(
                f"| {r['backend']} | dense | {r['decode_tok_s']:.1f} | 0 | | | | | | | "
                f"| {1e3 / max(r['decode_tok_s'], 1e-9):.1f} | |"
            )
            continue
        s, n = r["stats"], max(r["stats"]["tokens"], 1)
        size = s["mean_read_bytes"]
        disk = (
            throughput_at(probe, size, DEFAULT_THREADS) / 1e9 if probe else float("nan")
        )
        r["disk_gb_s_at_read_size"] = disk
        print(
            f"| {r['backend']} | flash | {r['decode_tok_s']:.1f} | "
            f"{s['bytes_per_token'] / 1e6:.2f} | {s['reads'] / n:.0f} | "
            f"{size / 1024:.1f} | "
            f"{s['gb_per_s']:.2f} | {disk:.2f} | {1e3 * s['io_s'] / n:.1f} | "
            f"{1e3 * s['memory_s'] / n:.1f} | {1e3 * s['compute_s'] / n:.1f} | "
            f"{s['ms_per_token']:.1f} | {s['hit_rate']:.1%} |"
        )
    if opts.out:
        Path(opts.out).write_text(
            json.dumps({"options": vars(opts), "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
