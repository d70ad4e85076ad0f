"""`flashinfer probe` and `flashinfer plan`: this machine's curves, measured once
and kept; and the plan a budget gives a model here, with what each token will
cost."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..flash.memory import format_bytes, model_bytes, parse_budget
from ..model.backends import BACKENDS
from ..predictors.kinds import PREDICTORS
from .options import add_cache_option, at_least

PROMPT_TOKENS = 128  # the prompt `flashinfer plan` predicts by default


def add_commands(sub) -> None:
    """Register probe and plan."""
    p = sub.add_parser(
        "probe",
        help="measure this machine (disk by read size and threads, memory, compute "
        "per dtype) for the planner, and keep the result",
    )
    p.add_argument(
        "--dir",
        default=None,
        help="a directory on the disk that holds the models (default: the cache "
        "folder)",
    )
    p.add_argument("--backend", choices=BACKENDS, default=None)
    p.add_argument("--out", default=None, help="also write the probe to this file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_cache_option(p)
    p.set_defaults(run=cmd_probe)

    p = sub.add_parser(
        "plan",
        help="the fastest plan for a model within a budget, and its predicted cost "
        "per token against the alternatives and OS paging",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="layout directory, checkpoint or 'default' (default: the embedded "
        "SmolLM2-135M-Instruct)",
    )
    p.add_argument("--budget", default="50%", help="bytes, 1.5GB or 50%% (default)")
    p.add_argument(
        "--for",
        dest="speed",
        default=None,
        metavar="RATE",
        help="instead: the smallest budget that decodes this fast, e.g. 10tok/s",
    )
    p.add_argument(
        "--max-loss",
        default=None,
        metavar="PCT",
        help="the perplexity loss allowed (default: the trained predictor's own "
        "calibrated loss; 0: exact plans only)",
    )
    p.add_argument(
        "--predictor",
        choices=PREDICTORS,
        default=None,
        help="only the sparse plans of this predictor, whatever its loss",
    )
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument(
        "--prompt-tokens",
        type=at_least(0),
        default=PROMPT_TOKENS,
        metavar="N",
        help=f"also predict a prompt of N tokens (default {PROMPT_TOKENS}; 0: not)",
    )
    p.add_argument("--backend", choices=BACKENDS, default=None)
    p.add_argument(
        "--probe",
        default=None,
        metavar="FILE",
        help="a saved probe (default: this machine's, measured now if missing)",
    )
    add_cache_option(p)
    p.set_defaults(run=cmd_plan)


def cmd_probe(opts) -> int:
    from ..formats.model_cache import cache_root
    from ..plan.host import cpu_model
    from ..plan.machine import machine_path, probe_machine, save_machine

    directory = Path(opts.dir) if opts.dir else cache_root(opts.cache_dir)
    directory.mkdir(parents=True, exist_ok=True)
    print(
        f"flashinfer probe: measuring {cpu_model()} and the disk of {directory}",
        file=sys.stderr,
    )
    machine = probe_machine(directory, opts.backend, progress=not opts.quiet)
    kept = save_machine(
        machine, machine_path(directory, machine.backend, opts.cache_dir)
    )
    if opts.out:
        save_machine(machine, opts.out)
    print("\n".join(machine_lines(machine)))
    print(f"kept in {kept} ({machine.seconds:.0f} s)")
    return 0


def machine_lines(machine) -> list[str]:
    """A probe as a few lines: the disk's rates, memory, compute per dtype."""
    from ..plan.disk import throughput_at

    disk = machine.disk
    lines = [f"{machine.cpu}, {machine.cores} cores, {machine.backend} backend"]
    reads = ", ".join(
        f"{size >> 10} KiB {throughput_at(disk, size, 16) / 1e6:.0f}"
        for size in (4 << 10, 64 << 10, 1 << 20)
    )
    stream = throughput_at(disk, 1 << 20, 16, sequential=True)
    lines.append(
        f"disk ({disk['mode']}): random reads on 16 threads, MB/s: {reads}; a stream "
        f"of 1 MiB reads {stream / 1e6:.0f} MB/s"
    )
    lines.append(f"memory: {machine.memory_bytes_per_s / 1e9:.1f} GB/s (copy)")
    gemv = ", ".join(
        f"{kind} {rates['1'] / 1e9:.1f} / {rates['all'] / 1e9:.1f}"
        for kind, rates in machine.gemv.items()
    )
    lines.append(f"decode products, GB of weights/s on 1 / all threads: {gemv}")
    lines.append(
        f"a layer's small operations: {1e6 * machine.layer_s:.0f} us per token; an "
        f"FFN call's: {1e6 * machine.ffn_call_s:.0f} us"
    )
    if reader := machine.reader:  # probes before it was measured have none
        one, many = reader["1"], reader.get("16", reader["1"])
        landing = one["byte_s"] and f", {1e-9 / one['byte_s']:.1f} GB/s landing"
        lines.append(
            f"the flash reader's own work: {1e6 * one['call_s']:.0f} / "
            f"{1e6 * many['call_s']:.0f} us a call on 1 / 16 threads, "
            f"{1e6 * one['read_s']:.1f} us a read{landing or ''}"
        )
    return lines


def parse_rate(value: str) -> float:
    """'10tok/s', '10' or '0.5 tok/s' -> tokens per second.

    Raises:
        ValueError: not a positive rate.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(tok/s|tokens/s|t/s)?\s*", value)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"--for takes a rate like 10tok/s, got {value!r}")
    return float(match.group(1))


def machine_for(layout_path: Path, opts):
    """The probe to plan with: --probe, or this machine's kept one, measured now
    (and kept) when there is none."""
    from ..plan.machine import load_machine, machine_here

    if opts.probe:
        return load_machine(opts.probe)
    return machine_here(
        layout_path, opts.backend, opts.cache_dir, progress=sys.stderr.isatty()
    )


def cmd_plan(opts) -> int:
    from ..formats.layout import Layout
    from ..loader import check_max_context, resolve_model
    from ..plan.planner import budget_for, choose
    from ..plan.prompt_costs import prompt_cost
    from ..predictors.train import parse_max_loss

    max_loss = None if opts.max_loss is None else parse_max_loss(opts.max_loss)
    if opts.max_loss is not None and opts.max_loss.strip().rstrip("%") in ("0", "0.0"):
        max_loss = 0.0
    speed = parse_rate(opts.speed) if opts.speed else None
    layout = Layout.open(resolve_model(opts.model, cache_dir=opts.cache_dir))
    context = check_max_context(layout, opts.max_context)
    machine = machine_for(layout.path, opts)
    name = opts.model or "default"
    whole = sum(model_bytes(layout))
    if speed is not None:
        found = budget_for(
            layout, speed, machine, max_loss=max_loss, max_context=context
        )
        if found is None:
            print(f"{name}: {speed:g} tok/s is out of reach here, even dense")
            return 0
        amount, choice = found
        print(
            f"{name} at {speed:g} tok/s needs a budget of {format_bytes(amount)} "
            f"({100 * amount / whole:.0f}% of the model), {machine.backend} "
            f"backend, {machine.cpu}:"
        )
    else:
        amount = parse_budget(opts.budget, whole)
        choice = choose(
            layout,
            amount,
            machine,
            max_loss=max_loss,
            max_context=context,
            predictor=opts.predictor,
        )
        print(
            f"plan for {name} at budget {opts.budget} ({format_bytes(amount)} of "
            f"{format_bytes(whole)}), {machine.backend} backend, {machine.cpu}:"
        )
    budget = opts.budget if speed is None else rounded_up(amount)
    prompt = None
    if opts.prompt_tokens > 0:
        tokens = min(opts.prompt_tokens, context)
        prompt = (
            tokens,
            choice.best.prompt_cost(layout, machine, tokens),
            prompt_cost(layout, "paging", machine, tokens, budget=amount),
        )
    print("\n".join(choice_lines(choice, budget=budget, prompt=prompt)))
    return 0


def prompt_line(cost) -> str:
    """ "2.4 s to the first token (I/O 0.3, memory 0.0, compute 2.1)"."""
    return (
        f"{cost.total_s:.1f} s to the first token (I/O {cost.io_s:.1f}, memory "
        f"{cost.memory_s:.1f}, compute {cost.compute_s:.1f})"
    )


def rounded_up(amount: int) -> str:
    """A budget as a size to type, rounded up (by under 1%): never less than
    `amount`."""
    import math

    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if amount >= size:
            return f"{math.ceil(100 * amount / size) / 100:g}{unit}"
    return str(amount)


def choice_lines(
    choice, alternatives: int = 3, *, budget: str = "B", prompt=None
) -> list[str]:
    """The chosen plan, the next best ones, those over the allowed loss, and OS
    paging, each with its predicted cost; the options that run the choice at
    `budget`. `prompt`: (tokens, the chosen plan's prompt cost, OS paging's), each
    TokenCost or None (not modelled)."""

    def loss(c) -> str:
        if c.loss != c.loss:  # NaN: a predictor the user named, never calibrated
            return "loss not measured"
        return "exact" if c.loss == 0 else f"perplexity {c.loss:+.1%}"

    best = choice.best
    lines = [f"  chosen   {best.name}: {best.cost.line()}, {loss(best)}"]
    if best.cost.bytes_read:
        lines.append(
            f"           reads {format_bytes(best.cost.bytes_read)} per token"
            + (
                f" ({1e3 * best.cost.hidden_io_s:.0f} ms of them behind compute)"
                if best.cost.hidden_io_s
                else ""
            )
        )
    if best.cost.note:
        lines.append(f"           {best.cost.note}")
    tokens, chosen, paged = prompt or (0, None, None)
    if chosen is not None:
        lines.append(f"           a prompt of {tokens} tokens: {prompt_line(chosen)}")
    seen = {best.name}
    for c in choice.others:
        if len(seen) > alternatives or c.name in seen:
            continue
        seen.add(c.name)
        lines.append(f"  then     {c.name}: {c.cost.line()}, {loss(c)}")
    for c in choice.refused[:1]:
        lines.append(
            f"  faster but over the allowed loss ({choice.allowed_loss:.1%}): "
            f"{c.name}: {c.cost.line()}, {loss(c)}"
        )
    if choice.paging is not None:
        lines.append(
            f"  OS paging (estimate): {choice.paging.line()}, re-reading "
            f"{format_bytes(choice.paging.bytes_read)} per token"
        )
        if choice.paging.note:
            lines.append(f"           {choice.paging.note}")
        if paged is not None and chosen is not None:
            lines.append(
                f"           a prompt of {tokens} tokens: {prompt_line(paged)}"
            )
    if best.placement == "dense":
        lines.append("  run it:  without --memory-budget (every weight fits)")
        return lines
    flags = []
    for key, value in best.options().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{key}")
        else:
            flags.append(f"{flag} {value}")
    lines.append(f"  run it:  --memory-budget {budget} {' '.join(flags)}")
    return lines
