"""Conversations through the server keep their own prompt caches: clients taking
turns each reuse their own history (`cached_tokens`), within --prompt-cache-size
and --prompt-cache-bytes, counted from the caches' arrays; a cache changes what an
answer costs, never the answer."""

import signal
import subprocess
import sys

import pytest
import serving as shared
from serving import chat_ids, default_sigint, raw, serving

from mlx_flashinfer.cli.serve import prompt_cache_line
from mlx_flashinfer.flash.memory import format_bytes
from mlx_flashinfer.formats.layout import Layout
from mlx_flashinfer.model.transformer import kv_cache_bytes

# the server tests' shared fixtures (tests/serving.py), each module its own
layout, reference, served = shared.layout, shared.reference, shared.served

CONTEXT = 96  # the tiny model's: every cache used once holds 96 positions


@pytest.fixture(scope="module")
def full(layout) -> int:
    """Bytes of one conversation's keys and values at the whole context."""
    return kv_cache_bytes(Layout.open(layout).args, CONTEXT)


FIRST = {
    "A": [{"role": "user", "content": "alice said to the queen"}],
    "B": [{"role": "user", "content": "the cat was in the"}],
    "C": [{"role": "user", "content": "a king and a"}],
}


def ask(s, messages, max_tokens=5):
    return s.client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=max_tokens
    )


def go_on(messages, response, text="she said"):
    reply = {"role": "assistant", "content": response.choices[0].message.content}
    return [*messages, reply, {"role": "user", "content": text}]


def cached(response) -> int:
    return response.usage.prompt_tokens_details.cached_tokens


def health(s) -> dict:
    status, body = raw(s, "GET", "/health")
    assert status == 200
    return body["prompt_cache"]


def arrays_bytes(s) -> int:
    """What the kept caches' arrays hold, read from the arrays themselves."""
    return sum(
        layer.keys.nbytes + layer.values.nbytes
        for cache in s.server.worker.caches.caches
        for layer in cache.layers
        if layer.keys is not None
    )


def test_two_conversations_taking_turns_each_reuse_their_own_cache(served, reference):
    replies = {name: ask(served, FIRST[name]) for name in "AB"}  # A 1, B 1
    for name in "AB":  # A 2, B 2
        second = go_on(FIRST[name], replies[name])
        response = ask(served, second)
        first_ids = chat_ids(served, FIRST[name])
        assert len(first_ids) <= cached(response) < response.usage.prompt_tokens
        text, _ = reference(chat_ids(served, second), 5)
        assert response.choices[0].message.content == text
    stats = health(served)
    assert stats["conversations"] >= 2 and stats["bytes"] == arrays_bytes(served)


def test_with_one_cache_they_evict_each_other(layout, reference):
    """The server before the LRU: one cache, so B's turn 1 evicts A's history."""
    with serving(layout, prompt_cache_size=1) as s:
        replies = {name: ask(s, FIRST[name]) for name in "AB"}
        second = go_on(FIRST["A"], replies["A"])
        response = ask(s, second)
        assert cached(response) < len(chat_ids(s, FIRST["A"]))
        assert (
            response.choices[0].message.content
            == (reference(chat_ids(s, second), 5)[0])
        )
        assert health(s)["conversations"] == 1


@pytest.mark.parametrize("bound", ["size", "bytes"])
def test_the_least_recently_used_conversation_goes_first(layout, full, bound):
    options = (
        {"prompt_cache_size": 2}
        if bound == "size"
        else {"prompt_cache_bytes": 2 * full + full // 2}
    )
    with serving(layout, **options) as s:
        replies = {name: ask(s, FIRST[name]) for name in "ABC"}
        stats = health(s)
        assert stats["conversations"] == 2 and stats["bytes"] == arrays_bytes(s)
        assert stats["bytes"] == 2 * full  # each cache holds the whole context
        # A was the least recently used: gone; C is kept, and A's turn 2 (used
        # last) pushes B out
        a2 = ask(s, go_on(FIRST["A"], replies["A"]))
        assert cached(a2) < len(chat_ids(s, FIRST["A"]))
        c2 = ask(s, go_on(FIRST["C"], replies["C"]))
        assert cached(c2) >= len(chat_ids(s, FIRST["C"]))
        b2 = ask(s, go_on(FIRST["B"], replies["B"]))
        assert cached(b2) < len(chat_ids(s, FIRST["B"]))
        stats = health(s)
        assert stats["conversations"] == 2 and stats["bytes"] <= 2 * full + full // 2


def test_no_cache_kept_recomputes_every_prompt(layout):
    with serving(layout, prompt_cache_size=0) as s:
        reply = ask(s, FIRST["A"])
        assert cached(ask(s, go_on(FIRST["A"], reply))) == 0
        assert health(s) == {
            "conversations": 0,
            "tokens": [],
            "bytes": 0,
            "max_conversations": 0,
            "max_bytes": None,
        }


def test_the_start_line_says_what_the_prompt_caches_may_hold(layout, full):
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_flashinfer", "serve", "--model", str(layout)]
        + ["--port", "0", "--prompt-cache-size", "3"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        process.stderr.readline()
        line = process.stderr.readline()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        process.stderr.close()
    assert f"up to 3 conversations kept, at most {format_bytes(3 * full)}" in line
    assert f"{format_bytes(full)} each at {CONTEXT} tokens" in line


def test_a_byte_bound_below_the_count_bound_is_what_the_line_gives(served, full):
    model = served.server.worker.model
    line = prompt_cache_line(model, 10, full + 1)
    assert f"up to 10 conversations kept, at most {format_bytes(full + 1)}" in line
    assert "none kept" in prompt_cache_line(model, 10, 0)
