"""`flashinfer serve`: an OpenAI-compatible HTTP server for one model.

    HTTP threads (one per connection)          the generation thread (one)
    read, check, tokenize a request   --queue-->  takes jobs in arrival order,
    stream its tokens back as they come  <------  one at a time, with its prompt caches

One model is loaded and requests are served one at a time, in the order they arrive
(the order their bodies were read and checked): a later request waits in the queue.
The generation thread owns the model and the prompt caches of the last few
conversations (`LRUPromptCache`: --prompt-cache-size of them, --prompt-cache-bytes at
most), so a request that goes on with any of them computes only its new tokens
(`usage.prompt_tokens_details.cached_tokens` says how many were reused). A client
that goes away (mid-stream, or while it waits) cancels its job: generation stops at
the next token.

How a stream ends. A finished reply ends as OpenAI's do: a last chunk whose
`finish_reason` is "stop" or "length", the usage chunk when asked for, then
`data: [DONE]`. A reply cut short (the server stopping, Ctrl-C or SIGTERM; or its
generation failing) ends with an error event, `data: {"error": {...}}` (type
"server_error"; code "server_stopped" when the server stops), and no [DONE]: no
chunk carries a finish_reason, so no client takes a cut reply for a whole one.
OpenAI reports mid-stream failures with that error object (its Python client
raises `APIError` on it); mlx_lm.server closes the connection without [DONE];
finish_reason keeps OpenAI's values, which strict clients check. A reply not
streamed gets the same error as its JSON body (503 when the server stops, 500).

The standard library's ThreadingHTTPServer, as mlx_lm.server uses: generation is
serialized anyway, so an async framework would add a dependency and serve nothing
faster; HTTP/1.0, one request per connection. Every error, the parser's own
(a malformed request line, an unsupported method) included, is OpenAI's error JSON.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from ..prompt_cache import LRUPromptCache
from . import openai_api
from .openai_api import APIError
from .worker import Job, Worker

MAX_BODY = 16 << 20  # bytes; a longer body is refused (413)
_LINE = 1024  # bytes of a chunk-size or trailer line of a chunked body
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_log_lock = threading.Lock()


def stderr_log(line: str) -> None:
    """Write one log line to stderr whole: `print` writes the text and its newline
    apart, and the HTTP and generation threads' lines ran into each other."""
    with _log_lock:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class Server(ThreadingHTTPServer):
    """The HTTP side: holds what the handlers share."""

    daemon_threads = True  # a stuck client never holds the process at exit

    def __init__(
        self,
        address,
        model,
        tokenizer,
        model_id: str,
        defaults,
        log,
        prompt_cache_size: int = 10,
        prompt_cache_bytes: int | None = None,
    ):
        # IPv4 or IPv6, as the host names it
        family, *_ = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0]
        self.address_family = family
        super().__init__(address, Handler)
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.defaults = defaults
        self.created = int(time.time())  # the model's `created` in /v1/models
        self.log = log
        self._answers = 0  # requests whose reply is being written
        self._answered = threading.Condition()
        self.worker = Worker(
            model, tokenizer, defaults, log, prompt_cache_size, prompt_cache_bytes
        )

    @property
    def answers_in_progress(self) -> int:
        return self._answers

    @contextlib.contextmanager
    def answering(self):
        """Count a reply being written, so that `stop` lets it end."""
        with self._answered:
            self._answers += 1
        try:
            yield
        finally:
            with self._answered:
                self._answers -= 1
                self._answered.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Cut the reply in progress, refuse the queued ones, and wait (at most
        `timeout` seconds) for their HTTP threads to write how they ended."""
        deadline = time.monotonic() + timeout
        self.worker.stop(timeout)
        with self._answered:
            left = max(0.0, deadline - time.monotonic())
            self._answered.wait_for(lambda: self._answers == 0, left)
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: Server
    timeout = 60  # seconds a client may take to send its request
    server_version = "flashinfer"
    body_unread = False  # refused before its body was read: `finish` drains it

    # -- routes ------------------------------------------------------------------------
    def do_GET(self) -> None:
        model = {
            "id": self.server.model_id,
            "object": "model",
            "created": self.server.created,
            "owned_by": "mlx-flashinfer",
        }
        if self.path == "/health":
            stats = self.server.worker.cache_stats
            self._json(200, {"status": "ok", "prompt_cache": stats})
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
            self.body_unread = True
            self._unknown_path()
            return
        s = self.server
        try:
            self.body_unread = True
            raw = self._read_body()
            self.body_unread = False
            body = openai_api.parse_body(raw)
            request = openai_api.parse_request(
                kind, body, s.model, s.tokenizer, s.model_id, s.defaults
            )
        except APIError as err:
            self._error(err)
            return
        except OSError:  # the client left or stalled while sending its request
            return
        with s.answering():
            job = s.worker.submit(request)
            try:
                if request.stream:
                    self._stream(job)
                else:
                    self._complete(job)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                job.cancelled.set()  # the client went away: stop its generation

    def do_PUT(self) -> None:
        self.body_unread = True
        self._error(APIError(405, f"method {self.command} not allowed on {self.path}"))

    do_DELETE = do_PATCH = do_PUT

    def send_error(self, code: int, message=None, explain=None) -> None:
        """The standard library's parser refuses a request here (a malformed request
        line, an unsupported method, headers too long): as OpenAI's error JSON, not
        its HTML page."""
        message = message or self.responses.get(code, ("error",))[0]
        if explain is not None:
            message = f"{message}: {explain}"
        self.log_error("code %d, message %s", code, message)
        # an unparsed request line leaves HTTP/0.9, which has no status line
        if self.request_version in ("HTTP/0.9", ""):
            self.request_version = "HTTP/1.0"
        self.body_unread = True  # all of them about the request, 501 and 505 too
        self._json(code, APIError(code, message).body(), close=True)

    def finish(self) -> None:
        super().finish()
        if self.body_unread:
            self._drain()

    def _drain(self, limit: int = MAX_BODY, seconds: float = 2.0) -> None:
        """Read (and drop) what the client still sends after a refusal, up to
        `limit` bytes and `seconds`: closing a socket with unread bytes sends a
        reset, which can destroy the reply before the client has read it."""
        deadline = time.monotonic() + seconds
        try:
            self.connection.shutdown(socket.SHUT_WR)  # the reply is whole
            while limit > 0 and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                data = self.connection.recv(65536)
                if not data:
                    return
                limit -= len(data)
        except OSError:  # the client left, or the time is up
            return

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
                self._error(value)
                return
        if summary is None:  # the client went away
            return
        self._json(
            200,
            openai_api.completion(
                job.request,
                self.server.model_id,
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
            self._event(openai_api.chunk(request, s.model_id, "", role=True))
        last = None
        for kind, value in self._events(job):
            if kind == "token":
                last = value
                if value.text and not value.finish_reason:
                    self._event(self._chunk(job, value.text))
            elif kind == "end":  # the last chunk carries the flash I/O of the request
                final = self._chunk(job, last.text, last.finish_reason)
                self._event(final | {"flashinfer": value})
                if request.include_usage:
                    self._event(self._chunk(job, None) | {"usage": _usage(last)})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            else:  # cut: the error, and no [DONE] (see the module's docstring)
                self._event(value.body())

    def _chunk(self, job: Job, text: str | None, finish: str | None = None) -> dict:
        return openai_api.chunk(job.request, self.server.model_id, text, finish)

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
        """The request's body, sized by Content-Length or sent chunked.

        Raises:
            APIError: no size, a bad one, over MAX_BODY, or a body cut short.
        """
        lengths = self.headers.get_all("Content-Length") or []
        coding = self.headers.get("Transfer-Encoding")
        if coding is not None:
            if lengths:  # which one frames the body? (RFC 9112 6.1: refuse)
                raise APIError(
                    400,
                    "a request has a Content-Length or a Transfer-Encoding, not both",
                )
            if coding.strip().lower() != "chunked":
                raise APIError(
                    501,
                    f"Transfer-Encoding {coding!r} is not supported: send the body "
                    "chunked or with a Content-Length",
                )
            return self._read_chunked()
        if not lengths:
            raise APIError(
                411,
                "a Content-Length header (or Transfer-Encoding: chunked) is required",
            )
        length = lengths[0].strip()
        if len(set(lengths)) > 1 or not (length.isascii() and length.isdigit()):
            shown = ", ".join(lengths)
            raise APIError(400, f"bad Content-Length {shown!r}: not a byte count")
        size = int(length)
        if size > MAX_BODY:
            raise APIError(413, f"the body is {size} bytes, at most {MAX_BODY}")
        raw = self.rfile.read(size)
        if len(raw) < size:
            raise APIError(400, f"the body ended after {len(raw)} of {size} bytes")
        return raw

    def _read_chunked(self) -> bytes:
        """A chunked body (RFC 9112 7.1): chunks of `size-in-hex CRLF data CRLF`,
        a chunk of size 0, trailer lines (ignored) and an empty line."""
        body = bytearray()
        while True:
            line = self.rfile.readline(_LINE + 1)
            size_text = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not _HEX.fullmatch(size_text):
                raise APIError(
                    400, f"bad chunk size line {line[:40]!r} in a chunked body"
                )
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > MAX_BODY:
                raise APIError(
                    413,
                    f"the chunked body goes over {MAX_BODY} bytes, the most a "
                    "request may send",
                )
            data = self.rfile.read(size)
            end = self.rfile.readline(_LINE + 1)
            if len(data) < size or end.strip() or not end.endswith(b"\n"):
                raise APIError(400, "the chunked body ended inside a chunk")
            body += data
        for _ in range(64):  # trailers
            line = self.rfile.readline(_LINE + 1)
            if not line.endswith(b"\n"):
                raise APIError(400, "the chunked body ended before its last line")
            if not line.strip():
                return bytes(body)
        raise APIError(400, "too many trailer lines after a chunked body")

    def _unknown_path(self) -> None:
        self._error(
            APIError(
                404, f"unknown path: {self.command} {self.path}", None, "unknown_url"
            )
        )

    def _error(self, err: APIError) -> None:
        self._json(err.status, err.body())

    def _json(self, status: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()


def _usage(last) -> dict:
    return openai_api.usage(
        last.prompt_tokens, last.generation_tokens, last.cached_tokens
    )


def check_address(host: str, port: int) -> None:
    """Check that host:port can be listened on, before a model is loaded for it.

    Raises:
        ValueError: the host does not resolve, the port is out of range or taken.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be 0..65535 (0: any free port), got {port}")
    try:
        family, kind, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind) as probe:
            # as the server will: a port left in TIME_WAIT is not taken
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as err:
        raise _listen_error(host, port, err) from None


def _listen_error(host: str, port: int, err: OSError) -> ValueError:
    return ValueError(
        f"cannot listen on {host}:{port}: {err.strerror or err}; choose another "
        "--host or --port"
    )


def make_server(
    model,
    tokenizer,
    model_id: str,
    host: str,
    port: int,
    defaults,
    log=None,
    prompt_cache_size: int = 10,
    prompt_cache_bytes: int | None = None,
) -> Server:
    """A server bound to host:port, its generation thread started;
    `serve_forever()` answers.

    Args:
        model, tokenizer: what `load` gives; model_id: the name clients use.
        host, port: where to listen (port 0: any free one, `server.server_address`
            has it).
        defaults: the sampling and generation options (`flashinfer serve`'s).
        log: takes each log line (default: `stderr_log`).
        prompt_cache_size, prompt_cache_bytes: the conversations whose prompt
            caches are kept, and their bytes at most (None: no bound beyond the
            count).

    Returns:
        The server, not yet answering.

    Raises:
        ValueError: the address cannot be listened on, or a bound below 0.
    """
    LRUPromptCache(prompt_cache_size, prompt_cache_bytes)  # checks the bounds
    try:
        return Server(
            (host, port),
            model,
            tokenizer,
            model_id,
            defaults,
            log or stderr_log,
            prompt_cache_size,
            prompt_cache_bytes,
        )
    except OverflowError as err:  # a port over 65535
        raise ValueError(f"cannot listen on {host}:{port}: {err}") from None
    except OSError as err:
        raise _listen_error(host, port, err) from None
