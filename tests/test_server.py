"""`flashinfer serve` through the official `openai` client and raw HTTP: answers equal
in-process generation, bad input is refused OpenAI's way and the server goes on,
requests are served in arrival order, a client that leaves stops its generation.
(HTTP framing and how streams end: test_server_http.py; conversations and their
prompt caches: test_server_prompt_caches.py; the command: test_server_cli.py.)"""

import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import serving as shared
from serving import (
    DEFAULTS,
    SlowFFN,
    chat,
    chat_ids,
    openai,
    raw,
)
from tiny_models import has_mlx

from mlx_flashinfer import load, stream_generate
from mlx_flashinfer.chat import encode_chat
from mlx_flashinfer.serve.server import make_server

# the server tests' shared fixtures (tests/serving.py), each module its own
layout, reference, served = shared.layout, shared.reference, shared.served


def test_chat_completion_equals_in_process_generation(served, reference):
    messages = [{"role": "user", "content": "alice said to the queen"}]
    response = served.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6
    )
    text, last = reference(chat_ids(served, messages), 6)
    assert response.choices[0].message.content == text
    assert response.choices[0].finish_reason == last.finish_reason
    usage = response.usage
    assert usage.prompt_tokens == last.prompt_tokens
    assert usage.completion_tokens == last.generation_tokens
    extra = response.model_extra["flashinfer"]
    assert extra["request"] >= 1 and extra["flash"]["prefill"]["bytes_read"] > 0


def test_streamed_chat_equals_the_whole_answer(served, reference):
    messages = [{"role": "user", "content": "the cat was in the"}]
    stream = served.client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text, last = reference(chat_ids(served, messages), 7)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == last.finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        last.generation_tokens
    )
    assert "flashinfer" in chunks[-2].model_extra


def test_a_conversation_that_goes_on_reuses_the_prompt_cache(served, reference):
    first = [{"role": "user", "content": "alice said"}]
    reply = served.client.chat.completions.create(
        model="tiny", messages=first, max_tokens=5
    )
    answer = reply.choices[0].message.content
    second = [
        *first,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "she said"},
    ]
    response = served.client.chat.completions.create(
        model="tiny", messages=second, max_tokens=5
    )
    cached = response.usage.prompt_tokens_details.cached_tokens
    assert cached >= len(chat_ids(served, first))
    assert cached < response.usage.prompt_tokens
    text, _ = reference(chat_ids(served, second), 5)
    assert response.choices[0].message.content == text


def test_text_completions_stop_strings_and_seeds(served, reference):
    client = served.client
    response = client.completions.create(model="tiny", prompt="the king", max_tokens=6)
    text, _ = reference(served.tokenizer.encode("the king"), 6)
    assert response.choices[0].text == text
    ids = [1, 5, 9, 3, 22]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6)
    assert by_ids.choices[0].text == reference(ids, 6)[0]
    # a stop string cuts the text before it
    words = by_ids.choices[0].text.split()
    if len(words) > 1:
        stopped = client.completions.create(
            model="tiny", prompt=ids, max_tokens=6, stop=[words[1]]
        )
        assert stopped.choices[0].finish_reason == "stop"
        assert words[1] not in stopped.choices[0].text
    # sampling: a seed gives the same text again; streamed text joins up
    sampled = [
        client.completions.create(
            model="tiny", prompt=ids, max_tokens=8, temperature=1.5, seed=7
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1] == reference(ids, 8, temp=1.5, seed=7)[0]
    stream = client.completions.create(
        model="tiny", prompt=ids, max_tokens=6, stream=True
    )
    assert (
        "".join(c.choices[0].text for c in stream if c.choices)
        == by_ids.choices[0].text
    )


def test_models_and_health(served):
    assert [m.id for m in served.client.models.list()] == ["tiny"]
    assert served.client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        served.client.models.retrieve("gpt-4")
    status, health = raw(served, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    # what the prompt caches hold: the bytes of their arrays, as they are
    kept = served.server.worker.caches.caches
    arrays = sum(
        layer.keys.nbytes + layer.values.nbytes
        for cache in kept
        for layer in cache.layers
        if layer.keys is not None
    )
    stats = health["prompt_cache"]
    assert stats["bytes"] == arrays and stats["tokens"] == [len(c) for c in kept]
    assert stats["conversations"] == len(kept) <= stats["max_conversations"] == 10


def test_created_is_when_the_response_was_made(served):
    while int(time.time()) <= served.server.created:  # the server's second is over
        time.sleep(0.05)
    before = int(time.time())
    messages = [{"role": "user", "content": "alice"}]
    whole = served.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=3
    )
    chunks = list(
        served.client.completions.create(
            model="tiny", prompt="alice", max_tokens=3, stream=True
        )
    )
    after = int(time.time())
    assert before <= whole.created <= after
    assert {c.created for c in chunks} == {chunks[0].created}  # one per reply
    assert before <= chunks[0].created <= after
    assert served.server.created < before  # not the server's start


def test_an_unknown_model_is_refused_by_the_client(served):
    with pytest.raises(openai.NotFoundError) as caught:
        served.client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "alice"}]
        )
    assert caught.value.code == "model_not_found"


# -- bad input: 4xx, OpenAI's error JSON, and the server goes on ---------------------


BAD = {  # path, body, status, param, words of the message
    "malformed JSON": ("/v1/chat/completions", b'{"model": "tiny",', 400, None, "JSON"),
    "not an object": ("/v1/completions", b"[1, 2]", 400, None, "not an object"),
    "not UTF-8": ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None, "UTF-8"),
    "wrong type": (
        "/v1/chat/completions",
        chat(max_tokens="ten"),
        400,
        "max_tokens",
        "an integer",
    ),
    "bool for int": (
        "/v1/completions",
        {"prompt": "a", "max_tokens": True},
        400,
        "max_tokens",
        "an integer",
    ),
    "max_tokens 0": (
        "/v1/chat/completions",
        chat(max_tokens=0),
        400,
        "max_tokens",
        "at least 1",
    ),
    "temperature": (
        "/v1/chat/completions",
        chat(temperature=-1),
        400,
        "temperature",
        "0..2",
    ),
    "messages": (
        "/v1/chat/completions",
        {"messages": "alice"},
        400,
        "messages",
        "a list",
    ),
    "role": (
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "a"}]},
        400,
        "messages[0].role",
        "must be one of",
    ),
    "no prompt": ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "required"),
    "token out of range": (
        "/v1/completions",
        {"prompt": [1, 4000]},
        400,
        "prompt",
        "out of range",
    ),
    "over the context": (
        "/v1/completions",
        {"prompt": "alice " * 200},
        400,
        "prompt",
        "more than the context of 96",
    ),
    "unknown model": (
        "/v1/chat/completions",
        chat(model="gpt-4"),
        404,
        "model",
        "does not exist",
    ),
    "unknown path": ("/v1/embeddings", {"input": "a"}, 404, None, "unknown path"),
    "n": ("/v1/chat/completions", chat(n=2), 400, "n", "n must be 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_and_the_server_goes_on(served, case):
    path, body, status, param, says = BAD[case]
    got, error = raw(served, "POST", path, body)
    assert got == status, error
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["param"] == param and says in error["error"]["message"]
    if case == "over the context":
        assert error["error"]["code"] == "context_length_exceeded"
    good, answer = raw(
        served, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2}
    )
    assert good == 200 and answer["usage"]["completion_tokens"] >= 1


# -- clients that leave, many clients -----------------------------------------------


def test_a_client_leaving_mid_stream_stops_its_generation(served):
    model = served.server.worker.model
    slow = SlowFFN(model.ffn)
    model.ffn = slow
    try:
        body = json.dumps(
            {"prompt": "alice", "max_tokens": 80, "stream": True}
        ).encode()
        connection = socket.create_connection(("127.0.0.1", served.port))
        connection.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        received = b""
        while received.count(b"data: ") < 3:
            received += connection.recv(4096)
        connection.close()
        time.sleep(0.5)  # a few token times: the server notices
        stopped_at = slow.tokens
        status, answer = raw(
            served, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 2}
        )
        assert status == 200 and answer["usage"]["completion_tokens"] == 2
        # the first request decoded a few tokens, not 80; nothing ran after it left
        assert stopped_at < 20 and slow.tokens <= stopped_at + 2
    finally:
        model.ffn = slow.ffn
    assert any("(cancelled)" in line for line in served.lines)


def test_concurrent_clients_are_served_one_at_a_time_in_arrival_order(served):
    served.lines.clear()
    results, errors = [], []

    def client(i):
        try:
            for j in range(3):
                prompt = ["alice said", "the queen", "a cat"][(i + j) % 3]
                status, answer = raw(
                    served,
                    "POST",
                    "/v1/completions",
                    {"prompt": prompt, "max_tokens": 4, "stream": False},
                )
                results.append((status, answer))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    model = served.server.worker.model
    model.ffn = SlowFFN(model.ffn, delay=0.003)  # requests overlap: they queue
    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        model.ffn = model.ffn.ffn
    assert not errors and len(results) == 18
    assert all(status == 200 for status, _ in results)
    numbers = sorted(answer["flashinfer"]["request"] for _, answer in results)
    assert numbers == list(range(numbers[0], numbers[0] + 18))
    # the generation thread finished them in the order they were queued
    done = [
        int(line.split()[1].rstrip(":"))
        for line in served.lines
        if line.startswith("request ")
    ]
    assert done == numbers
    waits = [answer["flashinfer"]["queued_s"] for _, answer in results]
    assert max(waits) > 0.05  # some did wait for others


@pytest.mark.skipif(not has_mlx(), reason="mlx is not installed")
def test_the_mlx_backend_serves_from_its_generation_thread(layout):
    """MLX arrays made on the loading thread, computed on the generation thread."""
    model, tokenizer = load(layout, backend="mlx", memory_budget="200%")
    server = make_server(model, tokenizer, "tiny", "127.0.0.1", 0, DEFAULTS, print)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
            api_key="none",
            max_retries=0,
        )
        messages = [{"role": "user", "content": "alice said to the queen"}]
        text = [
            client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=6
            )
            .choices[0]
            .message.content
            for _ in range(2)
        ]
    finally:
        server.shutdown()
        server.stop()
    dense, _ = load(layout, backend="numpy")
    ids = encode_chat(tokenizer, messages)
    expected = "".join(
        r.text for r in stream_generate(dense, tokenizer, ids, max_tokens=6)
    )
    assert text == [expected, expected]


def test_the_default_system_prompt_goes_before_chats_without_one(served):
    from mlx_flashinfer.serve import openai_api

    model = served.server.worker.model
    defaults = SimpleNamespace(**vars(DEFAULTS) | {"system_prompt": "the queen"})
    user = {"role": "user", "content": "alice"}

    def ids(messages):
        body = {"messages": messages}
        request = openai_api.parse_request(
            "chat", body, model, served.tokenizer, "tiny", defaults
        )
        return request.ids

    system = {"role": "system", "content": "the queen"}
    assert ids([user]) == chat_ids(served, [system, user])
    own = {"role": "developer", "content": "a cat"}
    assert ids([own, user]) == chat_ids(
        served, [{"role": "system", "content": "a cat"}, user]
    )
