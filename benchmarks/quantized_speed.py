"""Dense prefill and decode speed of the default model at q4, q8 and float16 on both
backends, beside llama.cpp on the same GGUF with the same thread count, in one run.

    python benchmarks/quantized_speed.py [--layouts DIR ...] [--backends numpy mlx]
        [--threads 2] [--decode 64] [--repeats 3] [--llama-python PYTHON]
        [--out benchmarks/results/quantized_speed.jsonl]

Each layout and backend runs in its own process (benchmarks/dense_speed.py), then
llama.cpp (llama-cpp-python, `--llama-python`: the interpreter that has it; build
it without AMX, see README) on the GGUF the layouts were converted from. The same
random token ids everywhere; best of `--repeats` after a warm-up. Layouts default
to /tmp/smollm2-{q4,q8,f16}, made with `flashinfer convert default DIR --dtype ...`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

LLAMA_CPP = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama

path, threads, prompts, decode, repeats = sys.argv[1:6]
threads, decode, repeats = int(threads), int(decode), int(repeats)
prompts = [int(p) for p in prompts.split(",")]
llm = Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=1024,
            n_batch=512, verbose=False)
ids = np.random.default_rng(0).integers(10, llm.n_vocab(), 4096).tolist()

def best(run):
    run()
    return min(run() for _ in range(repeats))

def prefill(n):
    def run():
        llm.reset()
        began = time.perf_counter()
        llm.eval(ids[:n])
        return time.perf_counter() - began
    return run

def decoding():
    llm.reset()
    llm.eval(ids[:8])
    began = time.perf_counter()
    for t in ids[8:8 + decode]:
        llm.eval([t])
    return time.perf_counter() - began

row = {"label": "llama.cpp " + path.rsplit("/", 1)[-1], "backend": "llama.cpp"}
for n in prompts:
    row[f"prefill_{n}_tok_s"] = n / best(prefill(n))
row["decode_tok_s"] = decode / best(decoding)
print(json.dumps(row))
"""


def run_json(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{' '.join(command[:3])}...: failed\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["/tmp/smollm2-q4", "/tmp/smollm2-q8", "/tmp/smollm2-f16"],
    )
    parser.add_argument("--backends", nargs="+", default=["numpy", "mlx"])
    parser.add_argument("--prompts", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gguf", default=None, help="default: the embedded model")
    parser.add_argument("--llama-python", default=sys.executable)
    parser.add_argument("--out", default=None, help="append JSON lines here")
    opts = parser.parse_args()
    prompts = [str(p) for p in opts.prompts]
    rows = []
    for layout in opts.layouts:
        for backend in opts.backends:
            command = [sys.executable, str(HERE / "dense_speed.py"), "--model", layout]
            command += ["--backend", backend, "--threads", str(opts.threads)]
            command += ["--decode", str(opts.decode), "--repeats", str(opts.repeats)]
            command += ["--prompts", *prompts, "--label", Path(layout).name]
            rows.append(run_json(command))
            print(json.dumps(rows[-1]), flush=True)
    gguf = opts.gguf
    if gguf is None:
        from mlx_flashinfer.formats.default_model import default_gguf_path

        gguf = str(default_gguf_path())
    command = [opts.llama_python, "-c", LLAMA_CPP, gguf, str(opts.threads)]
    command += [",".join(prompts), str(opts.decode), str(opts.repeats)]
    rows.append(run_json(command))
    print(json.dumps(rows[-1]), flush=True)
    if opts.out:
        with open(opts.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    keys = [f"prefill_{p}_tok_s" for p in prompts] + ["decode_tok_s"]
    print("\n| layout | backend | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for row in rows:
        values = " | ".join(f"{row[k]:.1f}" for k in keys)
        print(f"| {row['label']} | {row['backend']} | {values} |")


if __name__ == "__main__":
    main()
