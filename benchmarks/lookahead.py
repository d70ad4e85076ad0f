"""Reads ahead on and off, alternating in one process: ms per decoded token, the time
split, and how much of the reads ran behind compute (the figures behind
`loader.DEFAULT_LOOKAHEAD`).

    python benchmarks/lookahead.py --model LAYOUT [--budget 50%] [--tokens 24]
        [--repeats 2] [--backend numpy]

Teacher-forced on seeded random token ids (a 16-token prompt, then one token at a
time). The script prints how far the two settings' logits are apart: for a ReLU
model only float rounding (rows land in another order); a SiLU model's output also
depends on the cache size, which the second read buffer shrinks at the same budget
(tests/test_flash.py compares the same plan with and without reads ahead).
"""

from __future__ import annotations

import argparse

import numpy as np

import mlx_flashinfer


def run(opts, lookahead: bool, ids: list[int]) -> tuple[np.ndarray, dict]:
    model, _ = mlx_flashinfer.load(
        opts.model,
        backend=opts.backend,
        memory_budget=opts.budget,
        lookahead=lookahead,
    )
    logits = model.logits(ids, prefill=16)
    stats = model.io_stats()["decode"]
    model.ffn.close()
    return logits, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", default="numpy")
    opts = parser.parse_args()
    vocab = mlx_flashinfer.Layout.open(opts.model).args.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, 16 + opts.tokens).tolist()
    first = {}
    for _ in range(opts.repeats):
        for lookahead in (False, True):
            logits, s = run(opts, lookahead, ids)
            first.setdefault(lookahead, logits)
            n = s["tokens"]
            ms = {k: 1e3 * s[k] / n for k in ("io_s", "memory_s", "io_hidden_s")}
            print(
                f"lookahead {'on ' if lookahead else 'off'}: "
                f"{s['ms_per_token']:.1f} ms/token (I/O waited {ms['io_s']:.1f}, "
                f"memory {ms['memory_s']:.1f}, compute {1e3 * s['compute_s'] / n:.1f}"
                f"), {s['bytes_per_token'] / 1e6:.1f} MB/token; read behind compute "
                f"{ms['io_hidden_s']:.1f} ms, loads read ahead "
                f"{s['ahead_coverage']:.0%}, reads ahead used "
                f"{s['ahead_precision']:.0%}"
            )
    diff = float(np.abs(first[True] - first[False]).max())
    scale = float(np.abs(first[False]).max())
    print(f"max |logit difference| on vs off: {diff:.2e} (logits up to {scale:.1f})")


if __name__ == "__main__":
    main()
