"""The paper's ablation (Tables 2 and 3) and the baselines, each configuration in its
own memory-limited process: a thin wrapper of `flashinfer bench` (same options).

    python benchmarks/ablation.py MODEL [--unbundled LAYOUT] [--budget 50%]
        [--backends numpy mlx] [--tokens 256] [--prompt-tokens 128]
        [--probe PROBE.json] [--out benchmarks/results/ablation_MODEL.json]
    python benchmarks/ablation.py --compare A.json B.json [--out cmp.json]
"""

from __future__ import annotations

import sys

from mlx_flashinfer.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
