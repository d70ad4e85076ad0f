"""Does updating a few rows of the neuron cache copy the whole matrix? (issue: flash
runtime)

For growing cache capacities, each "token" moves 25 rows (swap-delete) and writes 50 new
rows into a preallocated (capacity, 576) float32 matrix (one bundle part of the
default model's layers), then runs one matmul over it, as the flash FFN does. If an
update copied the matrix, its time would grow with the capacity; in place, it stays
flat. Prints a table per backend.

    python benchmarks/cache_update.py [--backend numpy mlx] [--tokens 50]
"""

import argparse
import time

import numpy as np

from mlx_flashinfer.model.backends import get_backend


def measure(B, capacity: int, width: int, tokens: int, rng) -> tuple[float, float]:
    cache = B.zeros((capacity, width))
    x = B.array(rng.standard_normal((1, width)))
    update_s = compute_s = 0.0
    for _ in range(tokens):
        slots = rng.choice(capacity, 75, replace=False)
        rows = B.array(rng.standard_normal((50, width)))
        started = time.perf_counter()
        cache = B.move_rows(cache, slots[:25], slots[25:50])
        cache = B.write_rows(cache, slots[25:75], rows)
        B.synchronize(cache)
        update_s += time.perf_counter() - started
        started = time.perf_counter()
        out = B.linear(x, B.rows_weight(cache))
        B.synchronize(out)
        compute_s += time.perf_counter() - started
        del out
    return update_s / tokens, compute_s / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", nargs="+", default=["numpy", "mlx"])
    parser.add_argument("--tokens", type=int, default=50)
    opts = parser.parse_args()
    rng = np.random.default_rng(0)
    width = 576
    print(
        "| backend | capacity (rows) | matrix MB | update ms/token | matmul ms/token |"
    )
    print("|---|---|---|---|---|")
    for name in opts.backend:
        B = get_backend(name)
        for capacity in (1_000, 4_000, 16_000, 64_000):
            update, compute = measure(B, capacity, width, opts.tokens, rng)
            mb = capacity * width * 4 / 1e6
            print(
                f"| {name} | {capacity} | {mb:.0f} | {1e3 * update:.3f} | "
                f"{1e3 * compute:.2f} |"
            )


if __name__ == "__main__":
    main()
