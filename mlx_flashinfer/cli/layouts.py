"""`flashinfer convert` and `flashinfer inspect`: checkpoints into layouts, and what
a layout holds and what a budget would plan."""

from __future__ import annotations

import argparse
import sys
import time

from ..flash.memory import format_bytes, model_bytes
from ..formats.layout import DTYPES, Layout
from ..predictors.kinds import PREDICTORS, trained_kind
from ..predictors.report import domains_line, predictor_table
from .options import (
    add_cache_option,
    lookahead_option,
)


def add_commands(sub) -> None:
    """Register convert and inspect."""
    p = sub.add_parser("convert", help="convert a Hugging Face dir or GGUF to a layout")
    p.add_argument(
        "src",
        help="Hugging Face directory, .gguf file, Hub name "
        "(owner/name[@revision][:gguf-file]) or 'default' "
        "(the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("dst", help="layout directory to create (new or empty)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float16",
        help="storage of weights: float16 (default), bfloat16, float32, or "
        "quantized q8 / q4 (4-bit: about 3.6x smaller than float16)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=(32, 64, 128),
        default=None,
        help="q4/q8: values per scale and bias (default: the source's own blocks, "
        "GGUF 32, else 64)",
    )
    p.add_argument(
        "--down-bits",
        type=int,
        choices=(4, 8),
        default=None,
        help="q4/q8: bits of the FFN down columns (default 8: bundles quantize them "
        "along d_model, where 4 bits cost the default model +7%% perplexity)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace DST if it is a layout; never a file, a directory holding "
        "anything else, or one that is or contains SRC (the old layout goes only "
        "once the new one is complete)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("inspect", help="describe a layout")
    p.add_argument(
        "model", help="layout directory (or any model spec: converted on first use)"
    )
    p.add_argument("--verify", action="store_true", help="check every file's sha256")
    p.add_argument(
        "--budget",
        default=None,
        help="show the memory plan for this budget (bytes, 1.5GB or 50%%)",
    )
    p.add_argument("--predictor", choices=PREDICTORS, default=None)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument(
        "--lookahead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plan with reads ahead (a second read buffer)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the trained predictor's per-layer report",
    )
    add_cache_option(p)
    p.set_defaults(run=cmd_inspect)


def cmd_convert(opts) -> int:
    from ..formats.convert import convert

    src = opts.src  # "default": the embedded model (a folder named so: ./default)
    started = time.perf_counter()
    out = convert(
        src,
        opts.dst,
        dtype=opts.dtype,
        force=opts.force,
        progress=not opts.quiet,
        group_size=opts.group_size,
        down_bits=opts.down_bits,
    )
    print(f"converted {src} -> {out} in {time.perf_counter() - started:.1f} s")
    if (layout := Layout.open(out)).quantization:
        print(quantization_summary(layout))
    return 0


def quantization_summary(layout: Layout) -> str:
    """One line on how a quantized layout was made from its source."""
    q = layout.quantization
    bits = sorted(set(q["tensors"].values()))
    parts = "/".join(map(str, q["part_bits"]))
    line = (
        f"FFN bundles at {parts} bits ({', '.join(layout.bundle_parts)}), resident "
        "matrices at "
        f"{'/'.join(map(str, bits))} bits, groups of {q['group_size']}; "
        f"{q['exact_from_source']} matrices taken from the source's blocks unchanged"
    )
    if q["requantized_from_source"]:
        names = ", ".join(q["requantized_from_source"])
        line += f"; rounded again (the source quantized them otherwise): {names}"
    if rounded := q.get("scales_rounded_to_float16"):
        line += (
            f"; {rounded} scales or biases rounded to float16 (bfloat16 ones below "
            "2^-17, or scaled by a multiplier folded in)"
        )
    return line


def cmd_inspect(opts) -> int:
    from ..formats.tokenizer import load_tokenizer
    from ..loader import resolve_model

    layout = Layout.open(resolve_model(opts.model, cache_dir=opts.cache_dir))
    load_tokenizer(layout)  # parses, with its chat template
    args = layout.args
    plan = predictor = None
    if opts.budget:  # before any output: a budget too small is the only line
        from ..loader import default_predictor, make_plan

        predictor = opts.predictor or default_predictor(layout)
        plan = make_plan(
            layout, opts.budget, predictor, opts.max_context, **lookahead_option(opts)
        )
    # the tensors' bytes, as the plan counts them (the file adds its header)
    resident, ffn = model_bytes(layout)
    total = resident + ffn
    act = args.hidden_act + ("" if args.is_relu_family else "; sparsity is approximate")
    family = f"{args.family}, {args.model_type}" if args.model_type else args.family
    if args.is_moe:
        act = f"{args.moe_type}, {args.hidden_act} experts: routed exactly"
    tok = layout.manifest.get("tokenizer") or {}
    rows = [
        ("path", str(layout.path)),
        ("family", f"{family} ({act})"),
        ("layers", args.num_hidden_layers),
        ("d_model", args.hidden_size),
        *(
            [("experts", experts_line(layout))]
            if args.is_moe
            else [("ffn neurons", f"{args.intermediate_size} per layer")]
        ),
        (
            "heads",
            f"{args.num_attention_heads} ({args.num_key_value_heads} kv), "
            f"head_dim {args.head_dim}",
        ),
        ("vocab", args.vocab_size),
        ("dtype", layout.dtype),
        *(
            [("quantization", quantization_summary(layout))]
            if layout.quantization
            else []
        ),
        ("bundle", f"{layout.bundle_bytes} bytes ({', '.join(layout.bundle_parts)})"),
        ("resident", f"{format_bytes(resident)} ({100 * resident / total:.0f}%)"),
        ("ffn", f"{format_bytes(ffn)} ({100 * ffn / total:.0f}%)"),
        ("predictor", _predictor_summary(layout)),
        *([("routing", _routing_summary(layout))] if args.is_moe else []),
        (
            "tokenizer",
            f"{tok.get('file', 'none')}, chat template: "
            f"{'yes' if tok.get('chat_template') else 'no'}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    if opts.verify:
        layout.verify(progress=sys.stderr.isatty())
        print(f"{'checksums':<{width}}  ok ({len(layout.manifest['files'])} files)")
    elif verified := layout.manifest.get("verified"):
        print(
            f"{'checksums':<{width}}  computed by the {verified['by']} at "
            f"{verified['at']} (--verify checks them)"
        )
    if layout.has_predictor and opts.verbose:
        print()
        print("\n".join(predictor_table(layout.manifest["predictor"])))
    if plan is not None:
        print(f"\nmemory plan for --budget {opts.budget} (predictor {predictor}):")
        plan_rows = plan.rows(args.intermediate_size)
        plan_width = max(len(k) for k, _ in plan_rows)
        for key, value in plan_rows:
            print(f"  {key:<{plan_width}}  {value}")
        if len(set(plan.capacity)) > 1 and not args.is_moe:
            print(
                "  cache rows per layer, sized by each layer's share of predicted "
                "neurons (the predictor's report):"
            )
            if opts.verbose:
                print("  " + " ".join(str(c) for c in plan.capacity))
            else:
                print("  (-v lists them)")
        if line := planner_line(layout, opts):
            print(line)
    return 0


def experts_line(layout: Layout) -> str:
    """A mixture of experts' experts: how many, routed how, and each one's bytes."""
    a = layout.args
    shared = (
        f"; a shared expert of {a.shared_expert_size}" if a.shared_expert_size else ""
    )
    return (
        f"{a.num_experts} per layer, {a.experts_per_token} per token "
        f"({a.moe_type}: top-k of a softmax"
        f"{', renormalised' if a.norm_topk_prob else ''}{shared}); each "
        f"{a.intermediate_size} neurons, one bundle of "
        f"{format_bytes(layout.bundle_bytes)}"
    )


def planner_line(layout, opts) -> str | None:
    """The planner's choice at --budget and its predicted cost, when this machine is
    probed already (inspect never probes: `flashinfer plan` does)."""
    from ..loader import check_max_context
    from ..plan.machine import cached_machine
    from ..plan.planner import choose

    machine = cached_machine(layout.path, None, opts.cache_dir)
    if machine is None:
        return "  (`flashinfer plan` predicts what each placement costs here)"
    context = check_max_context(layout, opts.max_context)
    best = choose(layout, opts.budget, machine, max_context=context).best
    return f"\nthe planner's choice here: {best.name}: {best.cost.line()}"


def _predictor_summary(layout: Layout) -> str:
    """The trained predictor's kind and, when measured, its calibrated loss."""
    kind = trained_kind(layout)
    measured = (layout.manifest.get("predictor") or {}).get("quality")
    if kind is None or not measured:
        return kind or "none"
    return f"{kind}, {domains_line(measured)}"


def _routing_summary(layout: Layout) -> str:
    """A mixture of experts' recorded routing, or how to record it."""
    from ..predictors.routing import routing_summary

    section = layout.manifest.get("routing")
    if not section:
        return (
            "not recorded (`flashinfer train-predictor` records it; until then the "
            "planner takes every expert as equally popular)"
        )
    return routing_summary(section, layout.args.num_experts)
