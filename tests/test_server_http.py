"""The server's HTTP edges, each one OpenAI's error JSON and nothing left behind:
body framing (Content-Length, chunked uploads, the 16 MB cap), what the standard
library's parser refuses; how a stream ends when its reply is cut; log lines."""

import http.client
import json
import socket
import threading
import time

import pytest
import serving as shared
from serving import (
    assert_nothing_left,
    chat,
    eventually,
    exchange,
    openai,
    post,
    raw,
    serving,
)

from mlx_flashinfer.serve.server import MAX_BODY, stderr_log

# the server tests' shared fixtures (tests/serving.py), each module its own
layout, reference, served = shared.layout, shared.reference, shared.served


def test_http_level_mistakes(served):
    assert raw(served, "GET", "/nowhere")[0] == 404
    assert raw(served, "DELETE", "/v1/models")[0] == 405


HTTP_EDGES = {  # raw request, status, words of the message
    "negative Content-Length": (
        post("/v1/completions", "Content-Length: -5\r\n", b"{}"),
        400,
        "bad Content-Length '-5'",
    ),
    "Content-Length not a number": (
        post("/v1/completions", "Content-Length: ten\r\n", b"{}"),
        400,
        "bad Content-Length",
    ),
    "two Content-Lengths": (
        post("/v1/completions", "Content-Length: 2\r\nContent-Length: 3\r\n", b"{}"),
        400,
        "bad Content-Length",
    ),
    "no Content-Length": (post("/v1/completions", ""), 411, "Content-Length"),
    "over 16 MB": (
        post("/v1/completions", f"Content-Length: {MAX_BODY + 1}\r\n", b"{}"),
        413,
        f"at most {MAX_BODY}",
    ),
    "Content-Length and chunked": (
        post(
            "/v1/completions",
            "Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
            b"2\r\n{}\r\n0\r\n\r\n",
        ),
        400,
        "not both",
    ),
    "another transfer coding": (
        post("/v1/completions", "Transfer-Encoding: gzip\r\n", b"{}"),
        501,
        "'gzip' is not supported",
    ),
    "chunked over 16 MB": (
        post(
            "/v1/completions",
            "Transfer-Encoding: chunked\r\n",
            f"{MAX_BODY + 1:x}\r\n".encode() + b"{}",
        ),
        413,
        "goes over 16777216 bytes",
    ),
    "chunked, over 16 MB in small chunks": (
        post(
            "/v1/completions",
            "Transfer-Encoding: chunked\r\n",
            b"".join(
                f"{1 << 20:x}\r\n".encode() + b" " * (1 << 20) + b"\r\n"
                for _ in range(16)
            )
            + b"1\r\n",
        ),
        413,
        "goes over 16777216 bytes",
    ),
    "bad chunk size": (
        post("/v1/completions", "Transfer-Encoding: chunked\r\n", b"zz\r\n{}"),
        400,
        "bad chunk size line",
    ),
    "chunked body cut": (
        post("/v1/completions", "Transfer-Encoding: chunked\r\n", b"10\r\n{}"),
        400,
        "ended inside a chunk",
    ),
    "malformed request line": (b"GARBAGE\r\n\r\n", 400, "Bad request syntax"),
    "request line of four words": (
        b"POST /v1/completions HTTP/1.1 more\r\n\r\n",
        400,
        "Bad request",
    ),
    "HTTP/0.9 POST": (b"POST /v1/completions\r\n\r\n", 400, "Bad HTTP/0.9"),
    "bad HTTP version": (b"POST / HTTP/x.y\r\n\r\n", 400, "Bad request version"),
    "HTTP/2": (b"GET /health HTTP/2.0\r\n\r\n", 505, "Invalid HTTP version"),
    "unsupported method": (
        b"BREW /v1/models HTTP/1.1\r\n\r\n",
        501,
        "Unsupported method ('BREW')",
    ),
}


@pytest.mark.parametrize("case", sorted(HTTP_EDGES))
def test_http_edges_get_one_openai_error(served, case):
    request, status, says = HTTP_EDGES[case]
    got, headers, body = exchange(served, request)
    assert got == status, body
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)  # one JSON object, nothing around it
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert says in error["error"]["message"]
    assert error["error"]["type"] == "invalid_request_error"  # the request's fault
    assert_nothing_left(served)


def test_chunked_uploads_are_read(served, reference):
    body = json.dumps({"prompt": [1, 5, 9, 3, 22], "max_tokens": 4}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    # an iterable body without a length: http.client sends it chunked
    connection.request("POST", "/v1/completions", body=iter([body[:7], body[7:]]))
    response = connection.getresponse()
    assert response.status == 200
    answer = json.loads(response.read())
    connection.close()
    assert answer["choices"][0]["text"] == reference([1, 5, 9, 3, 22], 4)[0]
    # chunk extensions and trailers are allowed, and ignored
    chunked = b"".join(
        f"{len(part):x};note=1\r\n".encode() + part + b"\r\n"
        for part in (body[:3], body[3:])
    )
    status, _, raw_answer = exchange(
        served,
        post(
            "/v1/completions",
            "Transfer-Encoding: chunked\r\n",
            chunked + b"0\r\nX-Trailer: 1\r\n\r\n",
        ),
        half_close=False,
    )
    assert status == 200
    assert json.loads(raw_answer)["choices"][0]["text"] == answer["choices"][0]["text"]
    assert_nothing_left(served)


def test_log_lines_from_many_threads_stay_whole(capfd):
    """The server's default log: the HTTP and generation threads write at once."""
    capfd.readouterr()
    text = "x" * 60

    def write(i):
        for j in range(300):
            stderr_log(f"thread {i} line {j} {text}")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = capfd.readouterr().err.splitlines()
    expected = [f"thread {i} line {j} {text}" for i in range(8) for j in range(300)]
    assert sorted(lines) == sorted(expected)


# -- how a stream ends: finished ([DONE]) or cut (an error event, no [DONE]) ---------


class FailingFFN:
    """The model's FFN, failing from the `after`-th decoded token on, optionally
    slowed down (seconds per layer)."""

    def __init__(self, ffn, after: int | None = None, delay: float = 0.0):
        self.ffn, self.after, self.delay, self.tokens = ffn, after, delay, 0

    def __getattr__(self, name):
        return getattr(self.ffn, name)

    def __call__(self, layer, h):
        if layer == 0 and h.shape[0] == 1:
            self.tokens += 1
            if self.after is not None and self.tokens >= self.after:
                raise RuntimeError("the disk went away")
        time.sleep(self.delay)
        return self.ffn(layer, h)


def events_of(text: str) -> list:
    """The data of each server-sent event: parsed JSON, or "[DONE]"."""
    datas = [e.removeprefix("data: ") for e in text.split("\n\n") if e.strip()]
    return [d if d == "[DONE]" else json.loads(d) for d in datas]


def assert_cut(events: list, code: str | None, says: str) -> None:
    """A cut stream: chunks without a finish_reason, then one error, no [DONE]."""
    *chunks, last = events
    assert "[DONE]" not in events
    assert set(last) == {"error"} and last["error"]["type"] == "server_error"
    assert last["error"]["code"] == code and says in last["error"]["message"]
    assert chunks and all("error" not in c for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)


def stream_raw(port: int, path: str, body: dict) -> tuple[int, list]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", path, body=json.dumps(body))
    response = connection.getresponse()
    text = response.read().decode()  # HTTP/1.0: to the end of the connection
    connection.close()
    return response.status, events_of(text)


def test_a_finished_stream_ends_with_a_finish_reason_and_done(served):
    status, events = stream_raw(
        served.port, "/v1/chat/completions", chat(max_tokens=4, stream=True)
    )
    assert status == 200 and events[-1] == "[DONE]"
    finishes = [e["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) == {None}


def test_a_failed_generation_ends_its_stream_with_an_error(served):
    model = served.server.worker.model
    model.ffn = FailingFFN(model.ffn, after=3)
    try:
        status, events = stream_raw(
            served.port, "/v1/chat/completions", chat(max_tokens=20, stream=True)
        )
        assert status == 200
        assert_cut(events, None, "generation failed: the disk went away")
        assert model.ffn.tokens == 3  # it failed mid-reply, at its third token
        with pytest.raises(openai.APIError, match="the disk went away"):
            list(
                served.client.chat.completions.create(
                    model="tiny", messages=chat()["messages"], stream=True
                )
            )
        status, error = raw(served, "POST", "/v1/chat/completions", chat())
        assert status == 500 and set(error) == {"error"}
        assert "the disk went away" in error["error"]["message"]
    finally:
        model.ffn = model.ffn.ffn
    assert_nothing_left(served)


def test_a_stopping_server_cuts_its_streams_with_an_error(layout):
    """What Ctrl-C and SIGTERM do (`flashinfer serve` calls `Server.stop`): the
    reply in progress and the queued ones end with an error saying so."""
    with serving(layout) as s:
        model = s.server.worker.model
        model.ffn = FailingFFN(model.ffn, delay=0.02)
        body = json.dumps({"prompt": "alice", "max_tokens": 80, "stream": True})
        connection = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        connection.sendall(
            post("/v1/completions", f"Content-Length: {len(body)}\r\n", body.encode())
        )
        received = b""
        while received.count(b"data: ") < 3:
            received += connection.recv(4096)
        queued = []
        waiting = threading.Thread(
            target=lambda: queued.append(
                raw(s, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 2})
            )
        )
        waiting.start()
        assert eventually(lambda: s.server.worker.jobs.qsize() == 1)
        s.server.shutdown()
        started = time.monotonic()
        s.server.stop()
        stopped_in = time.monotonic() - started
        while chunk := connection.recv(65536):
            received += chunk
        connection.close()
        waiting.join(10)
        assert s.server.answers_in_progress == 0
    assert stopped_in < 5
    _, _, text = received.partition(b"\r\n\r\n")
    assert_cut(events_of(text.decode()), "server_stopped", "before the reply was")
    status, error = queued[0]
    assert status == 503 and error["error"]["code"] == "server_stopped"
    assert any("(cut: the server stops)" in line for line in s.lines)
