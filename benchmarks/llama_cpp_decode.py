"""llama.cpp's decode of fixed tokens, as benchmarks/moe_speed.py's `decode` runs
ours: the prompt's ids, then each `feed` token alone, the argmax after each step.
Run by moe_speed.py's llama.cpp rows in the interpreter that has llama-cpp-python
(it imports nothing of ours); reads a JSON object on stdin, prints one on stdout:

    {"model": GGUF, "n_ctx": N, "threads": 2, "repack": false,
     "prompt": [ids], "feed": [ids]}
 -> {"ids": [...], "prompt_s": s, "per_token": s, "first_logits": [...]}

`repack` false keeps llama.cpp from copying Q4_0/Q8_0 weights into its repacked
CPU layout (anonymous memory, not the file's mapping): the weights stay memory-
mapped, paged in and out by the OS as ours are in the paging row.
"""

import json
import sys
import time

import llama_cpp.llama_cpp as lib
import numpy as np
from llama_cpp import Llama


def main() -> None:
    job = json.loads(sys.stdin.read())
    if not job.get("repack", True):
        defaults = lib.llama_model_default_params

        def no_repack():
            params = defaults()
            params.use_extra_bufts = False
            return params

        lib.llama_model_default_params = no_repack  # Llama() starts from these
    llm = Llama(
        job["model"],
        n_ctx=job["n_ctx"],
        n_threads=job["threads"],
        n_threads_batch=job["threads"],
        use_mmap=True,
        use_mlock=False,
        n_gpu_layers=0,
        logits_all=False,
        verbose=False,
    )
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:  # the last token's (logits_all off: only it)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))

    began = time.perf_counter()
    llm.eval(job["prompt"])
    first = last_logits().copy()
    ids = [int(np.argmax(first))]
    prompt_s = time.perf_counter() - began
    began = time.perf_counter()
    for token in job["feed"]:
        llm.eval([token])
        ids.append(int(np.argmax(last_logits())))
    per_token = (time.perf_counter() - began) / max(len(job["feed"]), 1)
    result = {"ids": ids, "prompt_s": prompt_s, "per_token": per_token}
    print(json.dumps(result | {"first_logits": first.tolist()}))


if __name__ == "__main__":
    main()
