"""Measure this disk's random-read throughput by read size and thread count (the
code lives in `mlx_flashinfer/plan/disk.py` and `bench/reader_probe.py`).

    python tools/disk_probe.py /work/probe --out probe.json [--keep]
    python tools/disk_probe.py /work/probe --reader --out reader.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlx_flashinfer.bench.reader_probe import reader_bench, reader_table
from mlx_flashinfer.plan.disk import (  # noqa: F401  (re-exported for scripts)
    probe,
    table,
    throughput_at,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dir", nargs="?", default=".", help="where to put the test file"
    )
    parser.add_argument("--size-gib", type=float, default=2.0, help="test file size")
    parser.add_argument("--seconds", type=float, default=1.5, help="time per cell")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the test files")
    parser.add_argument(
        "--reader", action="store_true", help="measure FlashReader on ffn.bin shapes"
    )
    args = parser.parse_args()
    if args.reader:
        rows = reader_bench(args.dir, seconds=args.seconds, keep=args.keep)
        print(reader_table(rows))
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
        return
    result = probe(
        args.dir,
        seconds=args.seconds,
        file_bytes=int(args.size_gib * (1 << 30)),
        keep=args.keep,
    )
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
