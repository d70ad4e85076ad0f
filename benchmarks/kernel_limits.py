"""A prompt's time with the NumPy kernels' path limits as shipped (chosen on an AMD
EPYC) against those `flashinfer probe` measures on this machine
(`plan/machine.product_limits`): the model dense in DRAM, both in this process,
alternating.

    python benchmarks/kernel_limits.py [--model LAYOUT] [--tokens 16] [--pairs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from fallback_numpy import backend as numpy_backend
from fallback_numpy import kernels
from mlx_flashinfer.loader import load
from mlx_flashinfer.plan.compute_probe import product_limits
from mlx_flashinfer.plan.host import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a layout (default: embedded)")
    parser.add_argument("--tokens", type=int, default=16, help="prompt tokens")
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs")
    args = parser.parse_args()
    shipped = {name: getattr(kernels, name) for name in numpy_backend.PATH_LIMITS}
    measured = product_limits("numpy")
    model, _ = load(args.model, backend="numpy", max_context=args.tokens + 8)
    numpy_backend.tune_products(shipped)  # whatever a kept probe set at load
    ids = [100 + 7 * i for i in range(args.tokens)]

    def run(limits: dict) -> float:
        numpy_backend.tune_products(limits)
        cache = model.make_cache()
        began = time.perf_counter()
        model.prefill(ids, cache)
        return time.perf_counter() - began

    run(shipped), run(measured)  # warm up
    times = {"shipped": [], "measured": []}
    for pair in range(args.pairs):
        order = ("shipped", "measured") if pair % 2 == 0 else ("measured", "shipped")
        for name in order:
            times[name].append(run(shipped if name == "shipped" else measured))
    print(f"{args.tokens}-token prompt, {cpu_model()}")
    for name, limits in (("shipped", shipped), ("measured", measured)):
        ms = [round(1e3 * t) for t in times[name]]
        print(f"{name} {limits}: ms {ms}")
    ratio = statistics.median(times["shipped"]) / statistics.median(times["measured"])
    print(f"shipped / measured, medians: {ratio:.2f}")


if __name__ == "__main__":
    main()
