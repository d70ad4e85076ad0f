"""Decode speed of a mixture of experts from flash: dense, and the experts placement
at each budget and window, in this process; each row's argmax tokens checked against
dense's (and against OS paging's, dense's sums over the memory-mapped experts, where
dense does not fit in DRAM: `--no-dense --paging`).

    python benchmarks/moe_speed.py --model LAYOUT [--budgets 50% 75%] [--windows 0 4]
        [--backend numpy] [--prompt-tokens 16] [--tokens 32] [--out FILE.json]

A layout from `python tools/synth.py DST --shape moe-small` (or any MoE layout).
Flash reads bypass the page cache (O_DIRECT), so the runs need no cgroup to be
honest about I/O; the dense row holds every expert in DRAM. On a probed machine
(`flashinfer probe`) each row also gets the cost model's prediction
(`plan/expert_costs.py`: `predicted_ms` beside `measured_ms`), from the routing the
layout records (`flashinfer train-predictor`), else taking every expert as equally
popular. `--routing-tokens N` first records the routing of N random tokens, the
benchmark's own kind of stream, in prompts of 256 (written to the layout's
manifest), so that the prediction is of the stream measured.

`--paging` adds OS paging at each budget (NumPy): every expert memory-mapped (the
dense model's experts as views of ffn.bin), run in a child process inside a memory
cgroup limited to the budget + the KV cache + the process's own overhead, after the
page cache is dropped (root; `flashinfer bench`'s cgroup machinery).

`--isolate` runs each experts row in a child process in the same kind of cgroup
(its peak bytes recorded beside the plan's), so that the row's memory is bounded as
the paging row's is; without it the rows run in this process.

`--text FILE` feeds text instead of random token ids: FILE tokenized by the
embedded default model's tokenizer (SmolLM2's BPE, 49152 ids: within every synthetic
shape's vocabulary), the prompt and fed tokens its first ones and `--routing-tokens`
the ones after. Text repeats its tokens as language does (a few common ones make much
of it), and routers route mostly by token (OpenMoE, Xue et al. 2024), so the experts
of a token's recent occurrences come back: a reuse that random ids lack.

`--llama-cpp PYTHON --gguf FILE` adds llama.cpp's rows (llama-cpp-python in the
interpreter PYTHON, run on benchmarks/llama_cpp_decode.py): the GGUF of the same
model (`python tools/synth_gguf.py LAYOUT FILE`) memory-mapped, at each budget
under the paging row's limit, after the page cache is dropped; and, when the file
fits in DRAM, one with no limit (llama.cpp's compute speed). The same prompt and
fed tokens; its argmax ids compared with the dense row's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mlx_flashinfer import Layout, load
from mlx_flashinfer.plan.expert_costs import experts_cost, experts_dense_cost
from mlx_flashinfer.plan.machine import cached_machine


def predicted(layout: Layout, machine, plan=None, window: int = 0) -> dict:
    """The cost model's ms per token for a row (dense without a plan), and its
    terms; {} on a machine not probed."""
    if machine is None:
        return {}
    if plan is None:
        cost = experts_dense_cost(layout, machine)
    else:
        cost = experts_cost(layout, plan, machine, window)
    return {
        "predicted_ms": 1e3 * cost.total_s,
        "predicted_io_ms": 1e3 * cost.io_s,
        "predicted_compute_ms": 1e3 * cost.compute_s,
        "predicted_mb_per_token": cost.bytes_read / 1e6,
        "prediction_note": cost.note,
    }


def decode(model, prompt: list, feed: list) -> tuple[list, float, float, float]:
    """Run `prompt`, then decode the tokens `feed` one at a time (fixed, not sampled:
    a random model's greedy tokens repeat, which no router would see); return the
    argmax after each token, the prompt's seconds, and the seconds and the bytes
    read from storage (`storage_read_bytes`: OS paging's reads) per decoded token."""
    B = model.backend
    cache = model.make_cache()
    began = time.perf_counter()
    logits = model.prefill(prompt, cache)
    ids = [int(np.argmax(B.to_numpy(logits)[-1]))]
    prompt_s = time.perf_counter() - began
    began = time.perf_counter()
    read_before = storage_read_bytes()
    for token in feed:
        logits = model([token], cache)
        ids.append(int(np.argmax(B.to_numpy(logits)[-1])))
    n = max(len(feed), 1)
    read = (storage_read_bytes() - read_before) / n
    return ids, prompt_s, (time.perf_counter() - began) / n, read


def text_tokens(path, count: int, vocab: int) -> list[int]:
    """The first `count` tokens of the text file `path` by the default model's
    tokenizer; ValueError where the text is shorter or an id outside `vocab`."""
    from mlx_flashinfer.formats.tokenizer import load_tokenizer
    from mlx_flashinfer.loader import resolve_model

    tokenizer = load_tokenizer(Layout.open(resolve_model("default", progress=False)))
    ids = tokenizer.encode(Path(path).read_text(), add_special_tokens=False)
    if len(ids) < count:
        raise ValueError(f"{path}: {len(ids)} tokens, {count} needed")
    if max(ids[:count]) >= vocab:
        raise ValueError(f"{path}: token ids past the model's vocabulary of {vocab}")
    return ids[:count]


def storage_read_bytes() -> int:
    """Bytes this process has had read from storage (Linux /proc/self/io: page
    faults' reads and readahead included); 0 where unknown."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
        return int(fields["read_bytes"])
    except (OSError, KeyError, ValueError):
        return 0


def paging_predicted(layout: Layout, machine, budget) -> dict:
    """The cost model's OS-paging estimate (`experts_paging_cost`); {} unprobed."""
    if machine is None:
        return {}
    from mlx_flashinfer.flash.memory import model_bytes, parse_budget
    from mlx_flashinfer.plan.expert_costs import experts_paging_cost

    amount = parse_budget(budget, sum(model_bytes(layout)))
    cost = experts_paging_cost(layout, amount, machine)
    return {
        "predicted_ms": 1e3 * cost.total_s,
        "predicted_mb_per_token": cost.bytes_read / 1e6,
    }


def mapped_parts(layout: Layout, layer: int) -> list:
    """`Layout.read_parts` of a layer as views of a memory map of ffn.bin: the
    experts are read by page faults, through the page cache, as OS paging reads."""
    extent = layout.layers[layer]
    n = extent.neurons
    raw = np.memmap(
        layout.ffn_path,
        np.uint8,
        mode="r",
        offset=extent.offset,
        shape=(n * layout.bundle_bytes,),
    )
    return layout.join_fields(layout.split_fields(raw.reshape(n, -1)))


def paging_child(opts) -> int:
    """The paging row, in its cgroup: dense with mapped experts, multiplied where
    they lie (`weight_view`: no copy into anonymous memory); prints JSON."""
    from mlx_flashinfer.model import moe

    def mapped_init(self, backend, layout, resident):
        self.backend, self.args, self.weights = backend, layout.args, resident
        self.layers = [
            [backend.weight_view(p) for p in mapped_parts(layout, i)]
            for i in range(self.args.num_hidden_layers)
        ]

    moe.DenseExperts.__init__ = mapped_init
    model, _ = load(opts.model, backend=opts.backend)
    prompt, feed = json.loads(sys.stdin.read())
    ids, prompt_s, per_token, read = decode(model, prompt, feed)
    got = {"ids": ids, "prompt_s": prompt_s, "per_token": per_token}
    print(json.dumps({**got, "mb_per_token": read / 1e6}))
    return 0


def paging_limit(opts, layout: Layout, budget, context: int) -> int:
    """The memory limit of a row at `budget`: the budget + the KV cache of `context`
    tokens + the process's own overhead (the largest resident tensor as read, a
    layer's experts as read)."""
    from mlx_flashinfer.bench.configs import BASE_OVERHEAD
    from mlx_flashinfer.flash.memory import model_bytes, parse_budget
    from mlx_flashinfer.formats.safetensors_stream import read_header
    from mlx_flashinfer.model.transformer import kv_cache_bytes

    amount = parse_budget(budget, sum(model_bytes(layout)))
    header, _ = read_header(layout.resident_path)
    largest = max(e - b for b, e in (t["data_offsets"] for t in header.values()))
    overhead = BASE_OVERHEAD.get(opts.backend, BASE_OVERHEAD["mlx"]) + largest
    overhead += layout.args.num_experts * layout.bundle_bytes
    return amount + kv_cache_bytes(layout.args, context) + overhead


def run_limited(command: list[str], limit: int, files: list, job, what: str):
    """Run `command` in a memory cgroup of `limit` bytes after dropping the page
    cache (`files`'s, and all of it), `job` as JSON on its stdin; return its last
    stdout line's JSON and the group's peak bytes."""
    from mlx_flashinfer.bench import cgroup as cgroups

    cgroup = cgroups.find_memory_cgroup()
    if isinstance(cgroup, str):
        raise SystemExit(f"the {what} rows need a memory cgroup: {cgroup}")
    cgroups.evict(files, drop_all=True)
    name = f"moe-{what.replace('.', '-')}-{time.time_ns()}"
    done, peak, _ = cgroups.run_limited(cgroup, name, limit, command, json.dumps(job))
    if done.returncode:
        raise SystemExit(f"the {what} row failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), peak


def paging_row(opts, layout: Layout, budget, prompt, feed) -> dict:
    """Run `paging_child` in a memory cgroup of the budget + KV cache + overhead."""
    limit = paging_limit(opts, layout, budget, len(prompt) + len(feed) + 1)
    command = [sys.executable, __file__, "--model", str(opts.model)]
    command += ["--backend", opts.backend, "--paging-child"]
    files = [layout.ffn_path, layout.resident_path]
    result, peak = run_limited(command, limit, files, [prompt, feed], "paging")
    return {**result, "limit": limit, "peak": peak}


def llama_cpp_row(opts, layout: Layout, budget, prompt, feed, dense) -> dict:
    """llama.cpp (`--llama-cpp`'s interpreter, llama_cpp_decode.py) on `--gguf`,
    memory-mapped, under the paging row's limit at `budget` (its weights kept
    mapped: no repacking), or with no limit and the file read into the page cache
    first (`budget` None). `dense`: our dense row's ids and first logits, or None."""
    context = len(prompt) + len(feed) + 1
    command = [opts.llama_cpp, str(Path(__file__).with_name("llama_cpp_decode.py"))]
    job = {"model": str(opts.gguf), "n_ctx": context, "threads": opts.llama_threads}
    job |= {"prompt": prompt, "feed": feed, "repack": budget is None}
    if budget is None:
        with open(opts.gguf, "rb") as f:  # warm: llama.cpp's compute speed alone
            while f.read(1 << 24):
                pass
        done = subprocess.run(
            command, input=json.dumps(job), capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(f"the llama.cpp row failed:\n{done.stderr[-2000:]}")
        got, limit, peak = json.loads(done.stdout.strip().splitlines()[-1]), None, None
    else:
        limit = paging_limit(opts, layout, budget, context)
        got, peak = run_limited(command, limit, [opts.gguf], job, "llama.cpp")
    row = {
        "config": "llama.cpp, all in DRAM"
        if budget is None
        else f"llama.cpp (GGUF memory-mapped), budget {budget}",
        "ms_per_token": 1e3 * got["per_token"],
        "measured_ms": 1e3 * got["per_token"],
        "prompt_s": got["prompt_s"],
        "limit_bytes": limit,
        "peak_bytes": peak,
        "repacked": budget is None,
        "threads": opts.llama_threads,
        "ids": got["ids"],
        "tokens_equal_dense": None,
    }
    if dense is not None:
        ids, logits = dense
        row["tokens_equal_dense"] = got["ids"] == ids
        row["positions_differ"] = sum(
            a != b for a, b in zip(got["ids"], ids, strict=True)
        )
        # llama.cpp rounds otherwise (F16 products, Q8_0 activations): how far
        # apart the first step's logits are says whether a differing id is a near tie
        first = np.asarray(got["first_logits"], dtype=np.float32)
        row["first_logits_max_abs_diff"] = float(np.abs(first - logits).max())
    return row


def experts_row(opts, layout: Layout, machine, spec: dict, prompt, feed) -> dict:
    """The experts placement at spec's budget, window and reads ahead: decode, and
    what it read."""
    budget, window, ahead = spec["budget"], spec["window"], spec["ahead"]
    model, _ = load(
        opts.model,
        backend=opts.backend,
        memory_budget=budget,
        window=window,
        lookahead=ahead,
    )
    ids, prompt_s, per_token, _ = decode(model, prompt, feed)
    s = model.io_stats()["decode"]
    n = max(s["tokens"], 1)
    row = {
        "config": f"experts, budget {budget}, window {window}"
        + (", reads ahead" if ahead else ""),
        "cached_experts": model.plan.capacity,
        "plan_bytes": model.plan.weights,
        "held_bytes": sum(model.held_bytes().values()),
        "ms_per_token": 1e3 * per_token,
        "prompt_s": prompt_s,
        "experts_read_per_token": s["neurons_loaded"] / n,
        "experts_routed_per_token": s["neurons_predicted"] / n,
        "hit_rate": s["hit_rate"],
        "mb_per_token": s["bytes_per_token"] / 1e6,
        "io_ms_per_token": 1e3 * s["io_s"] / n,
        "read_gb_per_s": s["gb_per_s"],
        "ahead_coverage": s["ahead_coverage"],
        "ids": ids,
        "measured_ms": 1e3 * per_token,
        **predicted(layout, machine, model.plan, window),
    }
    if machine is not None:  # the disk probe's rate at an expert's reads
        from mlx_flashinfer.flash.reader import DEFAULT_CHUNK, DEFAULT_THREADS
        from mlx_flashinfer.plan.disk import throughput_at

        size = min(layout.bundle_bytes, DEFAULT_CHUNK)
        rate = throughput_at(machine.disk, size, DEFAULT_THREADS)
        row["probe_gb_per_s"] = rate / 1e9
    model.ffn.close()
    return row


def row_child(opts) -> int:
    """An experts row in its cgroup (`--isolate`); prints the row and the process's
    peak resident set (the cgroup's peak counts the page cache the loading read)."""
    from mlx_flashinfer.bench.worker import max_rss

    job = json.loads(sys.stdin.read())
    layout = Layout.open(opts.model)
    machine = cached_machine(opts.model, opts.backend)
    row = experts_row(opts, layout, machine, job, job["prompt"], job["feed"])
    print(json.dumps({**row, "rss_peak_bytes": max_rss()}))
    return 0


def fits_in_ram(path) -> bool:
    """Whether a file fits in the DRAM available now, with a quarter to spare."""
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    available = int(info["MemAvailable"].split()[0]) << 10
    return Path(path).stat().st_size < 0.75 * available


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a mixture-of-experts layout")
    p.add_argument("--budgets", nargs="+", default=["50%"])
    p.add_argument("--windows", nargs="+", type=int, default=[0, 4])
    p.add_argument(
        "--lookahead",
        nargs="+",
        choices=("off", "on"),
        default=["off"],
        help="rows without and/or with reads ahead (the next layer's router)",
    )
    p.add_argument("--backend", default="numpy")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--no-dense", action="store_true", help="skip the dense row")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    p.add_argument("--paging", action="store_true", help="add OS paging's rows")
    p.add_argument("--paging-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--isolate",
        action="store_true",
        help="run each experts row in its own memory cgroup (the paging row's limit)",
    )
    p.add_argument("--row-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--routing-tokens",
        type=int,
        default=0,
        help="record the routing of this many random tokens first (for predictions)",
    )
    p.add_argument(
        "--text",
        help="feed this text's tokens (the default model's tokenizer), not random ids",
    )
    p.add_argument("--llama-cpp", metavar="PYTHON", help="adds llama.cpp's rows")
    p.add_argument("--gguf", help="--llama-cpp's model (tools/synth_gguf.py)")
    # llama.cpp's threads wait for each other spinning: on a busy machine a thread
    # that loses its core stalls every step (moe-small beside a busy process: 1.6 s
    # a token with 2 threads on 2 cores, 16 ms with 1)
    p.add_argument("--llama-threads", type=int, default=2)
    opts = p.parse_args()
    if opts.paging_child:
        return paging_child(opts)
    if opts.row_child:
        return row_child(opts)
    if bool(opts.llama_cpp) != bool(opts.gguf):
        p.error("--llama-cpp and --gguf go together")
    if opts.gguf and not Path(opts.gguf).is_file():
        p.error(f"--gguf {opts.gguf}: no such file")

    layout = Layout.open(opts.model)
    vocab = layout.args.vocab_size
    measured = opts.prompt_tokens + opts.tokens
    if opts.text:  # the measured tokens first, the routing recorded on the next
        try:
            text = text_tokens(opts.text, measured + opts.routing_tokens, vocab)
        except (OSError, ValueError) as err:
            p.error(str(err))
    if opts.routing_tokens:
        from mlx_flashinfer.predictors.routing import record_routing

        if opts.text:
            ids = np.array(text[measured:])
        else:
            ids = np.random.default_rng(1).integers(3, vocab, opts.routing_tokens)
        stream = [ids[i : i + 256].tolist() for i in range(0, len(ids), 256)]
        record_routing(opts.model, token_ids=stream, backend=opts.backend)
    rows, reference = [], None
    dense, _ = load(opts.model, backend=opts.backend)
    args = dense.args
    if not args.is_moe:
        p.error(f"{opts.model} is not a mixture of experts")
    machine = cached_machine(opts.model, opts.backend)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, args.vocab_size, opts.prompt_tokens).tolist()
    feed = rng.integers(3, args.vocab_size, opts.tokens).tolist()
    if opts.text:
        prompt, feed = text[: opts.prompt_tokens], text[opts.prompt_tokens : measured]
    if not opts.no_dense:
        reference, prompt_s, per_token, _ = decode(dense, prompt, feed)
        rows.append(
            {
                "config": "dense (every expert in DRAM: compute only)",
                "ms_per_token": 1e3 * per_token,
                "measured_ms": 1e3 * per_token,
                "ids": reference,
                **predicted(layout, machine),
            }
        )
        if opts.llama_cpp:  # what llama.cpp's first step is compared with
            logits = dense.prefill(prompt, dense.make_cache())
            reference_first = dense.backend.to_numpy(logits)[-1]
    del dense
    paged = None  # the paging row's tokens: dense's sums over the mapped experts
    for budget in opts.budgets if opts.paging else ():
        got = paging_row(opts, layout, budget, prompt, feed)
        paged = got["ids"]
        rows.append(
            {
                "config": f"OS paging (experts memory-mapped), budget {budget}",
                "ms_per_token": 1e3 * got["per_token"],
                "measured_ms": 1e3 * got["per_token"],
                "prompt_s": got["prompt_s"],
                "mb_per_token": got.get("mb_per_token"),
                "limit_bytes": got["limit"],
                "peak_bytes": got["peak"],
                "tokens_equal_dense": None
                if reference is None
                else got["ids"] == reference,
                **paging_predicted(layout, machine, budget),
            }
        )
    if opts.llama_cpp:
        dense_seen = None if reference is None else (reference, reference_first)
        budgets = [*opts.budgets, None] if fits_in_ram(opts.gguf) else opts.budgets
        for budget in budgets:
            rows.append(llama_cpp_row(opts, layout, budget, prompt, feed, dense_seen))
    for budget, window, ahead in itertools.product(
        opts.budgets, opts.windows, [a == "on" for a in opts.lookahead]
    ):
        spec = {"budget": budget, "window": window, "ahead": ahead}
        if opts.isolate:  # in its own cgroup, as the paging row
            limit = paging_limit(opts, layout, budget, len(prompt) + len(feed) + 1)
            command = [sys.executable, __file__, "--model", str(opts.model)]
            command += ["--backend", opts.backend, "--row-child"]
            job = {**spec, "prompt": prompt, "feed": feed}
            row, peak = run_limited(command, limit, [], job, "experts")
            row |= {"limit_bytes": limit, "peak_bytes": peak}
        else:
            row = experts_row(opts, layout, machine, spec, prompt, feed)
        ids = row.pop("ids")
        row["tokens_equal_dense"] = None if reference is None else ids == reference
        # where dense does not fit in DRAM (--no-dense), OS paging's row ran it
        row["tokens_equal_paging"] = None if paged is None else ids == paged
        rows.append(row)
    print(
        f"{'configuration':<48} {'ms/token':>9} {'predicted':>9} {'read/token':>10} "
        f"{'MB/token':>9} {'predicted':>9}"
    )
    for r in rows:
        read = r.get("experts_read_per_token")
        guess = r.get("predicted_ms")
        print(
            f"{r['config']:<48} {r['ms_per_token']:>9.1f} "
            f"{'-' if guess is None else f'{guess:.1f}':>9} "
            f"{'' if read is None else f'{read:.1f}':>10} "
            f"{r.get('mb_per_token', 0):>9.1f} "
            f"{r.get('predicted_mb_per_token', 0):>9.1f}"
        )
    references = (("tokens_equal_dense", "dense"), ("tokens_equal_paging", "paging"))
    for key, what in references:
        checked = [r[key] for r in rows if r.get(key) is not None]
        if checked:
            print(f"tokens equal to {what}'s: {sum(checked)} of {len(checked)} rows")
    if opts.out:
        result = {
            "model": {
                "path": opts.model,
                "num_experts": args.num_experts,
                "experts_per_token": args.experts_per_token,
                "layers": args.num_hidden_layers,
            },
            "backend": opts.backend,
            "machine": platform.processor() or platform.machine(),
            "prompt_tokens": opts.prompt_tokens,
            "tokens": opts.tokens,
            "fed": f"text: {opts.text}" if opts.text else "random token ids",
            "rows": rows,
        }
        with open(opts.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
