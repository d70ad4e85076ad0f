"""The `flashinfer bench` command: options, and the run from options to files.

Module-level imports stay light: `flashinfer`'s parser imports this for every
command.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

from ..bench.configs import ROWS
from ..model.backends import BACKENDS
from ..predictors.kinds import PREDICTORS


def add_commands(sub) -> None:
    """Register `bench` on the `flashinfer` subparsers."""
    p = sub.add_parser(
        "bench",
        help="the paper's ablation and the baselines, each in a memory-limited process",
    )
    p.add_argument(
        "model",
        nargs="?",
        default="default",
        help="layout directory, checkpoint or 'default' (the embedded SmolLM2)",
    )
    p.add_argument(
        "--unbundled",
        default=None,
        help="the same model converted with arrangement 'separate' (default: "
        "written into the cache folder once)",
    )
    p.add_argument("--budget", default="50%", help="bytes, 1.5GB or 50%% (default)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["numpy", "mlx"])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=None, help="default: all")
    p.add_argument("--text", default=None, help="UTF-8 text: prompt and decoded tokens")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--tokens", type=int, default=256, help="decoded tokens per row")
    p.add_argument(
        "--slow-tokens",
        type=int,
        default=None,
        help="decoded tokens of naive, hybrid, mmap, stream (default: --tokens)",
    )
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--predictor", choices=PREDICTORS, default=None)
    p.add_argument("--threads", type=int, default=None, help="flash reader threads")
    limits = p.add_mutually_exclusive_group()
    limits.add_argument(
        "--limit", default=None, help="one memory limit for every row (e.g. 2GB)"
    )
    limits.add_argument("--no-limit", action="store_true", help="run without cgroups")
    p.add_argument("--probe", default=None, help="a saved disk probe JSON to reuse")
    p.add_argument("--probe-dir", default=None, help="where the short probe writes")
    p.add_argument("--out", default=None, help="result JSON (.md and .png beside it)")
    p.add_argument("--compare", nargs="+", default=None, metavar="JSON")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=cmd_bench)


def load_result(path: str | Path) -> dict:
    """A bench result JSON.

    Raises:
        FileNotFoundError, ValueError: missing, or not a bench result.
    """
    from ..bench.ablation import FORMAT

    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a flashinfer bench result")
    return data


def parse_limit(value: str | None) -> int | None:
    """--limit as bytes (a size, not a percentage)."""
    from ..flash.memory import parse_budget

    if value is None:
        return None
    if "%" in value:
        raise ValueError(f"--limit takes bytes or a size like 2GB, not {value!r}")
    return parse_budget(value, 1)


def cmd_compare(opts) -> int:
    from ..bench.plots import write_compare_plot
    from ..bench.report import compare

    results = {name: load_result(name) for name in opts.compare}
    print(compare(results), end="")
    out = Path(opts.out or "bench-compare.json")
    plot = write_compare_plot(results, out.with_suffix(".png"))
    print(plot if isinstance(plot, str) else f"plot: {plot}")
    return 0


def available_backends(names: list[str]) -> list[str]:
    """The asked backends that import here (a missing MLX is skipped with a note)."""
    from ..model.backends import get_backend

    kept = []
    for name in dict.fromkeys(names):
        try:
            get_backend(name)
            kept.append(name)
        except ImportError as err:
            print(f"flashinfer bench: skipping {name}: {err}", file=sys.stderr)
    if not kept:
        raise ImportError("no backend to run")
    return kept


def cmd_bench(opts) -> int:
    if opts.compare:
        return cmd_compare(opts)
    from ..bench.ablation import layout_files, prepare, run_bench
    from ..bench.cgroup import find_memory_cgroup
    from ..bench.plots import write_plots
    from ..bench.report import markdown
    from ..bench.runner import run_isolated

    backends = available_backends(opts.backends)
    # the plan row needs the curves to choose; otherwise the model's and the
    # options' errors come first
    early = bool(opts.rows and "plan" in opts.rows)
    given = load_probe(opts.probe) if opts.probe and early else None
    machines = bench_machines(opts, backends, given) if early else None
    prepared = prepare(
        opts.model,
        unbundled=opts.unbundled,
        budget=opts.budget,
        backends=backends,
        rows=opts.rows,
        text=Path(opts.text).read_text(encoding="utf-8") if opts.text else None,
        prompt_tokens=opts.prompt_tokens,
        tokens=opts.tokens,
        slow_tokens=opts.slow_tokens,
        window=opts.window,
        predictor=opts.predictor,
        threads=opts.threads,
        limit=parse_limit(opts.limit),
        cache_dir=opts.cache_dir,
        machines=machines,
    )
    if not early:
        given = load_probe(opts.probe) if opts.probe else None
        machines = bench_machines(opts, backends, given)
    if given is not None:
        probe = given.get("disk") or given
    else:
        # the disk now, beside the run: a virtual disk's rate moves by half from one
        # quarter of an hour to the next (measured here), so the kept probe's disk
        # would predict another hour's runs
        from ..plan.machine import probe_disk

        where = opts.probe_dir or prepared.bundled.path.parent
        print(f"flashinfer bench: probing the disk in {where}", file=sys.stderr)
        bar = not opts.quiet and sys.stderr.isatty()
        probe = probe_disk(where, backends[0], progress=bar)
        for machine in (machines or {}).values():
            machine.disk = probe
    cgroup = "unlimited (--no-limit)" if opts.no_limit else find_memory_cgroup()
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    if isinstance(cgroup, str):
        limits = f"unlimited: {cgroup}; peak = the worker's max RSS"
        cgroup = None
    else:
        limits = (
            f"cgroup v{cgroup.version}, one group per run (limit = budget + KV cache "
            "+ process overhead + I/O buffers, unless --limit; peak = the group's "
            "most charged memory, page cache included); page cache evicted before "
            "each run (fadvise DONTNEED" + (" + drop_caches)" if root else ")")
        )
    files = layout_files(prepared.bundled, prepared.unbundled)
    runner = partial(run_isolated, cgroup=cgroup, files=files, drop_all=root)
    result = run_bench(
        prepared, runner, probe, limits, progress=not opts.quiet, machines=machines
    )
    out = Path(opts.out or f"bench-{prepared.bundled.path.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text, end="")
    plots = write_plots(result, out.with_suffix(""))
    written = [out, out.with_suffix(".md")] + ([] if isinstance(plots, str) else plots)
    print("wrote " + ", ".join(map(str, written)))
    if isinstance(plots, str):
        print(plots)
    return 0


def load_probe(path: str) -> dict:
    """A saved disk probe (tools/disk_probe.py --out) or machine probe
    (`flashinfer probe --out`).

    Raises:
        FileNotFoundError, ValueError: missing, or not a probe.
    """
    try:
        probe = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(probe, dict) or not (probe.get("disk") or probe).get("cells"):
        raise ValueError(f"{path}: not a disk probe (no cells)")
    return probe


def bench_machines(opts, backends: list[str], given: dict | None) -> dict:
    """This machine's curves per backend, for the predictions and the plan row: a
    machine probe given with --probe (its backend), else the ones `flashinfer
    probe` kept for the model's disk; none for a plain disk probe."""
    from ..formats.model_cache import cache_root
    from ..plan.machine import FORMAT, Machine, cached_machine

    if given is not None:
        if given.get("format") != FORMAT:
            return {}
        machine = Machine.from_dict(given)
        return {machine.backend: machine} if machine.backend in backends else {}
    where = Path(opts.probe_dir) if opts.probe_dir else cache_root(opts.cache_dir)
    if not where.exists():
        return {}
    found = {b: cached_machine(where, b, opts.cache_dir) for b in backends}
    missing = [b for b, m in found.items() if m is None]
    if missing:
        print(
            f"flashinfer bench: no prediction for {', '.join(missing)}: "
            f"`flashinfer probe --backend {missing[0]}` measures this machine",
            file=sys.stderr,
        )
    return {b: m for b, m in found.items() if m is not None}
