"""Speed of the 16-bit matmul kernels (fallback_numpy/kernels.py) against NumPy's
float32 BLAS, beside the memory bandwidth measured in the same run.

Each timing cycles through a set of distinct weight matrices of about --set-gb GB,
as a decode does over layers, so no matrix is served from the last-level cache
(a single 4096 x 4096 bfloat16 matrix fits in a 32 MB L3 and would overstate the
bandwidth). Reported per thread count (numba and BLAS both limited):

- GEMV, x @ w.T at T = 1: ms per matrix and GB/s of weight bytes, against the
  measured bandwidth (target for 2-byte weights: >= 70%);
- x @ w at T = 1 over neuron rows with 100%, 10% and 3% of x nonzero (the down
  projection of a ReLU model; zero entries of x skip their rows);
- GEMM, x @ w.T at T = 16, 128, 512: tokens/s relative to float32 BLAS (target:
  >= 80%);
- with --sweep: the two small-T/large-T paths side by side over T, and the widened
  block size, which is how kernels.py's thresholds were chosen.

The machine may be shared: the load average is printed before and after, and every
number is the best and the median of --reps cycles.

    python benchmarks/kernels.py [--threads 1 2] [--reps 5] [--set-gb 1.0]
        [--sweep] [--out results.json]
"""

import argparse
import json
import os
import platform
import subprocess
import time

import numba
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from fallback_numpy import kernels

KINDS = ("float32", "float16", "bfloat16")
GEMV_SHAPES = ((4096, 4096), (11008, 4096))  # (n, k): a square and a gate-like matrix
DOWN_SHAPE = (11008, 4096)  # neuron rows of a down projection
GEMM_SHAPE = (4096, 4096)
GEMM_BYTES = 256 << 20  # 16-bit weights per GEMM cycle: past the L3, and T >= 16
# is compute-bound enough that a larger set changes nothing


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in lscpu.splitlines()
            if "Model name" in line
        ),
        platform.processor(),
    )
    blas = [
        {key: info.get(key) for key in ("internal_api", "version", "architecture")}
        for info in threadpool_info()
        if info.get("user_api") == "blas"
    ]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "blas": blas,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cycle_times(op, x, matrices: list, reps: int, **kwargs) -> list[float]:
    """Seconds per matrix of each of `reps` passes of op(x, w, **kwargs) over all
    matrices w."""
    op(x, matrices[0], **kwargs)  # compile / warm up
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        for w in matrices:
            op(x, w, **kwargs)
        times.append((time.perf_counter() - started) / len(matrices))
    return times


def bandwidth_gbs(reps: int) -> float:
    """Streaming read of a 1 GiB float32 array (np.dot of it with itself: each byte
    comes from memory once), best of `reps`."""
    a = np.ones(1 << 28, np.float32)
    np.dot(a, a)
    best = min(cycle_times(np.dot, a, [a], reps))
    return a.nbytes / best / 1e9


def stored(base: np.ndarray, kind: str) -> np.ndarray:
    if kind == "bfloat16":
        return (base.view(np.uint32) >> 16).astype(np.uint16)
    return base.astype(kind)


def matrix_set(
    base: np.ndarray, kind: str, set_bytes: float = 0, count: int = 0
) -> list[np.ndarray]:
    """Distinct copies of `base` in `kind`: `count` of them, or about set_bytes in
    all (at least 2)."""
    first = stored(base, kind)
    count = count or max(2, round(set_bytes / first.nbytes))
    return [first] + [first.copy() for _ in range(count - 1)]


def sparse_x(rng, t: int, n: int, nonzero: float) -> np.ndarray:
    x = np.abs(rng.standard_normal((t, n))).astype(np.float32)
    x[rng.random((t, n)) >= nonzero] = 0
    return x


def record(rows: list, **fields) -> None:
    times = fields.pop("times")
    fields["best_ms"] = 1e3 * min(times)
    fields["median_ms"] = 1e3 * float(np.median(times))
    rows.append(fields)
    extra = " ".join(
        f"{key}={fields[key]:.3g}"
        if isinstance(fields[key], float)
        else f"{key}={fields[key]}"
        for key in ("gbs", "of_bandwidth", "tokens_s", "vs_float32")
        if key in fields
    )
    print(
        f"  {fields['op']:<8} {str(fields['shape']):<13} T={fields['T']:<4} "
        f"nz={fields.get('nonzero', 1.0):<5} {fields['kind']:<9} "
        f"best {fields['best_ms']:8.3f} ms  median {fields['median_ms']:8.3f} ms",
        extra,
        flush=True,
    )


def bench_gemv(rows, rng, threads, set_bytes, reps, bw) -> None:
    for n, k in GEMV_SHAPES:
        base = rng.standard_normal((n, k)).astype(np.float32)
        x = rng.standard_normal((1, k)).astype(np.float32)
        out = np.empty((1, n), np.float32)
        for kind in KINDS:
            matrices = matrix_set(base, kind, set_bytes)
            times = cycle_times(kernels.matmul_t, x, matrices, reps, out=out)
            gbs = matrices[0].nbytes / min(times) / 1e9
            record(
                rows,
                op="gemv",
                shape=(n, k),
                T=1,
                kind=kind,
                threads=threads,
                times=times,
                gbs=gbs,
                of_bandwidth=gbs / bw,
            )
            del matrices


def bench_sparse(rows, rng, threads, set_bytes, reps) -> None:
    n, k = DOWN_SHAPE
    base = rng.standard_normal((n, k)).astype(np.float32)
    out = np.empty((1, k), np.float32)
    for nonzero in (1.0, 0.1, 0.03):
        x = sparse_x(rng, 1, n, nonzero)
        dense_ms = None
        for kind in ("float32 numpy",) + KINDS:
            matrices = matrix_set(base, kind.split()[0], set_bytes)
            op = np.matmul if kind == "float32 numpy" else kernels.matmul
            times = cycle_times(op, x, matrices, reps, out=out)
            dense_ms = dense_ms or min(times)
            read = matrices[0].nbytes * np.count_nonzero(x) / n
            record(
                rows,
                op="x@w",
                shape=(n, k),
                T=1,
                nonzero=nonzero,
                kind=kind,
                threads=threads,
                times=times,
                gbs=read / min(times) / 1e9,
                vs_float32=dense_ms / min(times),
            )
            del matrices


def bench_gemm(rows, rng, threads, reps) -> None:
    """Prefill: x @ w.T over square matrices and x @ w over neuron rows (dense x),
    tokens/s against NumPy's float32 BLAS."""
    for op, function, (n, k) in (
        ("gemm x@w.T", kernels.matmul_t, GEMM_SHAPE),
        ("gemm x@w", kernels.matmul, DOWN_SHAPE),
    ):
        base = rng.standard_normal((n, k)).astype(np.float32)
        count = max(2, GEMM_BYTES // (2 * n * k))
        for t in (16, 128, 512):
            x = rng.standard_normal((t, n if function is kernels.matmul else k))
            x = x.astype(np.float32)
            reference = None
            for kind in ("float32 numpy",) + KINDS:
                matrices = matrix_set(base, kind.split()[0], count=count)
                if kind == "float32 numpy":
                    numpy_op = np.matmul if function is kernels.matmul else _matmul_t
                    times = cycle_times(numpy_op, x, matrices, reps)
                else:
                    times = cycle_times(function, x, matrices, reps)
                tokens = t / min(times)
                reference = reference or tokens
                record(
                    rows,
                    op=op,
                    shape=(n, k),
                    T=t,
                    kind=kind,
                    threads=threads,
                    times=times,
                    tokens_s=tokens,
                    vs_float32=tokens / reference,
                )
                del matrices


def _matmul_t(x, w):
    return x @ w.T


def bench_sweep(rows, rng, threads, set_bytes, reps) -> None:
    """Both paths of matmul_t and matmul over T, then the BLAS path's block size."""
    n, k = GEMM_SHAPE
    base = rng.standard_normal((n, k)).astype(np.float32)
    saved = kernels.DOT_ROWS_MAX_T, kernels.SUM_ROWS_MAX_TERMS, kernels.BLOCK_BYTES
    try:
        for kind in ("float16", "bfloat16"):
            matrices = matrix_set(base, kind, set_bytes / 2)
            for t in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
                x = rng.standard_normal((t, k)).astype(np.float32)
                for path, limit in (("loops", 1 << 30), ("blas", 0)):
                    kernels.DOT_ROWS_MAX_T = kernels.SUM_ROWS_MAX_TERMS = limit
                    times = cycle_times(kernels.matmul_t, x, matrices, reps)
                    record(
                        rows,
                        op=f"x@w.T {path}",
                        shape=(n, k),
                        T=t,
                        kind=kind,
                        threads=threads,
                        times=times,
                        tokens_s=t / min(times),
                    )
                    times = cycle_times(kernels.matmul, x, matrices, reps)
                    record(
                        rows,
                        op=f"x@w {path}",
                        shape=(n, k),
                        T=t,
                        kind=kind,
                        threads=threads,
                        times=times,
                        tokens_s=t / min(times),
                    )
            kernels.DOT_ROWS_MAX_T, kernels.SUM_ROWS_MAX_TERMS = saved[:2]
            for t in (16, 128, 512):
                x = rng.standard_normal((t, k)).astype(np.float32)
                for mb in (0.5, 1, 2, 4, 8):
                    kernels.BLOCK_BYTES = int(mb * (1 << 20))
                    times = cycle_times(kernels.matmul_t, x, matrices[:8], reps)
                    record(
                        rows,
                        op=f"block {mb}MB",
                        shape=(n, k),
                        T=t,
                        kind=kind,
                        threads=threads,
                        times=times,
                        tokens_s=t / min(times),
                    )
            del matrices
    finally:
        kernels.DOT_ROWS_MAX_T, kernels.SUM_ROWS_MAX_TERMS, kernels.BLOCK_BYTES = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--set-gb", type=float, default=1.0)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out")
    opts = parser.parse_args()
    info = machine()
    info["load_before"] = load()
    print(json.dumps(info, indent=1))
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    bandwidth = {}
    for threads in opts.threads:
        kernels.set_threads(threads)
        with threadpool_limits(threads, user_api="blas"):
            bw = bandwidth_gbs(opts.reps)
            bandwidth[threads] = bw
            print(f"threads={threads}: memory bandwidth {bw:.1f} GB/s ({load()})")
            if opts.sweep:
                bench_sweep(rows, rng, threads, opts.set_gb * 1e9, opts.reps)
                continue
            bench_gemv(rows, rng, threads, opts.set_gb * 1e9, opts.reps, bw)
            bench_sparse(rows, rng, threads, opts.set_gb * 1e9, opts.reps)
            bench_gemm(rows, rng, threads, opts.reps)
    info["load_after"] = load()
    print(info["load_after"])
    if opts.out:
        with open(opts.out, "w") as f:
            json.dump(
                {"machine": info, "bandwidth_gbs": bandwidth, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
