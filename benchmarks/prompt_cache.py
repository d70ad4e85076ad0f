"""Time to first token of a chat's second turn, with and without the prompt cache.

The first turn asks about a passage of text (a few hundred tokens); the second turn
asks a follow-up. With the cache, the second turn computes only its own tokens (the
reply and the new question); without it, the whole conversation runs again. Dense
and flash (at each budget), each configuration in this one process, with and without
taking turns, so the ratios survive a busy machine. In flash mode the bytes read by
the second turn's prompt are counted too.

    python benchmarks/prompt_cache.py [--model default] [--budgets 100% 50%]
        [--backends numpy] [--repeats 3] [--out benchmarks/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx_flashinfer
from mlx_flashinfer.chat import encode_chat
from mlx_flashinfer.prompt_cache import make_prompt_cache

TEXT = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "alice_in_wonderland.txt"
)
QUESTIONS = ("Who is the story about, in one sentence?", "What does she see next?")


def passage(words: int) -> str:
    text = TEXT.read_text(encoding="utf-8")
    start = text.find("Alice was beginning")
    return " ".join(text[start:].split()[:words])


def turn(model, tokenizer, ids, cache, max_tokens):
    """(seconds to the first token, flash bytes read by then, the reply's ids, the
    last response)."""
    before = model.io_stats().get("bytes_read", 0)
    started = time.perf_counter()
    first, reply, last = None, [], None
    for last in mlx_flashinfer.stream_generate(
        model, tokenizer, ids, max_tokens=max_tokens, prompt_cache=cache
    ):
        if first is None:
            first = time.perf_counter() - started
            read = model.io_stats().get("bytes_read", 0) - before
        reply.append(last.token)
    return first, read, reply, last


def measure(model, tokenizer, text: str, repeats: int, reply_tokens: int) -> dict:
    messages = [{"role": "user", "content": f"{text}\n\n{QUESTIONS[0]}"}]
    ttft = {"cached": [], "fresh": []}
    read = {"cached": [], "fresh": []}
    for r in range(repeats):
        cache = make_prompt_cache(model)
        first_ids = encode_chat(tokenizer, messages)
        *_, last = turn(model, tokenizer, first_ids, cache, reply_tokens)
        answer = tokenizer.decode(list(cache.tokens[len(first_ids) :]) + [last.token])
        second = [
            *messages,
            {"role": "assistant", "content": answer.split("<|im_end|>")[0]},
            {"role": "user", "content": QUESTIONS[1]},
        ]
        second_ids = encode_chat(tokenizer, second)
        # take turns: which one runs first alternates (a fresh cache takes the
        # flash windows over; the cached turn's prefill seeds them again)
        for kind in ("cached", "fresh") if r % 2 == 0 else ("fresh", "cached"):
            use = cache if kind == "cached" else make_prompt_cache(model)
            seconds, nbytes, _, response = turn(model, tokenizer, second_ids, use, 1)
            if kind == "cached":
                cached_tokens = response.cached_tokens
            ttft[kind].append(seconds)
            read[kind].append(nbytes)
    return {
        "prompt_tokens_turn1": len(first_ids),
        "prompt_tokens_turn2": len(second_ids),
        "cached_tokens_turn2": cached_tokens,
        "ttft_s": {k: statistics.median(v) for k, v in ttft.items()},
        "ttft_all_s": ttft,
        "bytes_read_turn2_prompt": {k: statistics.median(v) for k, v in read.items()},
        "speedup": statistics.median(ttft["fresh"]) / statistics.median(ttft["cached"]),
    }


def load(path, backend, budget, predictor):
    if budget is None:
        return mlx_flashinfer.load(path, backend=backend)
    return mlx_flashinfer.load(
        path, backend=backend, memory_budget=budget, predictor=predictor
    )


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--budgets", nargs="*", default=["100%", "50%"])
    parser.add_argument("--backends", nargs="+", default=["numpy"])
    parser.add_argument("--predictor", default="gate", help="flash mode")
    parser.add_argument("--words", type=int, default=300, help="passage length")
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/prompt_cache_smollm2.json")
    opts = parser.parse_args()
    text = passage(opts.words)
    rows = []
    for backend in opts.backends:
        for budget in [None, *opts.budgets]:
            row = {
                "backend": backend,
                "mode": "dense" if budget is None else "flash",
                "budget": budget,
            }
            try:
                model, tokenizer = load(
                    opts.model,
                    backend=backend,
                    memory_budget=budget,
                    predictor=opts.predictor,
                )
            except ValueError as err:  # the gate predictor's 53 MB do not fit 50%
                print(f"{budget} with predictor {opts.predictor}: {err}; using 'all'")
                row["refused"] = f"predictor {opts.predictor}: {err}"
                model, tokenizer = load(
                    opts.model, backend=backend, memory_budget=budget, predictor="all"
                )
            row["predictor"] = None if budget is None else model.ffn.predictor.name
            mlx_flashinfer.generate(model, tokenizer, "Hi", max_tokens=4)  # warm-up
            row |= measure(model, tokenizer, text, opts.repeats, opts.reply_tokens)
            rows.append(row)
            mb = {k: v / 1e6 for k, v in row["bytes_read_turn2_prompt"].items()}
            print(
                f"{backend:6} {row['mode']:5} {budget or '':5} turn 2: "
                f"{row['prompt_tokens_turn2']} prompt tokens, "
                f"{row['cached_tokens_turn2']} cached | TTFT "
                f"{row['ttft_s']['fresh']:.3f} s -> {row['ttft_s']['cached']:.3f} s "
                f"({row['speedup']:.1f}x) | read {mb['fresh']:.1f} -> "
                f"{mb['cached']:.1f} MB",
                flush=True,
            )
            if hasattr(model.ffn, "close"):
                model.ffn.close()
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "command": " ".join(["python", *sys.argv]),
        "rows": rows,
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
