"""One benchmark configuration, measured inside its own (memory-limited) process.

    python -m mlx_flashinfer.bench.worker SPEC.json RESULT.json

The model is built for the spec (flash FFN, dense, mmap paging or layer streaming),
the prompt runs as one prefill, then every target token is fed as one decode step
(teacher-forced: every configuration decodes the same sequence whatever it predicts)
and timed from the call to the evaluated logits.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from ..formats.layout import Layout
from ..loader import tune_for_machine
from ..model.backends import get_backend
from ..model.transformer import DenseFFN, Model, prepare_weights
from ..predictors.kinds import make_predictor
from .baselines import MmapFFN, StreamFFN
from .cgroup import evict
from .configs import RunSpec, flash_plan, streamed_plan


class EvaluatedFFN:
    """An FFN whose output is evaluated before the next layer runs.

    MLX is lazy: without this, every bundle row a flash layer streams for a token
    (the scratch reads and cache writes) stays referenced by the graph until the
    token's logits are evaluated, and a prompt's cache writes until the first decoded
    token. Measured on SmolLM2 at a 269 MB budget, naive (every neuron read): 705 MB
    peak RSS against 331 MB on NumPy. The baselines evaluate each chunk themselves;
    NumPy is eager, so this only matters for MLX.
    """

    def __init__(self, ffn, backend):
        self.ffn = ffn
        self.backend = backend

    def __call__(self, layer: int, h):
        out = self.ffn(layer, h)
        self.backend.synchronize([out, *self.ffn.caches[layer]])
        return out

    def new_sequence(self) -> None:
        self.ffn.new_sequence()

    def begin_token(self) -> None:
        self.ffn.begin_token()

    def end_token(self, logits, prompt_tokens: int) -> None:
        self.ffn.end_token(logits, prompt_tokens)

    def io_stats(self) -> dict:
        return self.ffn.io_stats()

    def held_bytes(self) -> dict:
        return self.ffn.held_bytes()


def build_model(spec: RunSpec) -> tuple[Model, dict]:
    """The model a spec describes, and facts about its setup for the report.

    Raises:
        ValueError, FileNotFoundError: a bad layout, budget or predictor.
    """
    B = get_backend(spec.backend)
    # Every row computes on one BLAS thread, as the flash runtime does to leave the
    # cores to its readers: on this shared 2-core machine two BLAS threads made the
    # dense rows 7x slower whenever another process held a core (measured, OPT-125m).
    B.limit_compute_threads(1)
    layout = Layout.open(spec.layout)
    tune_for_machine(B, layout)  # the kernels' paths as `load` runs them here
    weights = prepare_weights(B, layout.iter_resident(stored=True))
    args, info = layout.args, {"arrangement": layout.arrangement}
    # the mapping keeps what it paged in; everything else read through the page
    # cache while loading is not the run's to keep
    loaded = [layout.resident_path] + [layout.ffn_path] * (spec.kind != "mmap")
    if spec.kind == "dense":
        ffn = DenseFFN(B, layout, weights)
    elif spec.kind == "mmap":
        ffn = MmapFFN(B, layout, weights, spec.chunk_bytes)
        info["io_source"] = ffn.io_source
    elif spec.kind == "stream":
        ffn = StreamFFN(B, layout, weights, spec.chunk_bytes)
        info["io_source"] = ffn.io_source
    elif spec.kind == "streamed":
        from ..flash.streamed import StreamedFFN

        plan = streamed_plan(spec, layout)
        ffn = StreamedFFN(B, layout, weights, plan, spec.threads)
        info.update(
            plan=dict(plan.rows(args.intermediate_size)),
            capacity=plan.capacity[0],
            neurons=args.intermediate_size,
            reader_mode=ffn.mode,
            kv_cache=plan.kv_cache,
            threads=ffn.reader.threads,
            io_source="FlashReader counters (O_DIRECT spans into the ring)",
        )
        if B.name == "mlx":
            ffn = EvaluatedFFN(ffn, B)
    else:
        from ..flash.ffn import FlashFFN

        source = Layout.open(spec.predictor_layout or spec.layout)
        loaded.append(source.ffn_path)  # the gate predictor reads its rows from there
        plan = flash_plan(spec, layout, source)
        predictor = make_predictor(spec.predictor, B, source, weights)
        ffn = FlashFFN(
            B,
            layout,
            weights,
            plan,
            predictor,
            spec.window,
            spec.threads,
            read_gap=spec.read_gap,
        )
        if spec.rows_in_dram:  # the compute-only row: the same reads, from memory
            from .in_memory import InMemoryReader

            old = ffn.reader
            ffn.reader = InMemoryReader(
                layout.ffn_path,
                layout.layers,
                layout.bundle_bytes,
                threads=old.threads,
                parts=old.parts,
                fields=layout.field_bytes,
                separate=old.regions > 1,
                staging_bytes=old.staging_bytes,
            )
            old.close()
        reader = ffn.reader
        if B.name == "mlx":
            ffn = EvaluatedFFN(ffn, B)
            info["evaluated_per_layer"] = True
        info.update(
            plan=dict(plan.rows(args.intermediate_size)),
            capacity=plan.capacity[0],
            scratch_rows=plan.scratch_rows,
            neurons=args.intermediate_size,
            reader_mode=reader.mode,
            kv_cache=plan.kv_cache,
            landing=ffn.io_stats().get("landing"),
            threads=reader.threads,
            io_source="FlashReader counters (O_DIRECT / F_NOCACHE reads)",
        )
    evict(loaded, drop_all=False)
    return Model(args, B, weights, ffn, spec.max_context), info


def max_rss() -> int:
    """This process's peak resident set, bytes: Linux's VmHWM, which starts anew
    with the program (ru_maxrss would carry the launching process's peak across
    fork and exec: 300 MB here); ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes / KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def warm_up(B) -> None:
    """Products on tiny arrays of every held dtype, so the libraries have set up
    what they keep for good (BLAS buffers, compiled kernels) before the process's
    base is measured."""
    x = B.array(np.ones((2, 8)))
    for values in (np.ones((8, 8), np.float32), np.ones((8, 8), np.float16)):
        for w in (B.weight(values), B.columns_weight(B.weight(values))):
            B.synchronize(B.linear(x, w))
    B.synchronize(B.linear(x, B.weight(np.ones((8, 8), np.uint16))))  # bfloat16


def run_spec(spec: RunSpec) -> dict:
    """Build, prefill, decode; the counters and timings of the decoded tokens."""
    warm_up(get_backend(spec.backend))
    base_rss = max_rss()  # Python and the libraries, before any weight
    began = time.perf_counter()
    model, info = build_model(spec)
    B = model.backend
    load_s = time.perf_counter() - began
    cache = model.make_cache()
    started = time.perf_counter()
    logits = model.prefill(list(spec.prompt), cache)
    B.synchronize(logits)
    prefill_s = time.perf_counter() - started
    seconds, argmax = [], []
    for token in spec.targets:
        started = time.perf_counter()
        logits = model([int(token)], cache)
        B.synchronize(logits)
        seconds.append(time.perf_counter() - started)
        argmax.append(int(np.argmax(B.to_numpy(logits)[-1])))
    stats = model.io_stats()
    return {
        "row": spec.row,
        "backend": spec.backend,
        "setup": info,
        "load_s": load_s,
        "prefill_s": prefill_s,
        "token_s": seconds,
        "argmax": argmax,
        "decode": stats.get("decode"),
        "prefill": stats.get("prefill"),
        "max_rss": max_rss(),
        "base_rss": base_rss,
        "held": model.held_bytes(),
    }


def main(argv: list[str] | None = None) -> int:
    spec_file, out_file = (argv or sys.argv[1:])[:2]
    spec = RunSpec.from_dict(json.loads(Path(spec_file).read_text()))
    result = run_spec(spec)
    tmp = f"{out_file}.tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, out_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
