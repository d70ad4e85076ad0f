"""The prompt cache: a reused cache computes fewer tokens and changes nothing else;
saved files round-trip and are refused for another model."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import has_mlx, random_weights, tiny_config, write_hf_checkpoint

from mlx_flashinfer import convert, load, stream_generate
from mlx_flashinfer.chat import Chat
from mlx_flashinfer.cli import main
from mlx_flashinfer.model.transformer import KVCache, kv_cache_bytes
from mlx_flashinfer.prompt_cache import (
    LRUPromptCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)

BACKENDS = [
    "numpy",
    pytest.param(
        "mlx", marks=pytest.mark.skipif(not has_mlx(), reason="mlx is not installed")
    ),
]
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
TURN = [1, 5, 9, 3, 22, 17, 4]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("prompt-cache")
    out = {}
    sparse = tiny_config("opt", ffn_dim=256)
    for name, config in {
        "llama-relu": tiny_config("llama", "relu"),
        "opt-relu": tiny_config("opt"),
        "opt-sparse": sparse,
        "llama-silu": tiny_config("llama", "silu"),
    }.items():
        weights = random_weights(config)
        if name == "opt-sparse":  # 8 live neurons of 256: prompts read, not stream
            for key in [k for k in weights if k.endswith("fc1.bias")]:
                weights[key][:] = -10.0
                weights[key][:8] = 0.0
        src = write_hf_checkpoint(
            tmp / f"{name}-src", config, weights, chat_template=TEMPLATE
        )
        out[name] = convert(src, tmp / name, dtype="float32", progress=False)
    return out


def load_model(layout, backend: str, mode: str, **kwargs):
    if mode == "dense":
        return load(layout, backend=backend, **kwargs)
    # the gate predictor never misses a firing neuron of a ReLU model: flash == dense
    return load(
        layout,
        backend=backend,
        memory_budget="200%",
        predictor="gate",
        lookahead=mode == "flash+lookahead",
        **kwargs,
    )


def run(model, tokenizer, ids, cache=None, max_tokens=6):
    """(tokens, logits of every step, the last response) of a greedy generation."""
    seen = []

    def record(tokens, logits):
        seen.append(logits.copy())
        return logits

    responses = list(
        stream_generate(
            model,
            tokenizer,
            ids,
            max_tokens=max_tokens,
            logits_processors=[record],
            prompt_cache=cache,
        )
    )
    return [r.token for r in responses], np.array(seen), responses[-1]


CASES = [
    (name, mode)
    for name in ("llama-relu", "opt-relu", "opt-sparse", "llama-silu")
    for mode in ("dense", "flash", "flash+lookahead")
    if not (name == "llama-silu" and mode != "dense")  # SiLU sparsity: approximate
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,mode", CASES)
def test_a_reused_cache_gives_what_a_fresh_run_gives(layouts, backend, name, mode):
    model, tokenizer = load_model(layouts[name], backend, mode)
    dense, _ = load_model(layouts[name], backend, "dense")
    cache = make_prompt_cache(model)
    first, _, last = run(model, tokenizer, TURN, cache)
    assert last.cached_tokens == 0 and len(cache) == len(TURN) + len(first) - 1
    # a second turn extends the first: only its own tokens are computed
    second = [*TURN, *first, 11, 30, 12]
    tokens, logits, last = run(model, tokenizer, second, cache)
    assert last.cached_tokens == len(TURN) + len(first) - 1
    fresh_tokens, fresh_logits, _ = run(model, tokenizer, second)
    dense_tokens, dense_logits, _ = run(dense, tokenizer, second)
    assert tokens == fresh_tokens == dense_tokens
    np.testing.assert_allclose(logits, fresh_logits, atol=1e-4)
    np.testing.assert_allclose(logits, dense_logits, atol=1e-4)
    # a prompt that diverges after 3 tokens: the cache is trimmed to them
    third = [*TURN[:3], 13, 14, 15, 16]
    tokens, logits, last = run(model, tokenizer, third, cache)
    assert last.cached_tokens == 3
    fresh_tokens, fresh_logits, _ = run(model, tokenizer, third)
    assert tokens == fresh_tokens
    np.testing.assert_allclose(logits, fresh_logits, atol=1e-4)
    # the same prompt again: all but its last token are reused
    again, _, last = run(model, tokenizer, third, cache)
    assert again == tokens and last.cached_tokens == len(third) - 1
    if name == "opt-sparse" and mode != "dense":  # prompts read their neurons only
        assert model.ffn.total.prefill_streamed == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_token_interrupted_mid_read_leaves_the_cache_exact(layouts, backend):
    """The window of a layer has planned rows the interrupted read never filled:
    the next use must not compute on them."""
    model, tokenizer = load_model(layouts["llama-relu"], backend, "flash")
    reader = model.ffn.reader
    real_read, generated = reader.read, []

    def read_then_interrupt(*args, **kwargs):
        if len(generated) >= 2:  # a decode step, after the window planned its loads
            raise KeyboardInterrupt
        return real_read(*args, **kwargs)

    reader.read = read_then_interrupt
    cache = make_prompt_cache(model)
    with pytest.raises(KeyboardInterrupt):
        for response in stream_generate(
            model, tokenizer, TURN, max_tokens=40, prompt_cache=cache
        ):
            generated.append(response.token)
    reader.read = real_read
    # the interrupted token again, alone: it runs through the sparse path, on the
    # cached rows (a longer prompt would stream every row in again)
    longer = [*TURN, *generated]
    tokens, logits, last = run(model, tokenizer, longer, cache)
    assert last.cached_tokens == len(longer) - 1
    dense, _ = load_model(layouts["llama-relu"], backend, "dense")
    dense_tokens, dense_logits, _ = run(dense, tokenizer, longer)
    assert tokens == dense_tokens
    np.testing.assert_allclose(logits, dense_logits, atol=1e-4)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    prompts=st.lists(
        st.tuples(st.integers(0, 12), st.lists(st.integers(3, 39), max_size=8)),
        min_size=1,
        max_size=4,
    )
)
def test_any_sequence_of_prompts_through_one_cache_equals_fresh_runs(layouts, prompts):
    """Each prompt keeps a random prefix of the one before and adds random tokens."""
    model, tokenizer = load(layouts["llama-silu"], backend="numpy")
    cache, previous, held = make_prompt_cache(model), [1], []
    for keep, extra in prompts:
        ids = previous[:keep] + extra or [1]
        tokens, logits, last = run(model, tokenizer, ids, cache, max_tokens=3)
        fresh_tokens, fresh_logits, _ = run(model, tokenizer, ids, max_tokens=3)
        assert tokens == fresh_tokens
        np.testing.assert_allclose(logits, fresh_logits, atol=1e-4)
        common = 0
        while common < min(len(held), len(ids) - 1) and held[common] == ids[common]:
            common += 1
        assert last.cached_tokens == common
        previous, held = ids + tokens, ids + tokens[:-1]  # the last one never ran


def shared_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    prompts=st.lists(
        st.tuples(
            st.integers(0, 5),  # which earlier conversation it goes on from
            st.integers(0, 14),  # how much of it it keeps
            st.lists(st.integers(3, 39), max_size=6),
        ),
        min_size=1,
        max_size=6,
    ),
    size=st.integers(0, 3),
    caches_of_bytes=st.sampled_from([None, 0, 1, 2]),
)
def test_any_prompts_through_an_lru_equal_fresh_runs(
    layouts, prompts, size, caches_of_bytes
):
    """Each prompt goes on from one of the earlier ones (a prefix of it and new
    tokens). The LRU reuses the kept cache sharing the longest prefix, changes no
    other, trims none that would lose more tokens than it keeps, keeps the one used
    as the most recent, holds both bounds; and the tokens are those of a fresh
    run."""
    model, tokenizer = load(layouts["llama-silu"], backend="numpy")
    one = kv_cache_bytes(model.args, KVCache.step)  # a cache of up to 256 tokens
    max_bytes = None if caches_of_bytes is None else caches_of_bytes * one
    lru = LRUPromptCache(size, max_bytes)
    history = [[1]]
    for which, keep, extra in prompts:
        ids = history[which % len(history)][:keep] + extra or [1]
        longest = max((kept.reusable(ids) for kept in lru.caches), default=0)
        before = {id(kept): list(kept.tokens) for kept in lru.caches}
        cache = lru.fetch(model, ids)
        tokens, logits, last = run(model, tokenizer, ids, cache, max_tokens=3)
        lru.insert(cache)
        fresh_tokens, fresh_logits, _ = run(model, tokenizer, ids, max_tokens=3)
        assert tokens == fresh_tokens
        np.testing.assert_allclose(logits, fresh_logits, atol=1e-4)
        assert last.cached_tokens == longest
        for kept in lru.caches:  # a cache changes only when it loses less than
            held = before.get(id(kept))  # it keeps (its conversation goes on)
            if held is not None and kept.tokens != held:
                shared = shared_prefix(held, ids[:-1])
                assert kept is cache and len(held) - shared <= shared
        assert len(lru) <= size
        assert max_bytes is None or lru.nbytes <= max_bytes
        if size and max_bytes is None:
            assert lru.caches[-1] is cache
        history.append(ids + tokens)


def test_a_conversation_going_on_leaves_no_stale_branch(layouts):
    """Each turn, the reply's last token comes back another way (as a reply that
    tokenizes differently once in the chat template): the cache is trimmed by that
    token and goes on, one cache for the conversation. Another conversation sharing
    only its first token gets a copy of it and leaves the first one whole."""
    model, tokenizer = load(layouts["llama-silu"], backend="numpy")
    lru = LRUPromptCache(10)
    ids = list(TURN)
    for _ in range(4):
        cache = lru.fetch(model, ids)
        tokens, _, last = run(model, tokenizer, ids, cache, max_tokens=3)
        lru.insert(cache)
        held = list(cache.tokens)
        ids = ids + tokens[:1] + [11, 12, 13, 14]
    assert len(lru) == 1 and last.cached_tokens > len(TURN)
    other = [TURN[0], 30, 31, 32]
    cache = lru.fetch(model, other)
    run(model, tokenizer, other, cache, max_tokens=3)
    lru.insert(cache)
    assert len(lru) == 2 and lru.caches[0].tokens == held


def test_lru_bounds_below_zero_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        LRUPromptCache(-1)
    with pytest.raises(ValueError, match=">= 0"):
        LRUPromptCache(3, -5)


# -- files ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_saved_cache_loads_back_exactly(layouts, tmp_path, backend):
    model, tokenizer = load(layouts["llama-silu"], backend="numpy")
    cache = make_prompt_cache(model)
    first, _, _ = run(model, tokenizer, TURN, cache)
    save_prompt_cache(tmp_path / "c.safetensors", cache, model, metadata={"note": "hi"})
    # another process, maybe another backend: the same weights
    other, _ = load(layouts["llama-silu"], backend=backend)
    loaded = load_prompt_cache(tmp_path / "c.safetensors", other)
    assert loaded.tokens == cache.tokens and loaded.metadata["note"] == "hi"
    n = len(cache)
    for held, back in zip(cache.layers, loaded.layers, strict=True):
        assert back.offset == n
        for a, b in ((held.keys, back.keys), (held.values, back.values)):
            np.testing.assert_array_equal(
                model.backend.to_numpy(a[:, :n]), other.backend.to_numpy(b[:, :n])
            )
    second = [*TURN, *first, 11, 30]
    tokens, logits, last = run(other, tokenizer, second, loaded)
    fresh_tokens, fresh_logits, _ = run(other, tokenizer, second)
    assert last.cached_tokens == n and tokens == fresh_tokens
    np.testing.assert_allclose(logits, fresh_logits, atol=1e-4)


def test_bad_cache_files_are_refused(layouts, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    model, tokenizer = load(layouts["llama-relu"])
    cache = make_prompt_cache(model)
    run(model, tokenizer, TURN, cache)
    file = tmp_path / "relu.safetensors"
    save_prompt_cache(file, cache, model, metadata={"model": "relu"})
    other, _ = load(layouts["llama-silu"])
    with pytest.raises(ValueError, match=r"a prompt cache of another model \(relu\)"):
        load_prompt_cache(file, other)
    with pytest.raises(ValueError, match="belongs to another model"):
        run(other, tokenizer, TURN, cache)
    short, _ = load(layouts["llama-relu"], max_context=4)
    with pytest.raises(ValueError, match="more than the context of 4"):
        load_prompt_cache(file, short)
    with pytest.raises(FileNotFoundError, match="no such prompt cache file"):
        load_prompt_cache(tmp_path / "missing", model)
    (tmp_path / "junk").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a prompt cache file"):
        load_prompt_cache(tmp_path / "junk", model)
    save_file({"tokens": np.zeros(2, np.int64)}, str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="not a prompt cache"):
        load_prompt_cache(tmp_path / "plain", model)
    # a cache file whose layer lost its values
    with safe_open(str(file), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "layers.1.values"}  # noqa: SIM118
    save_file(tensors, str(tmp_path / "broken"), metadata=meta)
    with pytest.raises(ValueError, match="a damaged prompt cache"):
        load_prompt_cache(tmp_path / "broken", model)
    with pytest.raises(ValueError, match="empty"):
        save_prompt_cache(tmp_path / "empty", make_prompt_cache(model), model)


# -- the command line and the chat -----------------------------------------------------


def cli(argv, capsys) -> tuple[int, str, str]:
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def test_cache_prompt_then_generate_from_it(layouts, tmp_path, capsys):
    layout, file = layouts["llama-relu"], tmp_path / "system.safetensors"
    argv = ["--model", layout, "--prompt-cache-file", file]
    status, out, _ = cli(
        ["cache-prompt", *argv, "--system-prompt", "the queen said", "-p", "alice"],
        capsys,
    )
    assert status == 0 and out.startswith("cached 4 prompt tokens")
    generate = ["generate", "--model", layout, "-m", 5, "--stats"]
    status, cached, _ = cli(
        [*generate, "-p", " said", "--prompt-cache-file", file], capsys
    )
    assert status == 0
    assert "prompt: 5 tokens (4 reused from the prompt cache, 1 computed)" in cached
    status, fresh, _ = cli(
        [*generate, "-p", "alice said", "--system-prompt", "the queen said"], capsys
    )
    assert status == 0 and "(0 reused from the prompt cache, 5 computed)" in fresh
    assert cached.split("==========")[0] == fresh.split("==========")[0]
    # a cache file of another model: one line, exit 2
    argv = ["generate", "--model", layouts["llama-silu"], "-p", "alice"]
    status, _, err = cli([*argv, "--prompt-cache-file", file], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "a prompt cache of another model" in err and "Traceback" not in err


def test_a_chat_turn_computes_only_its_own_tokens(layouts):
    import io

    model, tokenizer = load(layouts["llama-relu"], memory_budget="200%")
    out = io.StringIO()
    chat = Chat(model, tokenizer, max_tokens=4, out=out)
    chat.handle("alice said")
    chat.handle("the queen")
    chat.handle("/stats")
    response = chat.last[0]
    first_turn = len(tokenizer.encode("alice said ", add_special_tokens=False))
    assert response.cached_tokens >= first_turn
    assert response.prompt_tokens - response.cached_tokens < response.prompt_tokens
    assert f"({response.cached_tokens} reused from the prompt cache" in out.getvalue()
    # the reply is what a fresh generation over the whole history gives
    from mlx_flashinfer.chat import encode_chat

    ids = encode_chat(tokenizer, chat.history[:-1])
    fresh = "".join(
        r.text for r in stream_generate(model, tokenizer, ids, max_tokens=4)
    )
    assert chat.history[-1]["content"] == fresh


def test_chat_starts_from_a_cached_system_prompt(
    layouts, tmp_path, capsys, monkeypatch
):
    layout, file = layouts["llama-relu"], tmp_path / "system.safetensors"
    argv = ["--model", layout, "--prompt-cache-file", file]
    status, _, _ = cli(
        ["cache-prompt", *argv, "--system-prompt", "the queen said to", "-p", ""],
        capsys,
    )
    assert status == 0
    lines = iter(["alice", "/stats", "q"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    status, out, _ = cli(["chat", *argv, "-m", 3], capsys)
    assert status == 0
    # the system prompt came from the file, and its 4 tokens were not computed again
    assert "prompt: 5 tokens (4 reused from the prompt cache, 1 computed)" in out
