"""`flashinfer generate`, `chat` and `cache-prompt`: replies from a model, and
prompts prefilled once."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..flash.memory import format_bytes
from .options import (
    add_generation_options,
    add_model_options,
    add_prompt_cache_option,
    add_sampling_options,
    load_model,
    make_sampling,
    model_sparsity_line,
)


def add_commands(sub) -> None:
    """Register generate, chat and cache-prompt."""
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


def cmd_generate(opts) -> int:
    from ..chat import io_delta, prompt_ids, read_prompt, stats_lines
    from ..generate import context_full, stream_generate

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
    from ..chat import Chat

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
    from ..chat import prefix_ids, read_prompt
    from ..generate import generate_step
    from ..prompt_cache import make_prompt_cache, save_prompt_cache

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
    from ..prompt_cache import load_prompt_cache

    cache = load_prompt_cache(opts.prompt_cache_file, model)
    metadata = cache.metadata
    system = opts.system_prompt
    if system is None:
        system = metadata.get("system_prompt") or None
    ignore = getattr(opts, "ignore_chat_template", False)
    return cache, system, ignore or metadata.get("chat_template") == "no"
