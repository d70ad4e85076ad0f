"""The machine probe's compute cells (`machine.probe_machine`): the products a token
runs, per stored dtype, on one thread and on all, over weights from memory and from
the CPU's caches, at a decode step's one token and at prompt lengths (on both sides
of the backend's step from one kernel to another, whose place is measured here
too: `product_limits`); float16's at narrow and wide matrices; a layer's small
operations on a token and on a prompt, and an FFN call's fixed cost.
"""

from __future__ import annotations

import time

import numpy as np

from ..formats.args import ModelArgs
from ..formats.quantize import QUANTIZED_DTYPES, Quantized
from ..formats.shapes import expected_shapes
from ..model.backends import get_backend
from ..model.transformer import Model, UncountedFFN, ffn_forward, prepare_weights

DTYPES = ("float16", "bfloat16", "float32", "q4", "q8")
COLUMNS = "columns"  # gemv["float16 columns"]: the down product's rates
SIDE = 2048  # GEMV matrices of SIDE x SIDE (8 MB at float16)
# Matrices cycled: 1 GiB in all reads from memory on any CPU here (the Xeon's L3 is
# 480 MiB), 32 MiB stays in most caches: a small model's decode step reads at the
# second rate, a large one's at the first
MEMORY_BYTES = 1 << 30
CACHED_BYTES = 32 << 20
# the GEMM rates: a prompt's product at these lengths (8 over weights from memory:
# NumPy float16 here 6.3-6.9 GB/s, 8.9 over cached ones; the longer over cached
# ones, compute-bound either way: at 64 1.71 and 1.72), and NumPy's products gain
# with length past 64 (1.8, 1.3, 0.85 GB/s at 64, 128, 256): a rate at each. NumPy's
# kernels also step from loops to BLAS past a length (`product_limits`; float16 7.4
# GB/s at 8, 2.6 at 9 with the shipped limit of 8), measured on both sides of it
# too: no curve between the lengths above has the step
PROMPT_TOKENS = (8, 64, 256)
# Narrow matrices (a small model's: rows of d_model 576, say) multiply slower per
# byte than SIDE-wide ones (8.5 against 10.4 GB/s here, one thread): the rate at
# NARROW columns is kept too, and costs.gemv_rate goes between them by the width
NARROW = 512
# ...and wide ones faster (OPT-6.7B's 4096 columns 11.2, 16384 columns 15.2 GB/s
# here): the rate at WIDE columns is kept as well
WIDE = 8192
# a prompt's small operations per layer, run at once: far below `tokens` x a decode
# step's (NumPy here: 0.10 ms a layer at 1 token, 0.37 at 64, 3.4 at 256; MLX's CPU
# 0.77, 1.8, 11), attention's T x T scores growing past 64
PROMPT_LAYER_TOKENS = (64, 256)


def measure_compute(backend: str, progress: bool = True) -> dict:
    """A Machine's compute fields (gemv, gemm, product_limits, layer_s,
    layer_prompt_s, ffn_call_s), measured with the kernel path limits found here
    first (the process's own are put back after: `load` sets them where a model
    runs)."""
    from tqdm import tqdm

    B = get_backend(backend)
    limits = product_limits(backend)  # before the rates: they run with them
    previous = B.tune_products(limits)
    try:
        # narrow and wide models' rows (costs.gemv_rate), measured first: after the
        # other products' gigabytes come and go, fewer huge pages are left and the
        # wide rate fell from 12-13 to 9.1-9.5 GB/s here (float16's own: 10.1
        # either way)
        widths = width_rates(backend)
        rates = {}
        for dtype in tqdm(DTYPES, desc="compute", unit="dtype", disable=not progress):
            rates.update(product_rates(backend, dtype))
        if "float16" in rates:
            rates["float16"].update(widths)
        return {
            "gemv": {
                d: {k: v for k, v in r.items() if not k.startswith("prompt")}
                for d, r in rates.items()
            },
            "gemm": {
                d: {k.removeprefix("prompt "): v for k, v in r.items() if "prompt" in k}
                for d, r in rates.items()
            },
            "layer_s": layer_overhead(backend),
            "product_limits": limits,
            "layer_prompt_s": {
                str(t): prompt_layer_overhead(backend, t) for t in PROMPT_LAYER_TOKENS
            },
            "ffn_call_s": ffn_call_overhead(backend),
        }
    finally:
        B.tune_products(previous)


def stored_matrices(dtype: str, nbytes: int, rng) -> list:
    """Random SIDE x SIDE matrices as a layout of `dtype` stores them, `nbytes` in
    all: normal values from random bits (a real quantization of a gigabyte would
    take longer than the whole probe)."""
    if dtype in QUANTIZED_DTYPES:
        bits = QUANTIZED_DTYPES[dtype]
        words, groups = SIDE * bits // 32, SIDE // 64
        one = SIDE * (words * 4 + 2 * groups * 2)
        return [
            Quantized(
                rng.integers(0, 2**32, (SIDE, words), dtype=np.uint32),
                _finite_half(rng, (SIDE, groups)),
                _finite_half(rng, (SIDE, groups)),
                bits,
                64,
            )
            for _ in range(max(1, nbytes // one))
        ]
    # Sign and mantissa random, the exponent fixed near 2**-7: normal numbers only
    # (subnormal products run 10-100x slower on x86 and would measure that instead)
    if dtype == "float32":
        size = SIDE * SIDE * 4
        return [
            _random_bits(rng, np.uint32, 0x807FFFFF, 0x3C000000).view(np.float32)
            for _ in range(max(1, nbytes // size))
        ]
    count = max(1, nbytes // (2 * SIDE * SIDE))
    if dtype == "bfloat16":  # travels as its uint16 bits
        return [_random_bits(rng, np.uint16, 0x807F, 0x3C00) for _ in range(count)]
    return [_finite_half(rng, (SIDE, SIDE)) for _ in range(count)]


def _random_bits(rng, dtype, keep: int, fixed: int) -> np.ndarray:
    """A SIDE x SIDE array of random bits: those of `keep` random, `fixed` set."""
    bits = rng.integers(0, np.iinfo(dtype).max, (SIDE, SIDE), dtype=dtype)
    return (bits & dtype(keep)) | dtype(fixed)


def _finite_half(rng, shape) -> np.ndarray:
    """Random normal float16 values near 2**-7 (scales, biases, float16 weights)."""
    bits = rng.integers(0, 2**16, shape, dtype=np.uint16)
    return ((bits & np.uint16(0x83FF)) | np.uint16(0x2000)).view(np.float16)


def product_rates(backend, dtype: str, seconds: float = 0.25) -> dict:
    """Weight bytes per second of x @ W.T over matrices of `dtype`: one token on one
    thread and on all, with the matrices in the CPU's caches (CACHED_BYTES in all)
    and from memory (MEMORY_BYTES); prompts of PROMPT_TOKENS tokens and on both
    sides of the backend's step (`path_limit`) on all threads ("prompt 8", "prompt
    64", ...). Each cell runs `seconds`.

    Returns {dtype: rates, f"{dtype} columns": rates}: the second of x @ W, the
    FFN's down product over neuron columns (`columns_weight`, a view of the same
    matrices), which some backends run far slower (MLX's CPU float16: 0.35 against
    1.0 GB/s here; NumPy's at 8 tokens: 2.9 against 7.0)."""
    B = get_backend(backend)
    rng = np.random.default_rng(0)
    rates = {dtype: {}, f"{dtype} {COLUMNS}": {}}
    step = B.path_limit(dtype)
    lengths = sorted(set(PROMPT_TOKENS) | ({step, step + 1} if step else set()))
    prompt = tuple((f"prompt {t}", t, None) for t in lengths)
    # one thread's prompt, where a limit reaches the backend's threads: products
    # over many tokens are compute-bound, so one of two cores runs them at 0.57-0.77
    # of both here (NumPy), where a decode step's runs at 0.9-1.1
    one = (("prompt 64 on 1", 64, 1),) if B.name != "mlx" else ()
    for size, cells in (
        (MEMORY_BYTES, (("1", 1, 1), ("all", 1, None), *prompt[:1])),
        (
            CACHED_BYTES,
            (("1 cached", 1, 1), ("all cached", 1, None), *prompt[1:], *one),
        ),
    ):
        rows = [B.weight(w) for w in stored_matrices(dtype, size, rng)]
        columns = [B.columns_weight(w) for w in rows]
        cursor = 0
        for weights, measured in zip((rows, columns), rates.values(), strict=True):
            for cell, tokens, threads in cells:
                B.limit_compute_threads(threads)
                x = B.array(rng.standard_normal((tokens, SIDE)).astype(np.float32))
                measured[cell], cursor = _rate(B, x, weights, seconds, cursor)
        del rows, columns
    B.limit_compute_threads(None)
    return rates


# Products over these many tokens are tried both ways for the kernels' path limits
LIMIT_TOKENS = (8, 12, 16, 24, 32, 48)
LIMIT_MARGIN = 1.1  # the loops by this much, or BLAS stays


def product_limits(backend, seconds: float = 0.15) -> dict[str, int]:
    """The NumPy kernels' path limits on this machine, on all threads: the most
    tokens, of LIMIT_TOKENS, up to which a product of float16 (DOT_ROWS_MAX_T) and
    of q4 rows (QDOT_ROWS_MAX_T) runs LIMIT_MARGIN faster through the compiled
    loops than through BLAS ({} for MLX, which chooses its own). Here (Intel Xeon,
    2 threads) the loops win by 2-2.5x at 9-12 tokens, where the defaults, chosen on
    an AMD EPYC (8), sent them to BLAS; past 12 the two are close, and how close
    varies between runs (BLAS's threads spin for a while after a call)."""
    B = get_backend(backend)
    shipped = B.tune_products({})  # the limits as they are, unchanged
    if not shipped:  # MLX: none
        return {}
    rng = np.random.default_rng(3)
    limits = {}
    for name, dtype in (("DOT_ROWS_MAX_T", "float16"), ("QDOT_ROWS_MAX_T", "q4")):
        weights = [B.weight(w) for w in stored_matrices(dtype, CACHED_BYTES, rng)]
        best = LIMIT_TOKENS[0]
        try:
            for tokens in LIMIT_TOKENS[1:]:
                x = B.array(rng.standard_normal((tokens, SIDE)).astype(np.float32))
                rates = []
                for limit in (tokens, tokens - 1):  # the loops, then BLAS
                    B.tune_products({name: limit})
                    rates.append(_rate(B, x, weights, seconds)[0])
                if rates[0] < LIMIT_MARGIN * rates[1]:
                    break
                best = tokens
        finally:
            B.tune_products(shipped)
        limits[name] = best
    return limits


def width_rates(backend) -> dict[str, float]:
    """float16's decode rate, one thread, at NARROW and WIDE columns ("1 narrow",
    "1 wide"; `costs.gemv_rate` goes between them by a model's width)."""
    return {
        "1 narrow": width_rate(backend, NARROW, 3 * NARROW),
        "1 wide": width_rate(backend, WIDE, 1024, MEMORY_BYTES),
    }


def width_rate(
    backend,
    width: int,
    rows: int,
    nbytes: int = MEMORY_BYTES // 4,
    seconds: float = 0.25,
) -> float:
    """Weight bytes per second of one token's x @ W.T on one thread over float16
    matrices `width` wide (`rows` rows each), `nbytes` in all (from memory)."""
    B = get_backend(backend)
    rng = np.random.default_rng(2)
    one = rows * width * 2
    weights = [
        B.weight(_finite_half(rng, (rows, width))) for _ in range(max(1, nbytes // one))
    ]
    x = B.array(rng.standard_normal((1, width)).astype(np.float32))
    B.limit_compute_threads(1)
    try:
        return _rate(B, x, weights, seconds)[0]
    finally:
        B.limit_compute_threads(None)


def _rate(B, x, weights: list, seconds: float, cursor: int = 0) -> tuple[float, int]:
    """Weight bytes per second of x @ W.T over the matrices of `weights` in turn
    from index `cursor` (going round), for `seconds` after one product to warm up
    (one that takes `seconds` is measure enough); and the index to go on from. A
    set larger than the CPU's caches is read from memory as long as each cell goes
    on where the last stopped: the next matrices are those touched longest ago.
    (Cells once made two whole passes over the set: MLX's probe took 112 s here,
    0.01-1 GB/s over a GiB.)"""
    count = len(weights)
    began = time.perf_counter()
    w = weights[cursor % count]
    B.synchronize(B.linear(x, w))
    elapsed = time.perf_counter() - began
    if elapsed >= seconds:  # (MLX's CPU at 256 tokens: 0.5 s a product here)
        return int(w.nbytes) / elapsed, (cursor + 1) % count
    cursor, nbytes, began = cursor + 1, 0, time.perf_counter()
    while True:
        w = weights[cursor % count]
        B.synchronize(B.linear(x, w))
        cursor, nbytes = cursor + 1, nbytes + int(w.nbytes)
        elapsed = time.perf_counter() - began
        if elapsed >= seconds:
            return nbytes / elapsed, cursor % count


def layer_overhead(backend, layers: int = 8, tokens: int = 32) -> float:
    """Seconds a decode step spends per layer outside its big products: a model of
    small matrices whose FFN adds nothing, timed token by token."""
    B = get_backend(backend)
    model = _small_ops_model(B, layers, tokens + 8)
    cache = model.make_cache()
    B.synchronize(model([1], cache))
    began = time.perf_counter()
    for t in range(tokens):
        B.synchronize(model([t % 64], cache))
    return (time.perf_counter() - began) / tokens / layers


def prompt_layer_overhead(backend, tokens: int, layers: int = 8, runs: int = 3):
    """Seconds a prompt of `tokens` tokens, run at once, spends per layer outside
    its big products (the least of `runs`, after one to warm up)."""
    B = get_backend(backend)
    model = _small_ops_model(B, layers, tokens)
    ids = [t % 64 for t in range(tokens)]
    best = float("inf")
    for run in range(runs + 1):
        cache = model.make_cache()
        began = time.perf_counter()
        B.synchronize(model(ids, cache, last_only=True))
        if run:
            best = min(best, time.perf_counter() - began)
    return best / layers


def _tiny_args(layers: int, context: int) -> ModelArgs:
    """A Llama of 64-wide matrices: what a call costs it is its fixed work."""
    return ModelArgs(
        family="llama",
        hidden_size=64,
        num_hidden_layers=layers,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        max_position_embeddings=context,
    )


def _small_ops_model(B, layers: int, context: int) -> Model:
    """A model of 64-wide matrices whose FFN adds nothing: what a token costs it
    is a layer's small operations (norms, RoPE, attention, the calls)."""
    args = _tiny_args(layers, context)
    rng = np.random.default_rng(0)
    shapes = {
        name: shape
        for name, shape in expected_shapes(args).items()
        if ".mlp." not in name
    }
    values = {
        name: rng.standard_normal(shape).astype(
            np.float32 if len(shape) == 1 else np.float16
        )
        for name, shape in shapes.items()
    }

    class NoFFN(UncountedFFN):
        def __init__(self):
            self.backend = B

        def __call__(self, layer, h):
            return B.zeros((h.shape[0], args.hidden_size))

    return Model(args, B, prepare_weights(B, values), NoFFN(), context)


def ffn_call_overhead(backend, calls: int = 200) -> float:
    """Seconds of one FFN call (`ffn_forward`: gate and up, the activation, down) on
    one token over 64 neurons of 64 wide: its fixed cost, which a small model's
    decode step pays once a layer (dense) or once a read (sparse, through scratch)."""
    B = get_backend(backend)
    args = _tiny_args(layers=1, context=64)
    rng = np.random.default_rng(0)
    gate, up, down = (
        B.weight(rng.standard_normal((64, 64)).astype(np.float16)) for _ in range(3)
    )
    parts = [B.rows_weight(gate), B.rows_weight(up), B.columns_weight(down)]
    h = B.array(rng.standard_normal((1, 64)).astype(np.float32))
    B.synchronize(ffn_forward(B, args, h, parts))
    began = time.perf_counter()
    for _ in range(calls):
        B.synchronize(ffn_forward(B, args, h, parts))
    return (time.perf_counter() - began) / calls
