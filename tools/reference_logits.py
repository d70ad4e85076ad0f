"""Independent reference: Hugging Face transformers logits, greedy ids and CPU speed.

This is an independent check of mlx-flashinfer's logits and speed against
Hugging Face transformers on the CPU build of torch.  It is NOT part of the
project and does not import it; run it with a separate venv, e.g.

    /work/refenv/bin/python tools/reference_logits.py --gguf MODEL.gguf \
        --tokens 504,3575,282,4649,314 --greedy 8 --prompt-ids 504,3575,282,4649,314 \
        --out ref.npz --bench-decode 64 --bench-prompt 128

(the venv needs torch, transformers, accelerate, gguf, sentencepiece,
safetensors and numpy).  For each --tokens list, OUT.npz gets `logits_i`, the
float32 logits of shape (len, vocab) of one full forward pass in float32
without a KV cache.  --greedy N writes `greedy_i`: N greedy token ids
(model.generate, do_sample=False, EOS does not stop it) after each
--prompt-ids list.  --bench-decode N / --bench-prompt N measure decode and
prefill tokens/s (KV cache, default torch threads), print them as a JSON line
and store them as `bench_decode_tok_s` / `bench_prompt_tok_s`.  --text STR
tokenizes STR with the model's tokenizer and prints the ids (and uses them as
a --tokens / --prompt-ids list if those are not given).
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only
import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
)


def ids(s):
    return [int(t) for t in s.replace(" ", "").split(",") if t]


def load(args):
    if args.gguf:
        d, kw = (
            os.path.dirname(os.path.abspath(args.gguf)),
            {"gguf_file": os.path.basename(args.gguf)},
        )
    else:
        d, kw = args.hf, {}
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, **kw).eval()
    try:
        tok = AutoTokenizer.from_pretrained(d, **kw)
        tok = (
            tok if len(tok) > 1 else None
        )  # OPT dir without vocab: empty GPT2Tokenizer
    except Exception:  # tiny test checkpoints ship no tokenizer
        tok = None
    model.generation_config.eos_token_id = None  # never stop early
    model.generation_config.pad_token_id = 0
    return model, tok


class Stamp(LogitsProcessor):
    """Records when each token's logits are ready (the first one ends the prefill)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def generate(model, prompt, n, stamp=None):
    x = torch.tensor([prompt])
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([stamp] if stamp else []),
    )
    return out[0, len(prompt) :].tolist()


def best_time(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--gguf", help="GGUF file (loaded and dequantized by transformers)"
    )
    src.add_argument("--hf", help="Hugging Face checkpoint directory")
    p.add_argument(
        "--tokens",
        action="append",
        default=[],
        type=ids,
        help="comma-separated ids; repeatable",
    )
    p.add_argument(
        "--prompt-ids",
        action="append",
        default=[],
        type=ids,
        help="prompts for --greedy; repeatable",
    )
    p.add_argument(
        "--greedy", type=int, default=0, help="number of greedy tokens per --prompt-ids"
    )
    p.add_argument(
        "--text", help="tokenize this text, print the ids, use them if no ids are given"
    )
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument(
        "--bench-decode",
        type=int,
        default=0,
        help="decode N tokens after a short prompt",
    )
    p.add_argument(
        "--bench-prompt", type=int, default=0, help="prefill an N-token prompt"
    )
    p.add_argument(
        "--reps", type=int, default=3, help="timing repetitions (best is kept)"
    )
    a = p.parse_args(argv)

    torch.manual_seed(0)
    model, tok = load(a)
    vocab = model.config.vocab_size
    out, report = {}, {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if a.text is not None:
        if tok is None:
            p.error("--text needs a model with a tokenizer")
        text_ids = tok(a.text, add_special_tokens=False).input_ids
        report["text_ids"] = text_ids
        a.tokens = a.tokens or [text_ids]
        a.prompt_ids = a.prompt_ids or [text_ids]

    with torch.inference_mode():
        for i, t in enumerate(a.tokens):
            logits = model(torch.tensor([t]), use_cache=False).logits[0].float().numpy()
            out[f"logits_{i}"] = logits.astype(np.float32)
            report.setdefault("top1", []).append(int(logits[-1].argmax()))
        if a.greedy:
            for i, t in enumerate(a.prompt_ids):
                g = generate(model, t, a.greedy)
                out[f"greedy_{i}"] = np.array(g, dtype=np.int64)
                report.setdefault("greedy", []).append(g)
                if tok is not None:
                    report.setdefault("greedy_text", []).append(tok.decode(g))
        rng = np.random.default_rng(0)
        if a.bench_decode:
            n = a.bench_decode
            prompt = rng.integers(3, vocab, 8).tolist()
            generate(model, prompt, 4)  # warm-up
            best = float("inf")
            for _ in range(
                a.reps
            ):  # decode time: first token's logits -> end, N-1 steps
                st = Stamp()
                generate(model, prompt, n, st)
                best = min(best, time.perf_counter() - st.times[0])
            report["bench_decode_tok_s"] = (n - 1) / best
            out["bench_decode_tok_s"] = np.float64(report["bench_decode_tok_s"])
        if a.bench_prompt:
            x = torch.tensor([rng.integers(3, vocab, a.bench_prompt).tolist()])
            model(x, use_cache=True)  # warm-up
            t = best_time(lambda: model(x, use_cache=True), a.reps)
            report["bench_prompt_tok_s"] = a.bench_prompt / t
            out["bench_prompt_tok_s"] = np.float64(report["bench_prompt_tok_s"])

    np.savez(a.out, **out)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
