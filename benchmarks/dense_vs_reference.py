"""Dense inference against an independent implementation, in one run on one machine.

Runs tools/reference_logits.py (Hugging Face transformers on CPU torch) in a separate
environment given by --reference-python, then mlx-flashinfer on both backends, and
prints (1) the max |logit difference| on a few prompts and whether greedy continuations
agree, (2) decode and prompt tokens/s side by side.

    python benchmarks/dense_vs_reference.py --model LAYOUT --gguf SOURCE.gguf \
        --reference-python /path/to/refenv/bin/python [--decode 64] [--prompt 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np

import mlx_flashinfer

PROMPTS = [
    "The capital of France is",
    "Alice was beginning to get very tired of sitting by her sister on the bank",
    "def fibonacci(n):",
]
TOOLS = Path(__file__).resolve().parents[1] / "tools"


def ours(layout: str, backend: str, prompts_ids, decode: int, prompt: int) -> dict:
    model, tok = mlx_flashinfer.load(layout, backend=backend)
    logits = [model.logits(ids) for ids in prompts_ids]
    greedy = [
        [r.token for r in mlx_flashinfer.stream_generate(model, tok, ids, max_tokens=8)]
        for ids in prompts_ids
    ]
    long_prompt = list(range(1000, 1000 + prompt))
    model.logits(long_prompt[:8])  # warm-up
    started = time.perf_counter()
    model.logits(long_prompt)
    prompt_tps = prompt / (time.perf_counter() - started)
    responses = mlx_flashinfer.stream_generate(
        model, tok, prompts_ids[0], max_tokens=decode
    )
    last = deque(responses, maxlen=1)[0]
    return {
        "logits": logits,
        "greedy": greedy,
        "prompt_tps": prompt_tps,
        "decode_tps": last.generation_tps,
        "decoded": last.generation_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="our layout of the model")
    parser.add_argument("--gguf", required=True, help="the GGUF the layout came from")
    parser.add_argument("--reference-python", required=True)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--backends", nargs="+", default=["numpy", "mlx"])
    opts = parser.parse_args()
    _, tok = mlx_flashinfer.load(opts.model, backend="numpy")
    prompts_ids = [tok.encode(p) for p in PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ref.npz"
        cmd = [
            opts.reference_python,
            str(TOOLS / "reference_logits.py"),
            "--gguf",
            opts.gguf,
            "--out",
            str(out),
            "--greedy",
            "8",
            "--bench-decode",
            str(opts.decode),
            "--bench-prompt",
            str(opts.prompt),
        ]
        for ids in prompts_ids:
            cmd += ["--tokens", ",".join(map(str, ids))]
            cmd += ["--prompt-ids", ",".join(map(str, ids))]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        ref = dict(np.load(out))
    results = {
        "reference": {
            "decode_tps": float(ref["bench_decode_tok_s"]),
            "prompt_tps": float(ref["bench_prompt_tok_s"]),
        }
    }
    print(
        "| implementation | max abs logit diff vs transformers | greedy 8 tokens agree "
        "| decode tok/s | prompt tok/s |"
    )
    print("|---|---|---|---|---|")
    r = results["reference"]
    print(
        f"| transformers (torch CPU, float32) | - | - | {r['decode_tps']:.1f} | "
        f"{r['prompt_tps']:.1f} |"
    )
    for backend in opts.backends:
        o = ours(opts.model, backend, prompts_ids, opts.decode, opts.prompt)
        diff = max(
            float(np.abs(o["logits"][i] - ref[f"logits_{i}"]).max())
            for i in range(len(PROMPTS))
        )
        agree = sum(
            o["greedy"][i] == ref[f"greedy_{i}"].tolist()[: len(o["greedy"][i])]
            for i in range(len(PROMPTS))
        )
        results[backend] = {
            "max_abs_diff": diff,
            "greedy_agree": agree,
            "decode_tps": o["decode_tps"],
            "prompt_tps": o["prompt_tps"],
        }
        print(
            f"| mlx-flashinfer {backend} (dense) | {diff:.2e} | "
            f"{agree}/{len(PROMPTS)} | {o['decode_tps']:.1f} | {o['prompt_tps']:.1f} |"
        )
    json.dump(results, sys.stderr)


if __name__ == "__main__":
    main()
