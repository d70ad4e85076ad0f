"""The `flashinfer` command line: one subcommand per job, user errors as one line +
exit 2."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from .bench.cli import add_bench_command
from .flash.memory import format_bytes
from .formats.layout import DTYPES, Layout
from .model.backends import BACKENDS
from .predictors.kinds import PREDICTORS, trained_kind
from .predictors.report import predictor_table, sparsity_line

# User mistakes print one line and exit 2; anything else is a bug and keeps its
# traceback. OSError covers the disk's refusals too: read-only, full, busy.
USER_ERRORS = (ValueError, OSError, ImportError)
# what to do about the system's refusals, by errno; ELSEWHERE is filled in per command
_OS_HINTS = {
    errno.EROFS: "write {elsewhere}",
    errno.ENOSPC: "free some space, or write {elsewhere}",
    errno.EDQUOT: "free some space, or write {elsewhere}",
    errno.EBUSY: "a mount point or a directory in use: choose another path",
    errno.EACCES: "check its permissions, or write {elsewhere}",
}


def error_line(err: BaseException, command: str = "") -> str:
    """The one line a user error prints: an OSError of the system as `path: what;
    what to do`, any other message with its newlines folded."""
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        elsewhere = (
            "to another DST"
            if command == "convert"
            else "elsewhere: --cache-dir or $MLX_FLASHINFER_CACHE"
        )
        where = f"{err.filename}: " if err.filename is not None else ""
        hint = _OS_HINTS.get(err.errno, "").format(elsewhere=elsewhere)
        text = f"{where}{err.strerror}" + (f"; {hint}" if hint else "")
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def cmd_convert(opts) -> int:
    from .formats.convert import convert
    from .formats.default_model import default_gguf_path

    src = opts.src
    if src == "default":  # a folder named so is "./default"
        src = default_gguf_path()
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
    return line


def cmd_inspect(opts) -> int:
    from .formats.tokenizer import load_tokenizer
    from .loader import resolve_model

    layout = Layout.open(resolve_model(opts.model, opts.cache_dir))
    load_tokenizer(layout)  # parses, with its chat template
    args = layout.args
    total = layout.resident_bytes + layout.ffn_bytes
    act = args.hidden_act + ("" if args.is_relu_family else "; sparsity is approximate")
    tok = layout.manifest.get("tokenizer") or {}
    rows = [
        ("path", str(layout.path)),
        ("family", f"{args.family} ({act})"),
        ("layers", args.num_hidden_layers),
        ("d_model", args.hidden_size),
        ("ffn neurons", f"{args.intermediate_size} per layer"),
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
        (
            "resident",
            f"{format_bytes(layout.resident_bytes)} "
            f"({100 * layout.resident_bytes / total:.0f}%)",
        ),
        (
            "ffn",
            f"{format_bytes(layout.ffn_bytes)} ({100 * layout.ffn_bytes / total:.0f}%)",
        ),
        ("predictor", trained_kind(layout) or "none"),
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
    if opts.budget:
        from .loader import default_predictor, make_plan

        predictor = opts.predictor or default_predictor(layout)
        plan = make_plan(
            layout, opts.budget, predictor, opts.max_context, **lookahead_option(opts)
        )
        print(f"\nmemory plan for --budget {opts.budget} (predictor {predictor}):")
        plan_rows = plan.rows(args.intermediate_size)
        plan_width = max(len(k) for k, _ in plan_rows)
        for key, value in plan_rows:
            print(f"  {key:<{plan_width}}  {value}")
        if len(set(plan.capacity)) > 1:
            print(
                "  cache rows per layer, sized by each layer's share of predicted "
                "neurons (the predictor's report):"
            )
            if opts.verbose:
                print("  " + " ".join(str(c) for c in plan.capacity))
            else:
                print("  (-v lists them)")
    return 0


def cmd_perplexity(opts) -> int:
    from .perplexity import perplexity

    text = Path(opts.text).read_text(encoding="utf-8")
    model, tokenizer = load_model(opts)
    ids = tokenizer.encode(text)
    if opts.max_tokens:
        ids = ids[: opts.max_tokens]
    context = opts.context or min(512, model.max_context)
    started = time.perf_counter()
    result = perplexity(
        model, ids, context, prefill=opts.prefill, progress=sys.stderr.isatty()
    )
    seconds = time.perf_counter() - started
    mode = "dense" if model.plan is None else f"flash, budget {opts.memory_budget}"
    print(
        f"perplexity {result['perplexity']:.4f} over {result['tokens']} tokens "
        f"({result['chunks']} chunks of {context}; {model.backend.name} backend, "
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


def cmd_generate(opts) -> int:
    from .chat import io_delta, prompt_ids, read_prompt, stats_lines
    from .generate import context_full, stream_generate

    sampler, processors = make_sampling(opts)
    prompt = read_prompt(opts.prompt)
    model, tokenizer = load_model(opts)
    if line := model_sparsity_line(opts, model):
        print(line, file=sys.stderr)
    cache, system, ignore = open_prompt_cache(opts, model)
    if cache is not None:  # the cached prompt goes on with this one, as in mlx-lm
        prompt = cache.metadata.get("prompt", "") + prompt
    ids = prompt_ids(tokenizer, prompt, system, ignore)
    before, last = model.io_stats(), None
    for last in stream_generate(
        model,
        tokenizer,
        ids,
        opts.max_tokens,
        sampler,
        processors,
        prompt_cache=cache,
    ):
        print(last.text, end="", flush=True)
    print()
    if last is not None and context_full(model, last):
        limit = model.args.max_position_embeddings
        raise_it = (
            f"; raise --max-context, up to the model's {limit}"
            if model.max_context < limit
            else ""
        )
        print(
            f"(reply cut: the context of {model.max_context} tokens is full{raise_it})",
            file=sys.stderr,
        )
    if opts.stats and last is not None:
        print("==========")
        print("\n".join(stats_lines(last, io_delta(before, model.io_stats()))))
    return 0


def cmd_chat(opts) -> int:
    from .chat import Chat

    sampler, processors = make_sampling(opts)
    model, tokenizer = load_model(opts)
    cache, system, _ = open_prompt_cache(opts, model)
    if hasattr(sys.stdin, "reconfigure"):  # bad bytes reach Chat, which says so
        sys.stdin.reconfigure(errors="surrogateescape")
    name = Path(opts.model).name if opts.model else "SmolLM2-135M-Instruct (default)"
    mode = "dense" if model.plan is None else f"flash, {opts.memory_budget} budget"
    print(f"chat with {name} ({model.backend.name} backend, {mode}); /help, q quits")
    if line := model_sparsity_line(opts, model):
        print(line)
    chat = Chat(
        model, tokenizer, opts.max_tokens, system, sampler, processors, None, cache
    )
    chat.run(input)
    return 0


def cmd_cache_prompt(opts) -> int:
    from .chat import prefix_ids, read_prompt
    from .generate import generate_step
    from .prompt_cache import make_prompt_cache, save_prompt_cache

    prompt = read_prompt(opts.prompt)
    model, tokenizer = load_model(opts)
    ignore = opts.ignore_chat_template or tokenizer.chat_template is None
    ids = prefix_ids(tokenizer, prompt, opts.system_prompt, ignore)
    cache = make_prompt_cache(model)
    started = time.perf_counter()
    for _ in generate_step(model, ids, max_tokens=0, prompt_cache=cache):
        pass
    seconds = time.perf_counter() - started
    metadata = {
        "model": opts.model or "default",
        "prompt": prompt,
        "system_prompt": opts.system_prompt or "",
        "chat_template": "no" if ignore else "yes",
    }
    save_prompt_cache(opts.prompt_cache_file, cache, model, metadata)
    size = Path(opts.prompt_cache_file).stat().st_size
    print(
        f"cached {len(ids)} prompt tokens in {seconds:.1f} s "
        f"({len(ids) / max(seconds, 1e-9):.0f} tok/s): {opts.prompt_cache_file} "
        f"({format_bytes(size)})"
    )
    return 0


def open_prompt_cache(opts, model) -> tuple:
    """(prompt cache or None, system prompt, ignore the chat template) from
    --prompt-cache-file and the options: the file's system prompt and template
    choice unless given again."""
    if not opts.prompt_cache_file:
        return None, opts.system_prompt, getattr(opts, "ignore_chat_template", False)
    from .prompt_cache import load_prompt_cache

    cache = load_prompt_cache(opts.prompt_cache_file, model)
    metadata = cache.metadata
    system = opts.system_prompt
    if system is None:
        system = metadata.get("system_prompt") or None
    ignore = getattr(opts, "ignore_chat_template", False)
    return cache, system, ignore or metadata.get("chat_template") == "no"


def cmd_serve(opts) -> int:
    from .serve.server import make_server

    make_sampling(opts)  # the defaults' ranges, checked before the model loads
    model, tokenizer = load_model(opts)
    model_id = opts.model or "default"
    server = make_server(model, tokenizer, model_id, opts.host, opts.port, opts)
    host, port = server.server_address[:2]
    mode = "dense" if model.plan is None else f"flash, {opts.memory_budget} budget"
    print(
        f"flashinfer serve: {model_id} ({model.backend.name} backend, {mode}) on "
        f"http://{host}:{port}/v1; requests are served one at a time, in arrival "
        "order; Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; SIGTERM (_sigterm_unwinds)
        pass
    finally:
        server.stop()
    print("flashinfer serve: stopped", file=sys.stderr)
    return 0


def cmd_verify(opts) -> int:
    from .chat import prompt_ids, read_prompt
    from .loader import default_predictor, load, resolve_model
    from .predictors.texts import verify_text
    from .verify import compare, perplexities, perplexity_line, report_lines

    if opts.perplexity_tokens < 0:
        raise ValueError(
            f"--perplexity-tokens must be >= 0, got {opts.perplexity_tokens}"
        )
    prompt = read_prompt(opts.prompt)
    path = resolve_model(opts.model, opts.cache_dir)
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
        **lookahead_option(opts),
        **shared,
    )
    ids = prompt_ids(tokenizer, prompt, opts.system_prompt, opts.ignore_chat_template)
    result = compare(flash, dense, ids, opts.max_tokens, tokenizer.eos_token_ids)
    layout = Layout.open(path)
    print(
        f"verify: {result.steps} decode steps, flash (budget {budget}, window "
        f"{opts.window}, predictor {opts.predictor or default_predictor(layout)}) "
        f"against dense, {dense.backend.name} backend, greedy, teacher-forced on the "
        "dense tokens"
    )
    print("\n".join(report_lines(result, tokenizer, dense.args, layout.ffn_bytes)))
    if line := sparsity_line(flash, layout):
        print(line)
    if opts.perplexity_tokens:
        passage = tokenizer.encode(verify_text())[: opts.perplexity_tokens]
        scores = perplexities(flash, dense, passage)
        print(perplexity_line(*scores, "a passage calibration never saw (Alice IX)"))
    return 0


def cmd_train_predictor(opts) -> int:
    from .loader import resolve_model
    from .predictors.train import parse_max_loss, train_predictor

    max_loss = None if opts.max_loss is None else parse_max_loss(opts.max_loss)
    kind = opts.kind
    if (opts.rank, opts.last_rank) != (None, None):  # a rank asks for low rank
        if kind == "lowbit":
            raise ValueError("--rank and --last-rank apply to --kind lowrank only")
        kind = "lowrank"
    texts = [Path(f).read_text(encoding="utf-8") for f in opts.text or []]
    path = resolve_model(opts.model)  # "default": the embedded model's cached layout
    section = train_predictor(
        path,
        texts=texts or None,
        tokens=opts.tokens,
        kind=kind,
        rank=64 if opts.rank is None else opts.rank,
        last_rank=opts.last_rank,
        recall=opts.recall,
        max_loss=max_loss,
        silu_sparsity=opts.sparsity,
        backend=opts.backend,
        memory_budget=opts.memory_budget,
        seed=opts.seed,
        progress=sys.stderr.isatty(),
    )
    print("\n".join(predictor_table(section)))
    print(
        f"trained on {section['tokens']} tokens ({section['source']}) in "
        f"{section['seconds']:.1f} s; stored in {Path(path) / section['file']}"
    )
    return 0


def make_sampling(opts) -> tuple:
    """(sampler, logits processors) from the sampling options.

    Raises:
        ValueError: an option out of range.
    """
    from .generate import make_repetition_penalty, make_sampler

    for name in ("max_tokens", "repetition_context_size"):
        if getattr(opts, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= 1, got {getattr(opts, name)}")
    sampler = make_sampler(opts.temp, opts.top_p, opts.top_k, opts.min_p, opts.seed)
    size, penalty = opts.repetition_context_size, opts.repetition_penalty
    processors = [] if penalty is None else [make_repetition_penalty(penalty, size)]
    return sampler, processors


def add_generation_options(
    p: argparse.ArgumentParser, max_tokens: int | None, prompt: bool = True
) -> None:
    """--model, the prompt and its length (none: no reply), named as mlx-lm
    names them."""
    p.add_argument(
        "--model",
        default=None,
        help="layout directory, Hugging Face folder, .gguf file or 'default' "
        "(default: the embedded SmolLM2-135M-Instruct; a folder named default: "
        "./default)",
    )
    if prompt:
        p.add_argument("-p", "--prompt", required=True, help="'-' reads stdin")
        p.add_argument(
            "--ignore-chat-template",
            action="store_true",
            help="use the raw prompt (with BOS as the model expects)",
        )
    if max_tokens is not None:
        p.add_argument("-m", "--max-tokens", type=int, default=max_tokens)
    p.add_argument("--system-prompt", default=None)


def add_prompt_cache_option(p: argparse.ArgumentParser, required: bool = False):
    help = (
        "the file to save the prompt cache in"
        if required
        else "start from a prompt cache saved by cache-prompt: its prompt is "
        "prefilled already (generate: --prompt goes on from it; chat: its system "
        "prompt)"
    )
    p.add_argument("--prompt-cache-file", required=required, default=None, help=help)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temp", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: no limit")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--repetition-context-size", type=int, default=20)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options choosing the backend and, for flash mode, the memory plan."""
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="default: mlx on Apple silicon, else numpy",
    )
    p.add_argument(
        "--memory-budget",
        default=None,
        help="run from flash within this budget: bytes, 1.5GB or 50%% "
        "(default: dense, every weight in memory)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=4,
        help="tokens whose neurons stay cached (flash mode; default 4)",
    )
    p.add_argument(
        "--predictor",
        choices=PREDICTORS,
        default=None,
        help="neuron predictor (flash mode; default: the trained one, else gate)",
    )
    p.add_argument(
        "--predictor-threshold",
        type=float,
        default=None,
        help="lowrank predictor's probability cut (default: as trained)",
    )
    p.add_argument("--threads", type=int, default=None, help="flash reader threads")
    p.add_argument(
        "--lookahead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flash mode: read each layer's guessed neurons while the layer before "
        "computes (a second read buffer in the budget; the answer is the same)",
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="tokens the KV cache holds (default: model limit or 4096)",
    )
    add_cache_option(p)


def add_cache_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where checkpoints are converted on first use "
        "(default: $MLX_FLASHINFER_CACHE or ~/.cache/mlx-flashinfer)",
    )


def model_sparsity_line(opts, model) -> str | None:
    """`sparsity_report.sparsity_line` of the model the options name."""
    if model.plan is None:
        return None
    from .loader import resolve_model

    return sparsity_line(model, Layout.open(resolve_model(opts.model, opts.cache_dir)))


def load_model(opts):
    from .loader import load

    return load(
        opts.model,
        backend=opts.backend,
        memory_budget=opts.memory_budget,
        window=opts.window,
        predictor=opts.predictor,
        threads=opts.threads,
        max_context=opts.max_context,
        predictor_threshold=opts.predictor_threshold,
        cache_dir=opts.cache_dir,
        **lookahead_option(opts),
    )


def lookahead_option(opts) -> dict:
    """`lookahead=` for load() when the user chose (else load's default)."""
    return {} if opts.lookahead is None else {"lookahead": opts.lookahead}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flashinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("convert", help="convert a Hugging Face dir or GGUF to a layout")
    p.add_argument(
        "src",
        help="Hugging Face directory, .gguf file, or 'default' "
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

    p = sub.add_parser("generate", help="generate text from a prompt, streamed")
    add_generation_options(p, max_tokens=100)
    add_sampling_options(p)
    p.add_argument(
        "--stats",
        action="store_true",
        help="end with speed, peak memory and flash reads per token",
    )
    add_prompt_cache_option(p)
    add_model_options(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model in the terminal")
    add_generation_options(p, max_tokens=256, prompt=False)
    add_sampling_options(p)
    add_prompt_cache_option(p)
    add_model_options(p)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser(
        "cache-prompt",
        help="prefill a prompt once and save its KV cache (--prompt-cache-file)",
    )
    add_generation_options(p, max_tokens=None)
    add_prompt_cache_option(p, required=True)
    add_model_options(p)
    p.set_defaults(run=cmd_cache_prompt)

    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (/v1/chat/completions, "
        "/v1/completions, /v1/models, /health)",
    )
    add_generation_options(p, max_tokens=512, prompt=False)
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    p.add_argument(
        "--port", type=int, default=8080, help="default 8080; 0: any free port"
    )
    add_sampling_options(p)
    add_model_options(p)
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("verify", help="flash against dense (flash budget: 100%%)")
    add_generation_options(p, max_tokens=32)
    p.add_argument(
        "--perplexity-tokens",
        type=int,
        default=128,
        help="also score this many tokens of a built-in passage with both "
        "(0: skip; default 128)",
    )
    add_model_options(p)
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("train-predictor", help="train the neuron predictor")
    p.add_argument(
        "model", help="layout directory, or default (the embedded model's layout)"
    )
    p.add_argument(
        "--text",
        action="append",
        help="calibration text file (repeatable; default: chapters I-VI of Alice's "
        "Adventures in Wonderland, shipped with the package)",
    )
    p.add_argument(
        "--tokens", type=int, default=4096, help="calibration tokens (default 4096)"
    )
    p.add_argument(
        "--kind",
        choices=("lowbit", "lowrank"),
        default=None,
        help="lowbit: 4-bit copies of gate and up, which rank a SiLU model's neurons "
        "well (default for SiLU models; ~19%% of a float16 FFN in DRAM); lowrank: "
        "the paper's small trained predictor (ReLU-family models' only kind)",
    )
    p.add_argument(
        "--rank", type=int, default=None, help="lowrank: rank of every layer (64)"
    )
    p.add_argument(
        "--last-rank",
        type=int,
        default=None,
        help="lowrank: rank of the last eighth of the layers (the most active)",
    )
    p.add_argument(
        "--recall",
        type=float,
        default=0.99,
        help="each layer's cut keeps this share of the neurons that matter, on "
        "calibration text it did not train on (default 0.99)",
    )
    p.add_argument(
        "--max-loss",
        default=None,
        metavar="PCT",
        help="instead of --recall: choose each layer's cut so that perplexity on "
        "calibration text rises by at most PCT percent (e.g. 3%%), skipping most "
        "where layers tolerate it",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="SiLU models: per token, the fraction of neurons counted as not "
        "mattering (the smallest |silu(gate) x up|; default 0.5)",
    )
    p.add_argument("--backend", choices=BACKENDS, default=None)
    p.add_argument(
        "--memory-budget",
        default=None,
        help="refuse to start if calibration would hold more than this (bytes, "
        "1.5GB or 50%%); it holds the resident weights, one FFN layer and the "
        "calibration tokens' activations",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_train_predictor)

    p = sub.add_parser("perplexity", help="perplexity of a text file")
    p.add_argument("--model", required=True, help="model spec, as for generate")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument(
        "--max-tokens", type=int, default=0, help="score only the first N tokens"
    )
    p.add_argument("--context", type=int, default=0, help="chunk length (default 512)")
    p.add_argument(
        "--prefill",
        type=int,
        default=0,
        help="tokens of each chunk run as a prompt; the rest run one decode "
        "step each, through the flash path (default: the whole chunk)",
    )
    add_model_options(p)
    p.set_defaults(run=cmd_perplexity)
    add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        with _sigterm_unwinds(), warnings.catch_warnings():
            # inf and nan are reported once, naming the layer (nonfinite.py)
            warnings.filterwarnings(
                "ignore",
                "(overflow|invalid value|divide by zero) encountered",
                RuntimeWarning,
            )
            return opts.run(opts)
    except BrokenPipeError:  # e.g. `flashinfer generate ... | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except USER_ERRORS as err:
        line = error_line(err, opts.command)
        print(f"flashinfer {opts.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flashinfer {opts.command}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM raises SystemExit, so cleanups (a conversion's staging directory) run
    as they do for Ctrl-C; by default it ends the process on the spot."""

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
