"""The flash reader's sparse reads through io_uring against its thread pool, on a
layout's own FFN file: random neuron sets of a few percent of a layer (a sparse
token's reads), the same sets both ways, alternating, page cache bypassed.

    python benchmarks/uring_reads.py LAYOUT [--density 0.02] [--calls 64]
        [--repeats 3] [--out benchmarks/results/uring_reads.json]

Prints, per way: wall ms and CPU ms per call (process CPU: the reader's threads
included), reads per call and GB/s of bytes read. The ring is what the reader uses
where the kernel has it (flash/uring.py); MLX_FLASHINFER_URING=0 is the pool.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from mlx_flashinfer.flash.reader import FlashReader
from mlx_flashinfer.formats.layout import Layout
from mlx_flashinfer.plan.host import cpu_model


def run(layout: Layout, sets: list, ring: bool) -> dict:
    """Read every (layer, ids) of `sets` once; the per-call figures."""
    os.environ["MLX_FLASHINFER_URING"] = "1" if ring else "0"
    with FlashReader(layout.ffn_path, layout.layers, layout.bundle_bytes) as reader:
        assert (reader._ring() is not None) == ring, "io_uring is unavailable here"
        reader.read(*sets[0])  # warm: threads, ring, staging pages
        reader.stats.reset()
        wall, cpu = time.perf_counter(), time.process_time()
        for layer, ids in sets:
            reader.read(layer, ids)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stats = reader.stats.snapshot()
    calls = len(sets)
    return {
        "ring": ring,
        "wall_ms_per_call": 1e3 * wall / calls,
        "cpu_ms_per_call": 1e3 * cpu / calls,
        "reads_per_call": stats["reads"] / calls,
        "cpu_us_per_read": 1e6 * cpu / max(stats["reads"], 1),
        "gb_per_s": stats["bytes_read"] / wall / 1e9,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layout")
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()
    layout = Layout.open(opts.layout)
    rng = np.random.default_rng(0)
    sets = []
    for _ in range(opts.calls):
        layer = int(rng.integers(len(layout.layers)))
        n = layout.layers[layer].neurons
        ids = np.sort(rng.choice(n, max(1, int(opts.density * n)), replace=False))
        sets.append((layer, ids))
    results = []
    for repeat in range(opts.repeats):
        for ring in (False, True):
            row = run(layout, sets, ring)
            results.append({"repeat": repeat, **row})
            print(
                f"{'io_uring' if ring else 'threads '}: "
                f"{row['wall_ms_per_call']:.1f} ms wall, "
                f"{row['cpu_ms_per_call']:.1f} ms CPU a call; "
                f"{row['reads_per_call']:.0f} reads of "
                f"{layout.bundle_bytes} B bundles, {row['cpu_us_per_read']:.1f} us "
                f"CPU a read, {row['gb_per_s']:.2f} GB/s"
            )
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(
                {
                    "layout": str(opts.layout),
                    "bundle_bytes": layout.bundle_bytes,
                    "density": opts.density,
                    "calls": opts.calls,
                    "cpu": cpu_model(),
                    "cores": os.cpu_count(),
                    "runs": results,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
