"""Bench results as numbers per token and as markdown tables in the shape of the
paper's Tables 2 and 3; `compare` sets results of several machines side by side,
normalised where raw times are not comparable."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..flash.reader import DEFAULT_THREADS
from ..flash.uring import RING_ENTRIES
from ..plan.disk import has_ring, throughput_at

MB = 1e6


def row_metrics(result: dict, probe: dict | None, ffn_bytes: int) -> dict:
    """Per decoded token: bytes, reads, read size, GB/s, the time split, and the
    disk's limit: bytes / the probe's throughput at this read size and thread count.

    I/O and memory-management times come from the FFN's own counters; total is the
    wall time of the step (the evaluated logits), compute = total - I/O - memory.
    """
    seconds = np.asarray(result["token_s"], dtype=float)
    n = max(len(seconds), 1)
    stats = result.get("decode") or {}
    bytes_read = stats.get("bytes_read", 0)
    reads = stats.get("reads", 0)
    io_s, memory_s = stats.get("io_s", 0.0), stats.get("memory_s", 0.0)
    # reads ahead run in the background: io_s is only what the token waited for
    hidden_s = stats.get("io_hidden_s", 0.0)
    reading_s = io_s - stats.get("ahead_wait_s", 0.0) + stats.get("io_ahead_s", 0.0)
    total_ms = 1e3 * float(seconds.mean()) if len(seconds) else 0.0
    mean_read = bytes_read / reads if reads else 0.0
    threads = result["setup"].get("threads") or (
        1 if result["spec"]["kind"] in ("mmap", "stream") else DEFAULT_THREADS
    )
    if threads != 1 and probe and has_ring(probe):
        threads = RING_ENTRIES  # the reader's reads go through its io_uring
    disk = throughput_at(probe, mean_read, threads) if probe and mean_read else None
    metrics = {
        "tokens": len(seconds),
        "bytes_per_token": bytes_read / n,
        "mb_per_token": bytes_read / n / MB,
        "useful_mb_per_token": stats.get("bytes_useful", 0) / n / MB,
        "ffn_share": bytes_read / n / ffn_bytes,
        "reads_per_token": reads / n,
        "mean_read_bytes": mean_read,
        "gb_per_s": bytes_read / reading_s / 1e9 if reading_s else None,
        "io_ms": 1e3 * io_s / n,
        "io_hidden_ms": 1e3 * hidden_s / n,
        "io_hidden_share": hidden_s / (hidden_s + io_s) if hidden_s else 0.0,
        "memory_ms": 1e3 * memory_s / n,
        "predictor_ms": 1e3 * stats.get("predictor_s", 0.0) / n,
        "compute_ms": max(total_ms - 1e3 * (io_s + memory_s) / n, 0.0),
        "total_ms": total_ms,
        "median_ms": 1e3 * float(np.median(seconds)) if len(seconds) else 0.0,
        "tok_s": 1e3 / total_ms if total_ms else None,
        "reader_threads": threads,
        "disk_gb_per_s": disk / 1e9 if disk else None,
        "disk_limit_ms": 1e3 * bytes_read / n / disk if disk else None,
        "hit_rate": stats.get("hit_rate"),
    }
    return metrics


def _speedups(rows: list[dict]) -> dict:
    """(backend, row) -> naive total / this total, and agreement with dense."""
    out = {}
    ok = [r for r in rows if "metrics" in r]
    for r in ok:
        naive = next(
            (x for x in ok if x["backend"] == r["backend"] and x["row"] == "naive"),
            None,
        )
        dense = next(
            (x for x in ok if x["backend"] == r["backend"] and x["row"] == "dense"),
            None,
        )
        speed = (
            naive["metrics"]["total_ms"] / r["metrics"]["total_ms"] if naive else None
        )
        agree = None
        if dense is not None:
            a, b = r["argmax"], dense["argmax"]
            common = min(len(a), len(b))
            agree = float(np.mean(np.equal(a[:common], b[:common]))) if common else None
        out[r["backend"], r["row"]] = (speed, agree)
    return out


def _f(value, digits: int = 1, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _size(n: float | None) -> str:
    if not n:
        return "-"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def header_lines(result: dict) -> list[str]:
    """Machine, model and settings, one fact per line."""
    m, s, model = result["machine"], result["settings"], result["model"]
    gpu = m.get("gpu")
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    probe = result.get("probe")
    return [
        f"- machine: {m['platform']}, {m['cpu']}, {m['cores']} cores, "
        f"{(m['ram_bytes'] or 0) / 1e9:.1f} GB RAM, "
        + (
            f"GPU {gpu.get('architecture', gpu.get('device_name', 'metal'))}"
            if gpu
            else "no GPU"
        )
        + f"; {versions}",
        f"- model: {model['name']} ({model['family']}, {model['activation']}, "
        f"{model['dtype']}), {model['layers']} layers x {model['neurons']} neurons, "
        f"FFN {model['ffn_bytes'] / MB:.1f} MB, weights "
        f"{model.get('weight_bytes', 0) / MB:.1f} MB, held as stored",
        f"- budget {s['budget']} ({(s['budget_bytes'] or 0) / MB:.1f} MB), window "
        f"{s['window']}, predictor {s['predictor']}; {s['prompt_tokens']}-token "
        f"prompt, {s['tokens']} decoded tokens ({s['slow_tokens']} for the rows "
        f"reading half the FFN or more), {s['sequence']}",
        f"- rows: naive = predictor all, window 0 (every FFN weight read each "
        "token); hybrid = predictor all at a budget whose cache holds half of each "
        f"layer; + predictor = {s['predictor']}, window 0, unbundled layout; + "
        f"windowing = window {s['window']}, unbundled; + bundling = all: the same on "
        "the bundled layout (the paper's '+bundling' and 'all' are one configuration "
        "here); + reads ahead: all with the next layer's guessed neurons read while "
        "this layer computes; compute only: all with the FFN file in DRAM, read by "
        "memcpy (no I/O); dense: every weight in DRAM, under its own limit; OS "
        "paging and layer streaming: under the limit of the 'all' row",
        f"- memory: {result['memory_limits']}",
        "- compute: BLAS on one thread in every row (NumPy; MLX schedules its own)",
        "- disk: "
        + (
            f"probe ({probe['mode']}, {len(probe['cells'])} cells)"
            if probe
            else "no probe"
        ),
    ] + [f"- skipped: {note}" for note in result.get("skipped", [])]


def backend_table(result: dict, backend: str) -> str:
    """The ablation and baselines of one backend (paper Tables 2 and 3 in one)."""
    rows = [r for r in result["rows"] if r["backend"] == backend]
    speed = _speedups(result["rows"])
    lines = [
        "| configuration | MB/token (useful) | % of FFN | reads/token | mean read "
        "| GB/s (disk at that size) | I/O ms (disk limit) | mem ms | compute ms "
        "| total ms | speedup | agrees with dense | limit MB | peak MB (max RSS) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mem = r["memory"]
        limit = _f(mem["limit"] / MB, 0) if mem.get("limit") else "none"
        # the group's peak counts the page cache the kernel may reclaim; RSS does not
        peak = mem.get("peak") or r.get("max_rss")
        peak = _f(peak and peak / MB, 0)
        if r.get("max_rss"):
            peak += f" ({r['max_rss'] / MB:.0f})"
        if "error" in r:
            lines.append(
                f"| {r.get('title', r['row'])} | failed: {r['error']} |"
                + " |" * 11
                + f" {limit} | {peak} |"
            )
            continue
        m = r["metrics"]
        up, agree = speed[backend, r["row"]]
        lines.append(
            f"| {r['title']} | {m['mb_per_token']:.2f} "
            f"({m['useful_mb_per_token']:.2f}) | {100 * m['ffn_share']:.1f} "
            f"| {m['reads_per_token']:.0f} | {_size(m['mean_read_bytes'])} | "
            f"{_f(m['gb_per_s'], 2)} ({_f(m['disk_gb_per_s'], 2)}) | "
            f"{m['io_ms']:.1f} ({_f(m['disk_limit_ms'])}) | {m['memory_ms']:.1f} | "
            f"{m['compute_ms']:.1f} | {m['total_ms']:.1f} | {_f(up, 2, 'x')} | "
            f"{_f(agree and 100 * agree, 0, '%')} | {limit} | {peak} |"
        )
    return "\n".join(lines)


def backends_side_by_side(result: dict) -> str:
    """ms per token and speedup over naive, one column pair per backend."""
    backends = result["settings"]["backends"]
    speed = _speedups(result["rows"])
    head = " | ".join(f"{b} ms/token | {b} speedup" for b in backends)
    lines = [f"| configuration | {head} |", "|---|" + "---:|---:|" * len(backends)]
    for row in dict.fromkeys(r["row"] for r in result["rows"]):
        cells = []
        for b in backends:
            r = next(
                (x for x in result["rows"] if x["backend"] == b and x["row"] == row),
                None,
            )
            if r is None or "metrics" not in r:
                cells += ["-", "-"]
                continue
            cells += [f"{r['metrics']['total_ms']:.1f}", _f(speed[b, row][0], 2, "x")]
        title = next(r["title"] for r in result["rows"] if r["row"] == row)
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(result: dict, backend: str) -> list[str]:
    """The full method against its yardsticks: naive, OS paging (and paging's
    ceiling here: its time over the compute time of "all", what "all" would reach
    with zero I/O and memory management), I/O share, and peak RSS against budget +
    KV cache + the process's base."""
    rows = {
        r["row"]: r
        for r in result["rows"]
        if r["backend"] == backend and "metrics" in r
    }
    full = rows.get("all")
    if full is None:
        return []
    m, out = full["metrics"], []
    if "naive" in rows:
        naive = rows["naive"]["metrics"]["total_ms"]
        out.append(f"- all vs naive: {naive / m['total_ms']:.1f}x")
    out.append(f"- I/O per token: {100 * m['ffn_share']:.1f}% of the FFN")
    if "mmap" in rows and m["compute_ms"]:
        paging = rows["mmap"]["metrics"]["total_ms"]
        ratio, ceiling = paging / m["total_ms"], paging / m["compute_ms"]
        out.append(
            f"- all vs OS paging: {ratio:.1f}x; ceiling here (paging / compute of "
            f"all) {ceiling:.1f}x; reached {100 * ratio / ceiling:.0f}% of it"
        )
    out.append(
        f"- memory management: {100 * m['memory_ms'] / m['total_ms']:.0f}% of the token"
    )
    if "compute-only" in rows:
        # the compute-only row still copies its rows from memory (its "I/O"):
        # its compute + memory management is the zero-I/O floor
        c = rows["compute-only"]["metrics"]
        floor, zero_io = c["total_ms"], c["compute_ms"] + c["memory_ms"]
        for name in ("all", "+lookahead"):
            if name in rows:
                r = rows[name]["metrics"]
                out.append(
                    f"- {name} vs compute-only: {r['total_ms'] / floor:.2f}x, vs its "
                    f"compute + memory management alone ({zero_io:.0f} ms): "
                    f"{r['total_ms'] / zero_io:.2f}x "
                    "(the paper's CPU: 669 / 506 ms = 1.32x)"
                    + (
                        f"; I/O hidden {100 * r['io_hidden_share']:.0f}% "
                        f"({r['io_hidden_ms']:.1f} ms of reads ran behind compute, "
                        f"{r['io_ms']:.1f} ms waited)"
                        if name == "+lookahead"
                        else ""
                    )
                )
    if "mmap" in rows and "+lookahead" in rows:
        paging = rows["mmap"]["metrics"]["total_ms"]
        ahead = rows["+lookahead"]["metrics"]["total_ms"]
        out.append(f"- +lookahead vs OS paging: {paging / ahead:.1f}x")
    if full.get("base_rss") and full.get("max_rss"):
        kv = full["setup"].get("kv_cache", 0)
        bound = full["spec"]["budget"] + kv + full["base_rss"]
        out.append(
            f"- peak RSS of all: {full['max_rss'] / MB:.0f} MB <= budget + KV cache "
            f"+ process base ({full['spec']['budget'] / MB:.0f} + {kv / MB:.0f} + "
            f"{full['base_rss'] / MB:.0f} = {bound / MB:.0f} MB): "
            + ("yes" if full["max_rss"] <= bound else "no")
        )
    return out


def markdown(result: dict) -> str:
    """The whole report: header, one table per backend, the backends side by side."""
    parts = ["## flashinfer bench", "", *header_lines(result)]
    for backend in result["settings"]["backends"]:
        if any(r["backend"] == backend for r in result["rows"]):
            parts += ["", f"### {backend}", "", backend_table(result, backend)]
            targets = target_lines(result, backend)
            parts += ["", *targets] if targets else []
    if len(result["settings"]["backends"]) > 1:
        parts += ["", "### backends side by side", "", backends_side_by_side(result)]
    return "\n".join(parts) + "\n"


def compare_columns(results: dict[str, dict]) -> list[tuple[str, dict]]:
    """(label, result) per file and backend: "stem/backend"."""
    return [
        (f"{Path(name).stem}/{backend}", result)
        for name, result in results.items()
        for backend in result["settings"]["backends"]
        if any(r["backend"] == backend for r in result["rows"])
    ]


def compare_values(results: dict[str, dict]) -> dict[str, dict]:
    """{metric: {(row, label): value}} for the normalised metrics: MB per token,
    I/O time over the machine's own disk limit, speedup over its own naive row."""
    out = {"mb_per_token": {}, "io_vs_disk": {}, "speedup": {}}
    for label, result in compare_columns(results):
        backend = label.rsplit("/", 1)[1]
        speed = _speedups(result["rows"])
        for r in result["rows"]:
            if r["backend"] != backend or "metrics" not in r:
                continue
            m, key = r["metrics"], (r["row"], label)
            out["mb_per_token"][key] = m["mb_per_token"]
            if m["disk_limit_ms"]:
                out["io_vs_disk"][key] = m["io_ms"] / m["disk_limit_ms"]
            out["speedup"][key] = speed[backend, r["row"]][0]
    return out


def compare(results: dict[str, dict]) -> str:
    """Markdown: the machines, then one table per normalised metric."""
    columns = compare_columns(results)
    labels = [label for label, _ in columns]
    lines = ["## flashinfer bench: comparison", ""]
    for name, result in results.items():
        m = result["machine"]
        lines.append(
            f"- {Path(name).stem}: {m['platform']}, {m['cpu']}, {m['cores']} cores, "
            f"{(m['ram_bytes'] or 0) / 1e9:.0f} GB; model {result['model']['name']}, "
            f"budget {result['settings']['budget']}"
        )
    titles = {
        r["row"]: r.get("title", r["row"]) for _, res in columns for r in res["rows"]
    }
    values = compare_values(results)
    names = {
        "mb_per_token": "MB read per token",
        "io_vs_disk": "I/O time / the machine's own disk limit (1.0 = at the limit)",
        "speedup": "speedup over the machine's own naive row",
    }
    for metric, title in names.items():
        lines += ["", f"### {title}", ""]
        lines.append("| configuration | " + " | ".join(labels) + " |")
        lines.append("|---|" + "---:|" * len(labels))
        for row, name in titles.items():
            cells = [_f(values[metric].get((row, label)), 2) for label in labels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
