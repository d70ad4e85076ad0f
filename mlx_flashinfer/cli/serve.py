"""`flashinfer serve`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import sys

from ..flash.memory import format_bytes, parse_size
from .options import (
    add_generation_options,
    add_model_options,
    add_sampling_options,
    load_model,
    make_sampling,
)


def add_commands(sub) -> None:
    """Register serve."""
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (/v1/chat/completions, "
        "/v1/completions, /v1/models, /health)",
    )
    add_generation_options(p, max_tokens=512, prompt=False)
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    p.add_argument(
        "--port", type=_port, default=8080, help="default 8080; 0: any free port"
    )
    p.add_argument(
        "--prompt-cache-size",
        type=_count,
        metavar="N",
        default=10,
        help="conversations whose prompt caches are kept, the least recently used "
        "dropped first (default 10; 0: none)",
    )
    p.add_argument(
        "--prompt-cache-bytes",
        type=_size,
        metavar="BYTES",
        default=None,
        help="their keys and values at most: bytes or a size like 500MB (default: "
        "no bound beyond --prompt-cache-size; the start line gives the most they "
        "may hold)",
    )
    add_sampling_options(p)
    add_model_options(p)
    p.set_defaults(run=cmd_serve)


def _port(text: str) -> int:
    port = _count(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(
            f"a port is 0..65535 (0: any free port), got {port}"
        )
    return port


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def prompt_cache_line(model, size: int, max_bytes: int | None) -> str:
    """What the kept prompt caches may hold, beside the memory plan (whose KV cache
    is the one of the reply in progress)."""
    from ..model.transformer import kv_cache_bytes

    if size == 0 or max_bytes == 0:
        return "prompt caches: none kept (each request computes its whole prompt)"
    full = kv_cache_bytes(model.args, model.max_context)
    most = size * full if max_bytes is None else min(max_bytes, size * full)
    beside = (
        "the weights and the KV cache of the reply in progress"
        if model.plan is None
        else f"the memory plan's {format_bytes(model.plan.total)} (weights and the "
        "KV cache of the reply in progress)"
    )
    return (
        f"prompt caches: up to {size} conversations kept, at most "
        f"{format_bytes(most)} of keys and values ({format_bytes(full)} each at "
        f"{model.max_context} tokens; --prompt-cache-size, --prompt-cache-bytes), "
        f"beside {beside}"
    )


def cmd_serve(opts) -> int:
    from ..serve.server import check_address, make_server

    make_sampling(opts)  # the defaults' ranges, checked before the model loads
    check_address(opts.host, opts.port)  # a taken port, before the model loads
    model, tokenizer = load_model(opts)
    model_id = opts.model or "default"
    size, max_bytes = opts.prompt_cache_size, opts.prompt_cache_bytes
    server = make_server(
        model,
        tokenizer,
        model_id,
        opts.host,
        opts.port,
        opts,
        prompt_cache_size=size,
        prompt_cache_bytes=max_bytes,
    )
    host, port = server.server_address[:2]
    mode = "dense" if model.plan is None else f"flash, {opts.memory_budget} budget"
    print(
        f"flashinfer serve: {model_id} ({model.backend.name} backend, {mode}) on "
        f"http://{host}:{port}/v1; requests are served one at a time, in arrival "
        "order; Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    line = prompt_cache_line(model, size, max_bytes)
    print(f"flashinfer serve: {line}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; SIGTERM (_sigterm_unwinds)
        pass
    finally:
        server.stop()
    print("flashinfer serve: stopped", file=sys.stderr)
    return 0
