"""NumPy's products over a few tokens (a short prompt's, 4 and 8), weight GB/s, on
the machine's threads: narrow float16 rows (the default model's 1536 x 576) and
2048-wide q4 ones, which fall under the dispatcher's size for sharing a job among
threads when only their weight bytes count (fallback_numpy/_dispatch.py
PARALLEL_MIN_BYTES, now weights x tokens).

    python benchmarks/short_products.py [--seconds 0.8]

Run it on two versions of the kernels in turn (git stash) to compare.
"""

from __future__ import annotations

import argparse

import numpy as np

from mlx_flashinfer.formats.quantize import Quantized
from mlx_flashinfer.model.backends import get_backend
from mlx_flashinfer.plan import compute_probe as M
from mlx_flashinfer.plan.host import cpu_model

SHAPES = ((1536, 576), (2048, 2048))  # rows, width


def matrices(B, rng, dtype: str, rows: int, width: int, nbytes: int) -> list:
    """Random stored matrices of `dtype`, `nbytes` in all (out of the caches)."""
    if dtype == "q4":
        words, groups = width * 4 // 32, width // 64
        one = rows * (words * 4 + 4 * groups)
        make = lambda: Quantized(  # noqa: E731
            rng.integers(0, 2**32, (rows, words), dtype=np.uint32),
            M._finite_half(rng, (rows, groups)),
            M._finite_half(rng, (rows, groups)),
            4,
            64,
        )
    else:
        one = rows * width * 2
        make = lambda: M._finite_half(rng, (rows, width))  # noqa: E731
    return [B.weight(make()) for _ in range(max(1, nbytes // one))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.8, help="per cell")
    args = parser.parse_args()
    B = get_backend("numpy")
    rng = np.random.default_rng(0)
    print(cpu_model())
    for dtype in ("float16", "q4"):
        for rows, width in SHAPES:
            weights = matrices(B, rng, dtype, rows, width, 64 << 20)
            cells = []
            for tokens in (4, 8):
                x = B.array(rng.standard_normal((tokens, width)).astype(np.float32))
                rate, _ = M._rate(B, x, weights, args.seconds)
                cells.append(f"{tokens} tokens {rate / 1e9:5.2f}")
            print(f"{dtype} {rows} x {width}: {', '.join(cells)} GB/s")


if __name__ == "__main__":
    main()
