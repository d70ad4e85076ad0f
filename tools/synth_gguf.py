"""Write the GGUF of a synthetic mixture of experts, for llama.cpp's row of
benchmarks/moe_speed.py (mlx_flashinfer/bench/synth_moe_gguf.py says how).

    python tools/synth_gguf.py LAYOUT DST.gguf [--force]

LAYOUT: written by `python tools/synth.py LAYOUT --shape moe-small` (any moe-*
shape, seed, skew, dtype); the GGUF holds the same model: F16 for a float16 layout,
Q4_0/Q8_0 expert stacks for a q4/q8 one.
"""

import argparse
import sys
import time

from mlx_flashinfer.bench.synth_moe_gguf import write_synthetic_gguf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout", help="a layout of a synthetic MoE (tools/synth.py)")
    parser.add_argument("dst", help="the GGUF file to write")
    parser.add_argument("--force", action="store_true", help="replace DST")
    opts = parser.parse_args()
    started = time.perf_counter()
    try:
        path = write_synthetic_gguf(
            opts.layout, opts.dst, force=opts.force, progress=sys.stderr.isatty()
        )
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"synth_gguf: error: {err}", file=sys.stderr)
        return 2
    size = path.stat().st_size
    print(
        f"wrote {path} ({size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
