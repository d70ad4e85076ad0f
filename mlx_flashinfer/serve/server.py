"""`flashinfer serve`: an OpenAI-compatible HTTP server for one model.

    HTTP threads (one per connection)          the generation thread (one)
    read, check, tokenize a request   --queue-->  takes jobs in arrival order,
    stream its tokens back as they come  <------  one at a time, with one prompt cache

One model is loaded and requests are served one at a time, in the order they arrive
(the order their bodies were read and checked): a later request waits in the queue.
The generation thread owns the model and one prompt cache, so a request that extends
the previous conversation computes only its new tokens (`usage.prompt_tokens_details.
cached_tokens` says how many were reused). A client that goes away (mid-stream, or
while it waits) cancels its job: generation stops at the next token.

The standard library's ThreadingHTTPServer, as mlx_lm.server uses: generation is
serialized anyway, so an async framework would add a dependency and serve nothing
faster; HTTP/1.0, one request per connection.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from ..chat import io_delta
from ..generate import make_repetition_penalty, make_sampler, stream_generate
from ..prompt_cache import make_prompt_cache
from . import openai_api
from .openai_api import APIError, CompletionRequest

MAX_BODY = 16 << 20  # bytes; a longer body is refused (413)


@dataclass
class Job:
    """A request in the queue, and the way its results come back.

    events: ("token", GenerationResponse) per token, then ("end", summary) or
        ("error", message); the HTTP thread reads them.
    cancelled: set by the HTTP thread when its client went away.
    """

    request: CompletionRequest
    number: int
    arrived: float = field(default_factory=time.perf_counter)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """The generation thread: the only one that touches the model."""

    def __init__(self, model, tokenizer, defaults, log):
        self.model = model
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.log = log
        self.cache = make_prompt_cache(model)
        self.jobs: queue.Queue = queue.Queue()
        self._submitted = 0
        self._submit_lock = threading.Lock()  # numbers follow the queue's order
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self.thread.start()

    def submit(self, request: CompletionRequest) -> Job:
        with self._submit_lock:
            self._submitted += 1
            job = Job(request, self._submitted)
            self.jobs.put(job)
        return job

    def stop(self, timeout: float = 10.0) -> None:
        """Cut the job in progress at its next token and end the thread."""
        self._stopping.set()
        self.jobs.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set() or self._stopping.is_set():
                job.events.put(("error", "cancelled"))
                continue
            try:
                self._generate(job)
            except Exception as err:  # a failure of this request, not of the server
                self.log(f"request {job.number}: failed: {err!r}")
                job.events.put(("error", f"generation failed: {err}"))

    def _generate(self, job: Job) -> None:
        request, d = job.request, self.defaults
        seed = d.seed if request.seed is None else request.seed
        sampler = make_sampler(
            request.temperature, request.top_p, d.top_k, d.min_p, seed
        )
        processors = []
        if d.repetition_penalty is not None:
            size = d.repetition_context_size
            processors.append(make_repetition_penalty(d.repetition_penalty, size))
        started, before, last = time.perf_counter(), self.model.io_stats(), None
        for last in stream_generate(
            self.model,
            self.tokenizer,
            request.ids,
            request.max_tokens,
            sampler,
            processors,
            stop=request.stop,
            prompt_cache=self.cache,
        ):
            job.events.put(("token", last))
            if job.cancelled.is_set() or self._stopping.is_set():
                break
        seconds = time.perf_counter() - started
        summary = {
            "request": job.number,
            "queued_s": round(started - job.arrived, 4),
            "seconds": round(seconds, 4),
            "flash": io_delta(before, self.model.io_stats()),
        }
        job.events.put(("end", summary))
        if last is not None:
            state = "cancelled" if job.cancelled.is_set() else last.finish_reason
            state = state or "cut: the server stops"
            self.log(
                f"request {job.number}: {last.prompt_tokens} prompt tokens "
                f"({last.cached_tokens} cached), {last.generation_tokens} generated "
                f"in {seconds:.2f} s ({state})"
            )


class Server(ThreadingHTTPServer):
    """The HTTP side: holds what the handlers share."""

    daemon_threads = True  # a stuck client never holds the process at exit

    def __init__(self, address, model, tokenizer, model_id: str, defaults, log):
        # IPv4 or IPv6, as the host names it
        family, *_ = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0]
        self.address_family = family
        super().__init__(address, Handler)
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.defaults = defaults
        self.created = int(time.time())
        self.log = log
        self.worker = Worker(model, tokenizer, defaults, log)

    def stop(self) -> None:
        self.worker.stop()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: Server
    timeout = 60  # seconds a client may take to send its request
    server_version = "flashinfer"

    # -- routes ------------------------------------------------------------------------
    def do_GET(self) -> None:
        model = {
            "id": self.server.model_id,
            "object": "model",
            "created": self.server.created,
            "owned_by": "mlx-flashinfer",
        }
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [model]})
        elif self.path.startswith("/v1/models/"):
            name = unquote(self.path.removeprefix("/v1/models/"))
            if name == self.server.model_id:
                self._json(200, model)
            else:
                self._error(
                    APIError(
                        404,
                        f"the model {name!r} does not exist",
                        "model",
                        "model_not_found",
                    )
                )
        else:
            self._unknown_path()

    def do_POST(self) -> None:
        kind = {"/v1/chat/completions": "chat", "/v1/completions": "text"}.get(
            self.path
        )
        if kind is None:
            self._unknown_path()
            return
        s = self.server
        try:
            body = openai_api.parse_body(self._read_body())
            request = openai_api.parse_request(
                kind, body, s.model, s.tokenizer, s.model_id, s.defaults
            )
        except APIError as err:
            self._error(err)
            return
        except OSError:  # the client left or stalled while sending its request
            return
        job = s.worker.submit(request)
        try:
            if request.stream:
                self._stream(job)
            else:
                self._complete(job)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            job.cancelled.set()  # the client went away: stop its generation

    def do_PUT(self) -> None:
        self._error(APIError(405, f"method {self.command} not allowed on {self.path}"))

    do_DELETE = do_PATCH = do_PUT

    def log_message(self, format: str, *args) -> None:
        self.server.log(f"{self.address_string()} {format % args}")

    # -- the two ways to answer --------------------------------------------------------
    def _complete(self, job: Job) -> None:
        text, last, summary = "", None, None
        for kind, value in self._events(job):
            if kind == "token":
                text, last = text + value.text, value
            elif kind == "end":
                summary = value
            else:
                self._error(APIError(500, value, kind="server_error"))
                return
        if summary is None:  # the client went away
            return
        self._json(
            200,
            openai_api.completion(
                job.request,
                self.server.model_id,
                self.server.created,
                text,
                last.finish_reason,
                _usage(last),
                summary,
            ),
        )

    def _stream(self, job: Job) -> None:
        request, s = job.request, self.server
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if request.kind == "chat":
            self._event(openai_api.chunk(request, s.model_id, s.created, "", role=True))
        last = None
        for kind, value in self._events(job):
            if kind == "token":
                last = value
                if value.text and not value.finish_reason:
                    self._event(self._chunk(job, value.text))
            elif kind == "end":  # the last chunk carries the flash I/O of the request
                text = last.text if last.finish_reason else ""
                final = self._chunk(job, text, last.finish_reason)
                self._event(final | {"flashinfer": value})
                if request.include_usage:
                    self._event(self._chunk(job, None) | {"usage": _usage(last)})
            else:
                self._event(APIError(500, value, kind="server_error").body())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _chunk(self, job: Job, text: str | None, finish: str | None = None) -> dict:
        s = self.server
        return openai_api.chunk(job.request, s.model_id, s.created, text, finish)

    def _events(self, job: Job):
        """The job's events until its end; cancels it when the client goes away."""
        while True:
            try:
                kind, value = job.events.get(timeout=0.2)
            except queue.Empty:
                if self._client_gone():
                    job.cancelled.set()
                    return
                continue
            yield kind, value
            if kind != "token":
                return
            if self._client_gone():
                job.cancelled.set()
                return

    def _client_gone(self) -> bool:
        """Whether the client closed its side (it sends nothing more after its
        request, so a readable socket with no data means it left)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True

    # -- plumbing ----------------------------------------------------------------------
    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "a Content-Length header is required")
        try:
            size = int(length)
        except ValueError:
            raise APIError(400, f"bad Content-Length {length!r}") from None
        if not 0 <= size <= MAX_BODY:
            raise APIError(413, f"the body is {size} bytes, at most {MAX_BODY}")
        raw = self.rfile.read(size)
        if len(raw) < size:
            raise APIError(400, f"the body ended after {len(raw)} of {size} bytes")
        return raw

    def _unknown_path(self) -> None:
        self._error(
            APIError(
                404, f"unknown path: {self.command} {self.path}", None, "unknown_url"
            )
        )

    def _error(self, err: APIError) -> None:
        self._json(err.status, err.body())

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()


def _usage(last) -> dict:
    return openai_api.usage(
        last.prompt_tokens, last.generation_tokens, last.cached_tokens
    )


def make_server(
    model, tokenizer, model_id: str, host: str, port: int, defaults, log=None
) -> Server:
    """A server bound to host:port (0: any free port; `server.server_address` has
    it), its generation thread started; `serve_forever()` answers.

    Raises:
        ValueError: the address cannot be listened on.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        return Server((host, port), model, tokenizer, model_id, defaults, log)
    except OSError as err:
        raise ValueError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; choose another "
            "--host or --port"
        ) from None
