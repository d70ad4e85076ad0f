"""llama.cpp's perplexity of a text, scored as `flashinfer perplexity` scores it:
the same token ids (our tokenizer of LAYOUT, converted from the same GGUF), the same
non-overlapping chunks, every token of a chunk but its first scored from a fresh cache.

    python benchmarks/llama_cpp_perplexity.py --layout LAYOUT --text FILE
        [--gguf FILE] [--context 512] [--threads 2] [--llama-python PYTHON]

llama.cpp runs in `--llama-python` (the interpreter that has llama-cpp-python; build it
without AMX, see README); the token ids go to it on stdin.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SCORE = r"""
import json, math, sys
import numpy as np
from llama_cpp import Llama

path, context, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = json.loads(sys.stdin.read())
llm = Llama(path, n_ctx=context, n_batch=context, n_threads=threads,
            n_threads_batch=threads, logits_all=True, verbose=False)
total, scored = 0.0, 0
for start in range(0, len(ids) - 1, context):
    chunk = ids[start:start + context]
    if len(chunk) < 2:
        continue
    llm.reset()
    llm.eval(chunk)
    logits = np.array(llm.scores[: len(chunk) - 1], dtype=np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    norm = np.log(np.exp(logits).sum(axis=-1))
    targets = np.asarray(chunk[1:])
    total += float((norm - logits[np.arange(len(targets)), targets]).sum())
    scored += len(targets)
print(json.dumps({"perplexity": math.exp(total / scored), "tokens": scored}))
"""


def llama_perplexity(python: str, gguf_path, ids, context: int, threads: int) -> dict:
    """{"perplexity", "tokens"} of llama.cpp, run in the interpreter `python`, on the
    token ids `ids` in chunks of `context`."""
    done = subprocess.run(
        [python, "-c", SCORE, str(gguf_path), str(context), str(threads)],
        input=json.dumps(ids),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        sys.exit(f"llama.cpp failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", required=True, help="supplies the tokenizer")
    parser.add_argument("--text", required=True)
    parser.add_argument("--gguf", default=None, help="default: the embedded model")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-python", default=sys.executable)
    opts = parser.parse_args()
    from mlx_flashinfer.formats.default_model import default_gguf_path
    from mlx_flashinfer.formats.layout import Layout
    from mlx_flashinfer.formats.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Layout.open(opts.layout))
    with open(opts.text, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    gguf = opts.gguf or str(default_gguf_path())
    result = llama_perplexity(opts.llama_python, gguf, ids, opts.context, opts.threads)
    print(
        f"llama.cpp perplexity {result['perplexity']:.4f} over {result['tokens']} "
        f"tokens (chunks of {opts.context}) of {gguf}"
    )


if __name__ == "__main__":
    main()
