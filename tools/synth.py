"""Write a synthetic sparse OPT or Llama model as a layout (mlx_flashinfer/synth.py says
exactly how its activation structure is produced).

    python tools/synth.py DST [--shape opt-1.3b|opt-6.7b|opt-125m|opt-tiny]
        [--dtype float16] [--arrangement bundled|separate] [--seed 0] [--force]
"""

import argparse
import sys
import time

from mlx_flashinfer.layout import ARRANGEMENTS, DTYPES
from mlx_flashinfer.synth import SHAPES, write_synthetic
from mlx_flashinfer.synth_llama import LLAMA_SHAPES


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dst")
    parser.add_argument("--shape", choices=[*SHAPES, *LLAMA_SHAPES], default="opt-1.3b")
    parser.add_argument("--dtype", choices=DTYPES, default="float16")
    parser.add_argument("--arrangement", choices=ARRANGEMENTS, default="bundled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true")
    opts = parser.parse_args()
    started = time.perf_counter()
    try:
        write_synthetic(
            opts.dst,
            opts.shape,
            opts.dtype,
            opts.arrangement,
            opts.seed,
            force=opts.force,
            progress=sys.stderr.isatty(),
        )
    except (ValueError, FileExistsError) as err:
        print(f"synth: error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {opts.shape} ({opts.arrangement}) to {opts.dst} in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
