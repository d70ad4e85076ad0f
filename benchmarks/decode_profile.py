"""Where a flash decode step spends its time, function by function (cProfile).

Loads a layout in flash mode, prefills a prompt of seeded random token ids, then
profiles only the decode steps and prints the cumulative ms per token of the pieces of
the sparse path: the predictor, the window's bookkeeping, the flash reads, the widening
of stored bytes to float32, the cache's row moves and writes, and the FFN matmuls.
Single-process and unlimited: for finding hot spots, not for the paper's tables
(`flashinfer bench` is for those).

    python benchmarks/decode_profile.py LAYOUT [--backend numpy] [--budget 50%]
        [--window 4] [--prompt 32] [--tokens 32]
"""

import argparse
import cProfile
import pstats

import numpy as np

import mlx_flashinfer

# (label, file name ending(s), function name) of the pieces reported
PIECES = [
    ("predictor", ("predictors/kinds.py", "lowrank.py", "lowbit.py"), "predict"),
    ("window bookkeeping", "window.py", "step"),
    ("flash reads", "flash/reader.py", "read"),
    ("widening to float32", "safetensors_stream.py", "decode_into"),
    ("cache row moves", "backend.py", "move_rows"),
    ("cache row writes", "backend.py", "write_rows"),
    ("FFN matmuls", "flash/ffn.py", "_ffn"),
    ("flash FFN, all", "flash/ffn.py", "_decode"),
]


def cumulative_ms(stats: pstats.Stats, suffix: str | tuple, name: str) -> float:
    """Cumulative ms of every function `name` defined in a file ending in `suffix`
    (several predictor classes share `predict`)."""
    return 1e3 * sum(
        entry[3]
        for (path, _, func), entry in stats.stats.items()
        if func == name and path.endswith(suffix)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout")
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--budget", default="50%")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    opts = parser.parse_args()
    model, _ = mlx_flashinfer.load(
        opts.layout,
        backend=opts.backend,
        memory_budget=opts.budget,
        window=opts.window,
        max_context=opts.prompt + opts.tokens,
    )
    vocab = model.args.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, opts.prompt + opts.tokens)
    cache = model.make_cache()
    model.prefill(ids[: opts.prompt].tolist(), cache)
    profile = cProfile.Profile()
    profile.enable()
    for token in ids[opts.prompt :].tolist():
        model.backend.synchronize(model([token], cache))
    profile.disable()
    stats = pstats.Stats(profile)
    decode = model.io_stats()["decode"]
    n = decode["tokens"]
    print(
        f"{opts.layout}, {opts.backend}, budget {opts.budget}, k={opts.window}: "
        f"{n} decoded tokens, {decode['bytes_per_token'] / 1e6:.1f} MB/token, "
        f"{decode['ms_per_token']:.0f} ms/token (io {1e3 * decode['io_s'] / n:.0f}, "
        f"memory management {1e3 * decode['memory_s'] / n:.0f})\n"
    )
    print("| piece | ms/token |\n|---|---:|")
    for label, suffix, name in PIECES:
        print(f"| {label} | {cumulative_ms(stats, suffix, name) / n:.1f} |")


if __name__ == "__main__":
    main()
