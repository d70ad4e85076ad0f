"""Speed of the 16-bit and quantized matmul kernels (fallback_numpy/kernels.py)
against NumPy's float32 BLAS, beside the memory bandwidth measured in the same run.

Each timing cycles through a set of distinct weight matrices of about --set-gb GB,
as a decode does over layers, so no matrix is served from the last-level cache
(one 4096 x 4096 bfloat16 matrix fits in a 32 MB L3 and would overstate the
bandwidth). Per thread count (kernels.set_threads and the BLAS limit alike):

- GEMV, x @ w.T at T = 1: ms per matrix and GB/s of weight bytes, against the
  memory bandwidth of a streaming read by as many threads, measured in turn with
  them (target for 2-byte weights: >= 70%);
- x @ w at T = 1 over neuron rows with 100%, 10% and 3% of x nonzero (the down
  projection of a ReLU model: zero entries of x skip their rows), against NumPy's
  dense float32 x @ w; these decode rows run with BLAS on one thread, as flash
  mode does;
- prefill, x @ w.T and x @ w at T = 16, 128, 512: tokens/s relative to NumPy's
  float32 BLAS (target: >= 80%);
- with --sweep instead: both paths of each function over T, and the widened block
  size, which is how the thresholds of kernels.py and the block size of _dispatch.py
  were chosen (--quantized: the paths of qmatmul_t and qmatmul, for QDOT_ROWS_MAX_T
  and QSUM_ROWS_MAX_TERMS).

Quantized kinds q8 and q4 (group size --group-size, default 64) run beside the
16-bit ones, through qmatmul_t / qmatmul; their GB/s count all the bytes they read
(packed integers, scales and biases), and the summary gives their GEMV speed per
matrix against float16's (targets: q4 >= 2x, q8 >= 1.5x).

The machine may be shared: the load average is printed before and after, the kinds
take turns within each of --reps passes (a busy spell hits them alike), and every
number is the best and the median of those passes.

    python benchmarks/kernels.py [--threads 1 2] [--reps 5] [--set-gb 1.0]
        [--kinds float32 float16 bfloat16 q8 q4] [--group-size 64]
        [--sweep [--quantized]] [--out results.json]
"""

import argparse
import json
import os
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import pairwise

import numba
import numpy as np
from numba import njit
from threadpoolctl import threadpool_info, threadpool_limits

from fallback_numpy import _dispatch, kernels
from mlx_flashinfer.formats.quantize import QUANTIZED_DTYPES, Quantized, quantize

KINDS = ("float32", "float16", "bfloat16", "q8", "q4")
GROUP_SIZE = 64  # of the quantized kinds (--group-size)
GEMV_SHAPES = ((4096, 4096), (11008, 4096))  # (n, k): a square and a gate-like matrix
DOWN_SHAPE = (11008, 4096)  # neuron rows of a down projection
GEMM_SHAPE = (4096, 4096)
GEMM_BYTES = 256 << 20  # 16-bit weights per prefill pass: past the L3 (T >= 16 is
# compute-bound enough that a larger set changes nothing)


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    names = [
        line.split(":", 1)[1].strip()
        for line in lscpu.splitlines()
        if "Model name" in line
    ]
    blas = [
        {key: info.get(key) for key in ("internal_api", "version", "architecture")}
        for info in threadpool_info()
        if info.get("user_api") == "blas"
    ]
    return {
        "cpu": names[0] if names else platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "blas": blas,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def take_turns(runs: dict, reps: int) -> dict[str, list[float]]:
    """Seconds per matrix of `reps` passes of each run, label -> (op, x, matrices),
    each pass calling op(x, w) for every w; the runs take turns within a pass."""
    for op, x, matrices in runs.values():
        op(x, matrices[0])  # compile, allocate buffers
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(reps):
        for label, (op, x, matrices) in runs.items():
            started = time.perf_counter()
            for w in matrices:
                op(x, w)
            times[label].append((time.perf_counter() - started) / len(matrices))
    return times


def stored(base: np.ndarray, kind: str):
    if kind in QUANTIZED_DTYPES:
        bits = QUANTIZED_DTYPES[kind]
        return Quantized(*quantize(base, bits, GROUP_SIZE), bits, GROUP_SIZE)
    if kind == "bfloat16":
        return (base.view(np.uint32) >> 16).astype(np.uint16)
    return base.astype(kind)


def copied(w):
    if isinstance(w, Quantized):
        arrays = (w.packed.copy(), w.scales.copy(), w.biases.copy())
        return Quantized(*arrays, w.bits, w.group_size)
    return w.copy()


def matrix_sets(base: np.ndarray, kinds, set_bytes: float = 0, count: int = 0) -> dict:
    """kind -> distinct copies of `base` in that kind: `count` of them, or about
    set_bytes in all (at least 2)."""
    sets = {}
    for kind in kinds:
        first = stored(base, kind)
        many = count or max(2, round(set_bytes / first.nbytes))
        sets[kind] = [first] + [copied(first) for _ in range(many - 1)]
    return sets


def matmul_t_for(kind: str):
    """The kernel computing x @ w.T for weights of this kind."""
    return kernels.qmatmul_t if kind in QUANTIZED_DTYPES else kernels.matmul_t


def matmul_for(kind: str):
    """The kernel computing x @ w (skipping zeros of x) for weights of this kind."""
    return kernels.qmatmul if kind in QUANTIZED_DTYPES else kernels.matmul


def sparse_x(rng, t: int, n: int, nonzero: float) -> np.ndarray:
    x = np.abs(rng.standard_normal((t, n))).astype(np.float32)
    x[rng.random((t, n)) >= nonzero] = 0
    return x


def record(rows: list, times: list[float], **fields) -> dict:
    fields["best_ms"] = 1e3 * min(times)
    fields["median_ms"] = 1e3 * float(np.median(times))
    rows.append(fields)
    extra = " ".join(
        f"{key}={fields[key]:.3g}"
        for key in ("gbs", "of_bandwidth", "tokens_s", "vs_float32")
        if key in fields
    )
    print(
        f"  {fields['op']:<11} {str(fields['shape']):<13} T={fields['T']:<4} "
        f"nz={fields.get('nonzero', 1.0):<5} {fields['kind']:<14} "
        f"best {fields['best_ms']:8.3f} ms  median {fields['median_ms']:8.3f} ms",
        extra,
        flush=True,
    )
    return fields


@njit(nogil=True, fastmath={"reassoc"})
def _sum_range(a, lo, hi):
    part = a[lo:hi]  # a slice: indices known >= 0, so the loop vectorizes
    total = np.float32(0)
    for i in range(part.size):
        total += part[i]
    return total


def _stream(threads: int, a: np.ndarray, _unused=None) -> float:
    """Sum of a, read once by `threads` threads side by side (one slice each)."""
    bounds = [len(a) * p // threads for p in range(threads + 1)]
    with ThreadPoolExecutor(threads) as pool:
        parts = [pool.submit(_sum_range, a, lo, hi) for lo, hi in pairwise(bounds)]
        return float(sum(part.result() for part in parts))


def bench_gemv(rows, rng, threads, set_bytes, reps, kinds) -> float:
    """GEMV of each kind, taking turns with a streaming read of 1 GiB by as many
    threads (a compiled sum: no BLAS threads left spinning beside the kernels), so
    that the share of the bandwidth compares passes of the same moments. Returns the
    bandwidth (GB/s, best pass)."""
    stream = np.ones(1 << 28, np.float32)
    bandwidth = 0.0
    for n, k in GEMV_SHAPES:
        base = rng.standard_normal((n, k)).astype(np.float32)
        sets = matrix_sets(base, kinds, set_bytes)
        x = rng.standard_normal((1, k)).astype(np.float32)
        runs = {"bandwidth": (partial(_stream, threads), stream, [None])}
        runs.update({kind: (matmul_t_for(kind), x, sets[kind]) for kind in kinds})
        times = take_turns(runs, reps)
        streamed = stream.nbytes / min(times.pop("bandwidth")) / 1e9
        bandwidth = max(bandwidth, streamed)
        print(f"  memory bandwidth {streamed:.1f} GB/s ({load()})")
        for kind, kind_times in times.items():
            gbs = sets[kind][0].nbytes / min(kind_times) / 1e9
            record(
                rows,
                kind_times,
                op="gemv",
                shape=(n, k),
                T=1,
                kind=kind,
                threads=threads,
                gbs=gbs,
                bandwidth_gbs=streamed,
                of_bandwidth=gbs / streamed,
            )
        del sets, runs
    return bandwidth


def bench_sparse(rows, rng, threads, set_bytes, reps, kinds) -> None:
    n, k = DOWN_SHAPE
    base = rng.standard_normal((n, k)).astype(np.float32)
    sets = matrix_sets(base, set(kinds) | {"float32"}, set_bytes)
    for nonzero in (1.0, 0.1, 0.03):
        x = sparse_x(rng, 1, n, nonzero)
        runs = {"float32 numpy": (np.matmul, x, sets["float32"])}
        runs.update({kind: (matmul_for(kind), x, sets[kind]) for kind in kinds})
        times = take_turns(runs, reps)
        dense = min(times["float32 numpy"])
        for kind, kind_times in times.items():
            read = sets[kind.split()[0]][0].nbytes * np.count_nonzero(x) / n
            record(
                rows,
                kind_times,
                op="x@w",
                shape=(n, k),
                T=1,
                nonzero=nonzero,
                kind=kind,
                threads=threads,
                gbs=read / min(kind_times) / 1e9,
                vs_float32=dense / min(kind_times),
            )


def bench_gemm(rows, rng, threads, reps, kinds) -> None:
    """Prefill: x @ w.T over square matrices and x @ w over neuron rows (dense x),
    tokens/s against NumPy's float32 BLAS."""
    for op, function, numpy_op, (n, k) in (
        ("gemm x@w.T", matmul_t_for, _numpy_matmul_t, GEMM_SHAPE),
        ("gemm x@w", matmul_for, np.matmul, DOWN_SHAPE),
    ):
        base = rng.standard_normal((n, k)).astype(np.float32)
        count = max(2, GEMM_BYTES // (2 * n * k))
        sets = matrix_sets(base, set(kinds) | {"float32"}, count=count)
        for t in (16, 128, 512):
            x = rng.standard_normal((t, n if function is matmul_for else k))
            x = x.astype(np.float32)
            runs = {"float32 numpy": (numpy_op, x, sets["float32"])}
            runs.update({kind: (function(kind), x, sets[kind]) for kind in kinds})
            times = take_turns(runs, reps)
            reference = min(times["float32 numpy"])
            for kind, kind_times in times.items():
                record(
                    rows,
                    kind_times,
                    op=op,
                    shape=(n, k),
                    T=t,
                    kind=kind,
                    threads=threads,
                    tokens_s=t / min(kind_times),
                    vs_float32=reference / min(kind_times),
                )
        del sets


def _numpy_matmul_t(x, w):
    return x @ w.T


_THRESHOLDS = (
    "DOT_ROWS_MAX_T",
    "SUM_ROWS_MAX_TERMS",
    "QDOT_ROWS_MAX_T",
    "QSUM_ROWS_MAX_TERMS",
)


def _on_path(function, path: str):
    """function(x, w) with the compiled loops ("loops") or widen-then-BLAS ("blas")
    at every T."""

    def run(x, w):
        saved = {name: getattr(kernels, name) for name in _THRESHOLDS}
        limit = 1 << 30 if path == "loops" else 0
        for name in _THRESHOLDS:
            setattr(kernels, name, limit)
        try:
            return function(x, w)
        finally:
            for name, value in saved.items():
                setattr(kernels, name, value)

    return run


def _with_block(megabytes: float):
    def run(x, w):
        saved = _dispatch.BLOCK_BYTES
        _dispatch.BLOCK_BYTES = int(megabytes * (1 << 20))
        try:
            return kernels.matmul_t(x, w)
        finally:
            _dispatch.BLOCK_BYTES = saved

    return run


def bench_sweep(rows, rng, threads, set_bytes, reps, quantized: bool) -> None:
    """Both paths of x @ w.T and x @ w (dense x) over T, then the BLAS path's block
    size (16-bit kinds; with `quantized`, the paths of q8 and q4 only)."""
    n, k = GEMM_SHAPE
    base = rng.standard_normal((n, k)).astype(np.float32)
    for kind in ("q8", "q4") if quantized else ("float16", "bfloat16"):
        matrices = matrix_sets(base, [kind], set_bytes / 2)[kind]
        for t in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
            x = rng.standard_normal((t, k)).astype(np.float32)
            runs = {
                f"{name} {path}": (_on_path(function(kind), path), x, matrices)
                for name, function in (("x@w.T", matmul_t_for), ("x@w", matmul_for))
                for path in ("loops", "blas")
            }
            for label, times in take_turns(runs, reps).items():
                record(
                    rows,
                    times,
                    op=label,
                    shape=(n, k),
                    T=t,
                    kind=kind,
                    threads=threads,
                    tokens_s=t / min(times),
                )
        if quantized:
            continue
        for t in (16, 128, 512):
            x = rng.standard_normal((t, k)).astype(np.float32)
            runs = {
                f"block {mb}MB": (_with_block(mb), x, matrices[:8])
                for mb in (0.5, 1, 2, 4, 8)
            }
            for label, times in take_turns(runs, reps).items():
                record(
                    rows,
                    times,
                    op=label,
                    shape=(n, k),
                    T=t,
                    kind=kind,
                    threads=threads,
                    tokens_s=t / min(times),
                )
        del matrices


def summary(rows: list, bandwidth: dict) -> list[str]:
    """The targets, one line each: GEMV share of the bandwidth for 2-byte weights,
    prefill throughput relative to float32 BLAS, quantized GEMV speed per matrix
    against float16's."""
    lines = []
    for threads, bw in bandwidth.items():
        mine = [r for r in rows if r["threads"] == threads]
        gemv = [r for r in mine if r["op"] == "gemv" and r["kind"] in KINDS[1:3]]
        gemm = [
            r for r in mine if r["op"].startswith("gemm") and r["kind"] in KINDS[1:3]
        ]
        if gemv:
            worst = min(gemv, key=lambda r: r["of_bandwidth"])
            lines.append(
                f"threads={threads}: GEMV 2-byte weights at >= "
                f"{100 * worst['of_bandwidth']:.0f}% of the bandwidth measured in turn "
                f"(target 70%; best stream {bw:.1f} GB/s; lowest: {worst['kind']} "
                f"{worst['shape']})"
            )
        if gemm:
            worst = min(gemm, key=lambda r: r["vs_float32"])
            lines.append(
                f"threads={threads}: prefill 16-bit at >= "
                f"{100 * worst['vs_float32']:.0f}% of float32 BLAS tokens/s (target "
                f"80%; lowest: {worst['op']} {worst['kind']} T={worst['T']})"
            )
        for kind, target in (("q4", 2.0), ("q8", 1.5)):
            for shape in GEMV_SHAPES:
                found = {
                    r["kind"]: r["best_ms"]
                    for r in mine
                    if r["op"] == "gemv" and r["shape"] == shape
                }
                if kind in found and "float16" in found:
                    lines.append(
                        f"threads={threads}: GEMV {kind} {shape} "
                        f"{found[kind]:.3f} ms, {found['float16'] / found[kind]:.2f}x "
                        f"float16's {found['float16']:.3f} ms (target {target}x)"
                    )
    return lines


def main() -> None:
    global GROUP_SIZE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--set-gb", type=float, default=1.0)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--group-size", type=int, default=GROUP_SIZE)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--quantized", action="store_true", help="sweep q8 and q4")
    parser.add_argument("--out")
    opts = parser.parse_args()
    GROUP_SIZE = opts.group_size
    info = machine()
    info["group_size"] = GROUP_SIZE
    info["load_before"] = load()
    print(json.dumps(info, indent=1))
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    bandwidth = {}
    set_bytes = opts.set_gb * 1e9
    for threads in opts.threads:
        kernels.set_threads(threads)
        print(f"threads={threads}: ({load()})")
        if opts.sweep:
            with threadpool_limits(threads, user_api="blas"):
                bench_sweep(rows, rng, threads, set_bytes, opts.reps, opts.quantized)
            continue
        # Decode as in flash mode: BLAS on one thread. OpenBLAS's idle threads spin
        # for a while after each call and take the core from the kernels' workers
        # (x @ w at T=4 on 2 threads: 16.9 ms beside 2 BLAS threads, 9.2 ms beside 1).
        with threadpool_limits(1, user_api="blas"):
            bandwidth[threads] = bench_gemv(
                rows, rng, threads, set_bytes, opts.reps, opts.kinds
            )
            bench_sparse(rows, rng, threads, set_bytes, opts.reps, opts.kinds)
        with threadpool_limits(threads, user_api="blas"):
            bench_gemm(rows, rng, threads, opts.reps, opts.kinds)
    info["load_after"] = load()
    lines = summary(rows, bandwidth)
    print("\n".join(lines + [info["load_after"]]))
    if opts.out:
        result = {"machine": info, "bandwidth_gbs": bandwidth, "summary": lines}
        with open(opts.out, "w") as f:
            json.dump(result | {"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
