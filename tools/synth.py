"""Write a synthetic sparse OPT or Llama model as a layout
(mlx_flashinfer/bench/synth_opt.py says exactly how its activation structure is
produced).

    python tools/synth.py DST [--shape opt-1.3b|opt-6.7b|opt-125m|opt-tiny|
                                       llama2-7b-relu|llama-tiny|
                                       moe-small|olmoe-half|olmoe|qwen3-30b-a3b|
                                       moe-tiny]
        [--layers N] [--hidden N] [--neurons N] [--heads N]   custom sizes
        [--dtype float16|bfloat16|float32|q8|q4] [--group-size 32|64|128]
        [--down-bits 4|8] [--arrangement bundled|separate] [--seed 0] [--force]

    python tools/synth.py DST --quality-only

--quality-only measures the predictor's loss of a synthetic layout written before
synth.py measured it (the planner allows a predictor's plans within a measured loss).
--layers/--hidden/--neurons/--heads replace those sizes of --shape (custom models).
The moe-*, olmoe* and qwen3-* shapes are mixtures of experts (bench/synth_moe.py:
random weights, routing skewed by --skew); --layers and --hidden replace their sizes.
"""

import argparse
import sys
import time

from mlx_flashinfer.bench.synth import (
    LLAMA_SHAPES,
    SHAPES,
    measure_quality,
    write_synthetic,
)
from mlx_flashinfer.bench.synth_moe import MOE_SHAPES, write_synthetic_moe
from mlx_flashinfer.formats.layout import ARRANGEMENTS, DTYPES


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def custom_shape(opts) -> str | dict:
    """--shape by name, or its sizes with the overrides given."""
    overrides = {
        "num_hidden_layers": opts.layers,
        "hidden_size": opts.hidden,
        "ffn_dim" if opts.shape in SHAPES else "intermediate_size": opts.neurons,
        "num_attention_heads": opts.heads,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return opts.shape
    base = {**SHAPES, **LLAMA_SHAPES, **MOE_SHAPES}[opts.shape]
    return {**base, **overrides}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dst")
    parser.add_argument(
        "--shape", choices=[*SHAPES, *LLAMA_SHAPES, *MOE_SHAPES], default="opt-1.3b"
    )
    parser.add_argument(
        "--skew",
        type=float,
        default=1.0,
        help="MoE: Zipf exponent of expert popularity",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float16")
    parser.add_argument("--arrangement", choices=ARRANGEMENTS, default="bundled")
    parser.add_argument("--group-size", type=int, choices=(32, 64, 128), default=None)
    parser.add_argument("--down-bits", type=int, choices=(4, 8), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    parser.add_argument(
        "--quality-only",
        action="store_true",
        help="measure the predictor's loss of the existing synthetic layout DST",
    )
    for flag in ("--layers", "--hidden", "--neurons", "--heads"):
        parser.add_argument(flag, type=positive, default=None, help="custom size")
    opts = parser.parse_args()
    try:
        print(run(opts))
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"synth: error: {err}", file=sys.stderr)
        return 2
    return 0


def run(opts) -> str:
    """Do what `opts` ask; the line saying what was done."""
    started = time.perf_counter()
    if opts.quality_only:
        quality = measure_quality(opts.dst)
        return (
            f"{opts.dst}: predictor loss {quality['loss']:+.4%} over "
            f"{quality['tokens']} tokens in {time.perf_counter() - started:.0f} s"
        )
    shape = custom_shape(opts)
    if opts.shape in MOE_SHAPES:
        progress = sys.stderr.isatty()
        write_synthetic_moe(
            opts.dst, shape, opts.dtype, opts.seed, opts.skew, opts.force, progress
        )
        what = opts.shape
    else:
        write_synthetic(
            opts.dst,
            shape,
            opts.dtype,
            opts.arrangement,
            opts.seed,
            force=opts.force,
            progress=sys.stderr.isatty(),
            group_size=opts.group_size,
            down_bits=opts.down_bits,
        )
        custom = " (custom sizes)" if isinstance(shape, dict) else ""
        what = f"{opts.shape}{custom} ({opts.arrangement})"
    return f"wrote {what} to {opts.dst} in {time.perf_counter() - started:.0f} s"


if __name__ == "__main__":
    sys.exit(main())
