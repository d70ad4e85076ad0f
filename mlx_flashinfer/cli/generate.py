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
    system, ignore = prompt_cache_settings(opts)
    model, tokenizer = load_model(opts)
    cache = open_prompt_cache(opts, model)
    if cache is not None:  # the cached prompt goes on with this one, as in mlx-lm
        prompt = cache.metadata.get("prompt", "") + prompt
    ids = model.check_tokens(prompt_ids(tokenizer, prompt, system, ignore))
    # printed once the prompt has run, so that an error before it is the only line
    notice = model_sparsity_line(opts, model)
    before, last = model.io_stats(), None
    try:
        for last in stream_generate(
            model,
            tokenizer,
            ids,
            max_tokens=opts.max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prompt_cache=cache,
        ):
            if notice:
                print(notice, file=sys.stderr)
                notice = None
            print(last.text, end="", flush=True)
    except KeyboardInterrupt:
        if last is not None:  # end the partial reply's line before "interrupted"
            print(flush=True)
        raise
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
    system, _ = prompt_cache_settings(opts)
    model, tokenizer = load_model(opts)
    cache = open_prompt_cache(opts, model)
    if hasattr(sys.stdin, "reconfigure"):  # bad bytes reach Chat, which says so
        sys.stdin.reconfigure(errors="surrogateescape")
    name = Path(opts.model).name if opts.model else "SmolLM2-135M-Instruct (default)"
    mode = "dense" if model.plan is None else f"flash, {opts.memory_budget} budget"
    print(f"chat with {name} ({model.backend.name} backend, {mode}); /help, q quits")
    if line := model_sparsity_line(opts, model):
        print(line)
    chat = Chat(
        model,
        tokenizer,
        max_tokens=opts.max_tokens,
        system_prompt=system,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=cache,
    )
    chat.run(input)
    return 0


def cmd_cache_prompt(opts) -> int:
    from ..chat import prefix_ids, read_prompt
    from ..generate import generate_step
    from ..prompt_cache import (
        check_cache_destination,
        make_prompt_cache,
        save_prompt_cache,
    )

    check_cache_destination(opts.prompt_cache_file)  # before a long prefill
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
    save_prompt_cache(opts.prompt_cache_file, cache, model, metadata=metadata)
    size = Path(opts.prompt_cache_file).stat().st_size
    print(
        f"cached {len(ids)} prompt tokens in {seconds:.1f} s "
        f"({len(ids) / max(seconds, 1e-9):.0f} tok/s): {opts.prompt_cache_file} "
        f"({format_bytes(size)})"
    )
    return 0


def prompt_cache_settings(opts) -> tuple[str | None, bool]:
    """(system prompt, ignore the chat template) for a prompt: with
    --prompt-cache-file, those the file was made with unless given again.

    Raises:
        FileNotFoundError, ValueError: not a prompt cache file (`cache_metadata`);
            --system-prompt or --ignore-chat-template other than the file's (the
            cache would be computed again, not reused: said rather than done
            quietly).
    """
    ignore = getattr(opts, "ignore_chat_template", False)
    if not opts.prompt_cache_file:
        return opts.system_prompt, ignore
    from ..prompt_cache import cache_metadata

    file = opts.prompt_cache_file
    metadata = cache_metadata(file)
    cached = metadata.get("system_prompt") or None
    if opts.system_prompt is not None and (opts.system_prompt or None) != cached:
        made = f"system prompt {cached!r}" if cached else "no system prompt"
        raise ValueError(
            f"{file} was made with {made}: another --system-prompt would compute "
            "the whole prompt again; drop --system-prompt (the file's is used), or "
            "make a cache with it: flashinfer cache-prompt --system-prompt ..."
        )
    templated = metadata.get("chat_template") != "no"
    if ignore and templated:
        raise ValueError(
            f"{file} was made through the chat template: --ignore-chat-template "
            "would compute the whole prompt again; drop it, or make a cache with "
            "it: flashinfer cache-prompt --ignore-chat-template ..."
        )
    return cached, not templated


def open_prompt_cache(opts, model):
    """The prompt cache --prompt-cache-file names, for `model` (None without one).

    Raises:
        ValueError: a damaged file, or one of another model.
    """
    if not opts.prompt_cache_file:
        return None
    from ..prompt_cache import load_prompt_cache

    return load_prompt_cache(opts.prompt_cache_file, model)
