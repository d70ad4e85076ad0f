"""`flashinfer verify` and `flashinfer perplexity`: how flash compares to dense."""

from __future__ import annotations

import sys
import time

from ..flash.memory import format_bytes
from ..formats.layout import Layout
from ..predictors.report import sparsity_line
from .options import (
    add_generation_options,
    add_model_options,
    at_least,
    load_model,
    lookahead_option,
    read_text_file,
)

VERIFY_TOKENS = 128  # of the built-in passage
TEXT_TOKENS = 256  # of the user's text


def add_commands(sub) -> None:
    """Register verify and perplexity."""
    p = sub.add_parser("verify", help="flash against dense (flash budget: 100%%)")
    add_generation_options(p, max_tokens=32)
    p.add_argument(
        "--perplexity-tokens",
        type=at_least(0),
        default=None,
        help="also score this many tokens of a passage with both (0: skip; default "
        f"{VERIFY_TOKENS}, or {TEXT_TOKENS} of a --text file)",
    )
    p.add_argument(
        "--text",
        metavar="FILE",
        default=None,
        help="score your own UTF-8 text, dense against flash, instead of the built-in "
        "passage (a chapter of Alice calibration never saw): whether the calibrated "
        "loss holds on your kind of text",
    )
    add_model_options(p)
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("perplexity", help="perplexity of a text file")
    p.add_argument("--model", required=True, help="model spec, as for generate")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file")
    p.add_argument(
        "--max-tokens",
        type=at_least(1),
        default=None,
        help="score only the first N tokens (default: all)",
    )
    p.add_argument(
        "--context",
        type=at_least(2),
        default=None,
        help="chunk length (default 512, or the --max-context if smaller)",
    )
    p.add_argument(
        "--prefill",
        type=at_least(1),
        default=None,
        help="tokens of each chunk run as a prompt; the rest run one decode "
        "step each, through the flash path (default: the whole chunk)",
    )
    add_model_options(p)
    p.set_defaults(run=cmd_perplexity)


def cmd_verify(opts) -> int:
    from ..chat import prompt_ids, read_prompt
    from ..loader import load, resolve_model
    from ..predictors.texts import verify_text
    from ..verify import compare, perplexities, perplexity_line, report_lines

    prompt = read_prompt(opts.prompt)
    score_tokens = opts.perplexity_tokens
    if score_tokens is None:
        score_tokens = TEXT_TOKENS if opts.text else VERIFY_TOKENS
    if opts.text and not score_tokens:
        raise ValueError("--text is scored by --perplexity-tokens: give more than 0")
    passage = read_text_file(opts.text, "--text") if opts.text else verify_text()
    path = resolve_model(opts.model, cache_dir=opts.cache_dir)
    shared = {"backend": opts.backend, "max_context": opts.max_context}
    dense, tokenizer = load(path, dense=True, **shared)
    budget = opts.memory_budget or "100%"  # the caches of a roomy plan: few overflows
    flash, _ = load(
        path,
        memory_budget=budget,
        window=opts.window,
        predictor=opts.predictor,
        threads=opts.threads,
        predictor_threshold=opts.predictor_threshold,
        placement=opts.placement,
        read_gap=opts.read_gap,
        **lookahead_option(opts),
        **shared,
    )
    ids = prompt_ids(tokenizer, prompt, opts.system_prompt, opts.ignore_chat_template)
    result = compare(flash, dense, ids, opts.max_tokens, tokenizer.eos_token_ids)
    layout = Layout.open(path)
    if flash.plan is not None and flash.plan.placement == "streamed":
        how = f"budget {budget}, streamed"
    elif flash.plan is not None:
        predictor = flash.ffn.predictor.name
        how = f"budget {budget}, window {flash.ffn.k}, predictor {predictor}"
    else:
        how = f"budget {budget}: the planner chose dense"
    print(
        f"verify: {result.steps} decode steps, flash ({how}) against dense, "
        f"{dense.backend.name} backend, greedy, teacher-forced on the dense tokens"
    )
    print("\n".join(report_lines(result, tokenizer, dense.args, layout.ffn_bytes)))
    if line := sparsity_line(flash, layout):
        print(line)
    if score_tokens:
        ids = tokenizer.encode(passage)[:score_tokens]
        what = opts.text or "a passage calibration never saw (Alice IX)"
        print(perplexity_line(*perplexities(flash, dense, ids), what))
    return 0


def cmd_perplexity(opts) -> int:
    from ..perplexity import perplexity

    text = read_text_file(opts.text, "--text")
    model, tokenizer = load_model(opts)
    ids = tokenizer.encode(text)[: opts.max_tokens]
    context = opts.context or min(512, model.max_context)
    started = time.perf_counter()
    result = perplexity(
        model, ids, context, prefill=opts.prefill, progress=sys.stderr.isatty()
    )
    seconds = time.perf_counter() - started
    mode = "dense" if model.plan is None else f"flash, budget {opts.memory_budget}"
    chunks = f"{result['chunks']} chunk{'s' * (result['chunks'] != 1)}"
    print(
        f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
        f"({chunks} of {context}; {model.backend.name} backend, "
        f"{mode}) in {seconds:.1f} s ({result['tokens'] / seconds:.0f} tok/s)"
    )
    if model.plan is not None:
        stats = model.io_stats()
        print(
            f"flash: {format_bytes(stats['bytes_read'])} read in {stats['reads']} "
            "reads, "
            f"hit rate {stats['hit_rate']:.1%}"
        )
    return 0
