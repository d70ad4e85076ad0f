"""`flashinfer serve`: the OpenAI-compatible server."""

from __future__ import annotations

import sys

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
        "--port", type=int, default=8080, help="default 8080; 0: any free port"
    )
    add_sampling_options(p)
    add_model_options(p)
    p.set_defaults(run=cmd_serve)


def cmd_serve(opts) -> int:
    from ..serve.server import make_server

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
