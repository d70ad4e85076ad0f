"""FlashReader itself on ffn.bin-like files and random sparse neuron sets: what the
reader's defaults (threads, the read-through gap) were chosen on. The disk's own
curves (read size x threads) are `plan/disk.py`'s.

    python tools/disk_probe.py /work/probe --reader --out reader.json
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..flash.reader import FlashReader
from ..formats.layout import LayerExtent, align_up
from ..plan.disk import KIB, _write_test_file

# (layers, neurons, bundle bytes): the default model, and an OPT-6.7B layer shape
# (4 of its 32 layers are enough to defeat caching).
READER_SHAPES = {"smollm2": (30, 1536, 3456), "opt-6.7b": (4, 16384, 16384)}


def reader_bench(
    path: str | Path | None = None,
    shapes: dict[str, tuple[int, int, int]] = READER_SHAPES,
    threads: tuple[int, ...] = (1, 4, 8, 16, 32),
    gaps: tuple[int, ...] = (0, 16 * KIB, 64 * KIB),
    densities: tuple[float, ...] = (0.03, 0.10),
    seconds: float = 1.5,
    keep: bool = False,
    progress: bool = True,
) -> list[dict]:
    """FlashReader on ffn.bin-like files: per "token", every layer reads a random
    sorted `density` fraction of its bundles, for `seconds` per configuration."""
    from tqdm import tqdm

    directory = Path(path if path is not None else ".")
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (layers, neurons, size) in shapes.items():
        extents = [
            LayerExtent(i * align_up(neurons * size), neurons) for i in range(layers)
        ]
        file = directory / f"ffn_{name}.bin"
        nbytes = layers * align_up(neurons * size)
        if not (file.is_file() and file.stat().st_size == nbytes):
            _write_test_file(file, nbytes, progress)
        grid = [(d, t, g) for d in densities for t in threads for g in gaps]
        for density, count, gap in tqdm(grid, desc=name, disable=not progress):
            _drop_caches()
            rng = np.random.default_rng(0)
            k = max(1, round(density * neurons))
            with FlashReader(file, extents, size, count, gap) as reader:
                stop = time.perf_counter() + seconds
                while time.perf_counter() < stop:
                    for layer in range(layers):
                        ids = np.sort(rng.choice(neurons, k, replace=False))
                        reader.read(layer, ids)
                s = reader.stats
                rows.append(
                    {
                        "shape": name,
                        "density": density,
                        "threads": count,
                        "max_gap": gap,
                        "mode": reader.mode,
                        "useful_bytes_per_s": s.bytes_useful / s.seconds,
                        "disk_bytes_per_s": s.bytes_read / s.seconds,
                        "mean_read_bytes": s.bytes_read / s.reads,
                        "amplification": s.bytes_read / s.bytes_useful,
                        "ms_per_layer": 1e3 * s.seconds / s.calls,
                    }
                )
        if not keep:
            file.unlink()
    return rows


def reader_table(rows: list[dict]) -> str:
    """reader_bench rows as a markdown table."""
    lines = [
        "| shape | density | threads | max_gap | useful MB/s | disk MB/s | mean read "
        "| read/useful | ms/layer |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['density']:.0%} | {r['threads']} | "
            f"{r['max_gap'] // KIB} KiB | {r['useful_bytes_per_s'] / 1e6:.0f} | "
            f"{r['disk_bytes_per_s'] / 1e6:.0f} | {r['mean_read_bytes'] / KIB:.1f} KiB "
            f"| {r['amplification']:.2f} | {r['ms_per_layer']:.2f} |"
        )
    return "\n".join(lines)


def _drop_caches() -> None:
    # Only buffered reads would hit the page cache; needs root, harmless otherwise.
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass
