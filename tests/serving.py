"""What the server tests share: a tiny model's layout, a server in this process
(`serving`), the same model in process (`in_process`), and requests made by hand
(`raw`, `exchange`); and the module-scoped fixtures made of them (`layout`,
`served`, `reference`), which each test module imports by name (pytest then gives
each module its own).
"""

import contextlib
import http.client
import json
import signal
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from tiny_models import random_weights, tiny_config, write_hf_checkpoint

from mlx_flashinfer import convert, load, stream_generate
from mlx_flashinfer.chat import encode_chat
from mlx_flashinfer.serve.server import make_server

openai = pytest.importorskip("openai")

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
DEFAULTS = SimpleNamespace(
    max_tokens=8,
    temp=0.0,
    top_p=1.0,
    top_k=0,
    min_p=0.0,
    repetition_penalty=None,
    repetition_context_size=20,
    system_prompt=None,
    seed=None,
)


def tiny_layout(tmp_path_factory):
    """A tiny ReLU llama (context 96) with a chat template, converted."""
    tmp = tmp_path_factory.mktemp("serve")
    config = tiny_config("llama", "relu", max_position_embeddings=96)
    src = write_hf_checkpoint(
        tmp / "src", config, random_weights(config), chat_template=TEMPLATE
    )
    return convert(src, tmp / "tiny", dtype="float32", progress=False)


@contextlib.contextmanager
def serving(layout, **options):
    """A flash-mode server on a free port, in this process, answering until the
    block ends; its log lines kept. `options`: make_server's prompt cache bounds."""
    model, tokenizer = load(layout, memory_budget="200%", predictor="gate")
    lines = []
    server = make_server(
        model, tokenizer, "tiny", "127.0.0.1", 0, DEFAULTS, lines.append, **options
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0
    )
    try:
        yield SimpleNamespace(
            server=server, port=port, client=client, lines=lines, tokenizer=tokenizer
        )
    finally:
        server.shutdown()
        server.stop()


def in_process(layout):
    """The same model, in process: answer(ids, max_tokens, **sampling) gives
    (text, last response), what the server's answers must equal."""
    model, tokenizer = load(layout, memory_budget="200%", predictor="gate")

    def answer(ids, max_tokens=DEFAULTS.max_tokens, **kwargs):
        responses = list(
            stream_generate(model, tokenizer, ids, max_tokens=max_tokens, **kwargs)
        )
        return "".join(r.text for r in responses), responses[-1]

    return answer


def chat_ids(served, messages):
    return encode_chat(served.tokenizer, messages)


def raw(served, method: str, path: str, body=None, headers=None):
    """(status, JSON body) of one raw HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body)
    if isinstance(data, str):
        data = data.encode()
    connection.request(method, path, body=data, headers=headers or {})
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    return response.status, json.loads(payload)


def chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "alice"}]} | (
        fields
    )


def exchange(served, data: bytes, half_close=True) -> tuple[int, dict, bytes]:
    """(status, headers, body) of raw bytes sent as a whole request; the server
    closes at the end (HTTP/1.0). half_close: the client says it sends nothing
    more (a body cut short ends there; a request that runs is cancelled)."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as c:
        c.sendall(data)
        if half_close:
            c.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := c.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.0 "), status_line
    headers = dict(line.split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body


def eventually(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def assert_nothing_left(served):
    """No reply still being written, no job queued, and the next request answered."""
    assert eventually(lambda: served.server.answers_in_progress == 0)
    assert served.server.worker.jobs.empty()
    good, answer = raw(
        served, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2}
    )
    assert good == 200 and answer["usage"]["completion_tokens"] >= 1


def post(path: str, headers: str, body: bytes = b"") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + body


class SlowFFN:
    """The model's FFN, 20 ms slower per layer: a reply takes seconds, not
    milliseconds; counts decoded tokens."""

    def __init__(self, ffn, delay: float = 0.02):
        self.ffn, self.tokens, self.delay = ffn, 0, delay

    def __getattr__(self, name):
        return getattr(self.ffn, name)

    def __call__(self, layer, h):
        if layer == 0 and h.shape[0] == 1:
            self.tokens += 1
        time.sleep(self.delay)
        return self.ffn(layer, h)


def default_sigint() -> None:
    """Popen's preexec_fn for a server the test stops with SIGINT: a shell running
    the tests in the background (`cmd &`, nohup) starts them with SIGINT ignored,
    which Python then keeps, and the server would never see the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return tiny_layout(tmp_path_factory)


@pytest.fixture(scope="module")
def served(layout):
    with serving(layout) as s:
        yield s


@pytest.fixture(scope="module")
def reference(layout):
    return in_process(layout)
