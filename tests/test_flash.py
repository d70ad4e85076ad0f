"""The flash runtime: exact against dense for ReLU-family models, within its budget."""

import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import has_mlx, random_weights, tiny_config, write_hf_checkpoint

from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.bench.synth import write_synthetic
from mlx_flashinfer.flash.memory import (
    SLOT_BYTES,
    io_buffer_bytes,
    layer_demand,
    model_bytes,
    parse_budget,
    plan_floor,
    share_rows,
)
from mlx_flashinfer.loader import make_plan
from mlx_flashinfer.predictors.kinds import predictor_nbytes

RELU_FAMILY = [("opt", "relu")] + [
    ("llama", a) for a in ("relu", "fatrelu", "relu2", "drelu")
]
_LAYOUTS: dict = {}


BACKENDS = ["numpy"] + (["mlx"] if has_mlx() else [])


def tiny_layout(
    family: str, act: str, d_heads: int, ffn: int, layers: int, arrangement="bundled"
) -> Path:
    """A float32 layout of the given shape, built once per shape per session."""
    key = (family, act, d_heads, ffn, layers, arrangement)
    if key not in _LAYOUTS:
        # 4 heads of an even head_dim (RoPE rotates pairs)
        sizes = {"hidden_size": 8 * d_heads, "num_hidden_layers": layers}
        sizes["ffn_dim" if family == "opt" else "intermediate_size"] = ffn
        if family == "opt":
            sizes["word_embed_proj_dim"] = 8 * d_heads
        config = tiny_config(family, act, **sizes)
        tmp = Path(tempfile.mkdtemp(prefix="flash-"))
        src = write_hf_checkpoint(tmp / "src", config, random_weights(config, seed=ffn))
        _LAYOUTS[key] = convert(
            src,
            tmp / "layout",
            dtype="float32",
            progress=False,
            arrangement=arrangement,
        )
    return _LAYOUTS[key]


def budget_between(
    layout: Path, predictor: str, fraction: float, lookahead: bool = False
) -> int:
    """A budget from the smallest accepted (one neuron row) to one holding all
    (with reads ahead: their second read buffer too)."""
    lay = Layout.open(layout)
    _, ffn = model_bytes(lay)
    held = plan_floor(lay, predictor_nbytes(predictor, lay), bool(lookahead))
    smallest = held + lay.bundle_bytes + SLOT_BYTES
    largest = held + 2 * ffn
    return int(smallest + fraction * (largest - smallest))


@settings(max_examples=40, deadline=None)
@given(
    model=st.sampled_from(RELU_FAMILY),
    d_heads=st.integers(1, 3),
    ffn=st.integers(4, 80),
    layers=st.integers(1, 3),
    window=st.integers(0, 5),
    fraction=st.floats(0.0, 1.0),
    predictor=st.sampled_from(["oracle", "gate"]),
    backend=st.sampled_from(BACKENDS),
    tokens=st.lists(st.integers(0, 39), min_size=2, max_size=14),
    data=st.data(),
)
def test_flash_logits_equal_dense_logits_for_relu_models(
    model, d_heads, ffn, layers, window, fraction, predictor, backend, tokens, data
):
    arrangement = data.draw(st.sampled_from(["bundled", "separate"]), label="arr")
    layout = tiny_layout(*model, d_heads, ffn, layers, arrangement)
    prefill = data.draw(st.integers(1, len(tokens)), label="prefill")
    dense, _ = load(layout, backend=backend)
    lookahead = data.draw(st.booleans(), label="lookahead")
    budget = budget_between(layout, predictor, fraction, lookahead)
    flash, _ = load(
        layout,
        backend=backend,
        memory_budget=budget,
        window=window,
        predictor=predictor,
        threads=data.draw(st.sampled_from([1, 3])),
        lookahead=lookahead,
    )
    expected = dense.logits(tokens, prefill=prefill)
    got = flash.logits(tokens, prefill=prefill)
    assert np.abs(got - expected).max() <= 1e-5
    plan = flash.plan
    assert plan.weights <= plan.budget == budget
    # bytes read: loaded and scratch neurons times the bundle, alignment counted apart
    stats = flash.io_stats()
    bundle = Layout.open(layout).bundle_bytes
    total = flash.ffn.total
    decoded = total.neurons_loaded + total.neurons_scratch
    # a prompt reads each layer once: streamed whole, or the union of its tokens'
    # predicted sets
    prompted = total.prefill_neurons
    assert total.prefill_streamed * ffn <= prompted <= (prefill > 1) * layers * ffn
    assert stats["bytes_useful"] == (decoded + prompted) * bundle
    assert stats["bytes_read"] >= stats["bytes_useful"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_reads_only_what_the_window_lacks(backend):
    layout = tiny_layout("llama", "relu", 2, 64, 2)
    flash, _ = load(
        layout, backend=backend, memory_budget=10**9, window=3, predictor="oracle"
    )
    tokens = [1, 5, 9, 3, 22, 17, 4, 30]
    flash.logits(tokens, prefill=2)
    total = flash.ffn.total
    bundle = Layout.open(layout).bundle_bytes
    streamed = total.prefill_neurons * bundle  # the prompt read each layer once
    assert (
        total.bytes_useful
        == streamed + (total.neurons_loaded + total.neurons_scratch) * bundle
    )
    assert total.neurons_scratch == 0 and total.lru_evicted == 0  # the budget holds all
    assert 0 < total.neurons_hit <= total.neurons_predicted
    assert flash.io_stats()["reads"] == total.reads > 0


def test_budget_too_small_names_the_exact_shortfall():
    layout = tiny_layout("opt", "relu", 2, 16, 2)
    lay = Layout.open(layout)
    resident, ffn = model_bytes(lay)
    row = ffn // (16 * 2)
    needed = plan_floor(lay, predictor_nbytes("gate", lay)) + row + SLOT_BYTES
    with pytest.raises(ValueError, match=r"too small: .* 1 bytes more"):
        load(layout, memory_budget=needed - 1, predictor="gate")
    plan = make_plan(lay, needed, "gate")
    assert plan.weights <= needed and plan.scratch_rows == 1 and plan.capacity == [0, 0]


def test_budget_parsing():
    assert parse_budget("50%", 1000) == 500
    assert parse_budget("1.5GB", 0) == 1_500_000_000
    assert parse_budget("800MiB", 0) == 800 * 2**20
    assert parse_budget(12345, 0) == 12345
    for bad in ("lots", "-5GB", "0%", "5 parsecs"):
        with pytest.raises(ValueError, match="memory budget"):
            parse_budget(bad, 1000)


def test_bad_flash_options_are_refused():
    layout = tiny_layout("llama", "relu", 1, 8, 1)
    with pytest.raises(ValueError, match="window -1 out of range"):
        load(layout, memory_budget="50%", window=-1)
    with pytest.raises(ValueError, match="threads"):
        load(layout, memory_budget="1MB", threads=0)
    with pytest.raises(ValueError, match="unknown predictor 'psychic'"):
        load(layout, memory_budget="1MB", predictor="psychic")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fraction,path", [(0.0, "scratch"), (0.5, "lru")])
def test_small_budgets_stay_exact_through_scratch_and_lru(backend, fraction, path):
    """A tiny budget sends neurons through scratch; a small one evicts inside the
    window: both only cost reads, never exactness."""
    layout = tiny_layout("llama", "relu", 2, 80, 2)
    tokens = [1, 5, 9, 3, 22, 17, 4, 30, 2, 11, 39, 0, 7, 7, 12]
    dense, _ = load(layout, backend=backend)
    budget = budget_between(layout, "gate", fraction)
    flash, _ = load(
        layout, backend=backend, memory_budget=budget, window=5, predictor="gate"
    )
    got = flash.logits(tokens, prefill=2)
    assert np.abs(got - dense.logits(tokens, prefill=2)).max() <= 1e-5
    total = flash.ffn.total
    if path == "scratch":
        assert flash.plan.capacity == [0, 0] and total.neurons_scratch > 0
    else:
        assert 0 < flash.plan.capacity[0] < 80 and total.lru_evicted > 0


def test_a_layout_shrunk_after_loading_is_a_clear_error(tmp_path):
    import shutil

    layout = Path(
        shutil.copytree(tiny_layout("llama", "relu", 1, 16, 2), tmp_path / "l")
    )
    flash, _ = load(layout, memory_budget="1MB", predictor="gate")
    ffn = layout / "ffn.bin"
    ffn.write_bytes(ffn.read_bytes()[:4096])  # layer 1 is gone
    with pytest.raises(ValueError, match="truncated"):
        flash.logits([1, 2, 3, 4])


def test_no_o_direct_falls_back_and_says_so(monkeypatch):
    from mlx_flashinfer.flash import reader as flash_reader

    original = flash_reader.FlashReader.__init__

    def buffered(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "mode": "buffered"})

    monkeypatch.setattr(flash_reader.FlashReader, "__init__", buffered)
    layout = tiny_layout("llama", "relu", 1, 16, 2)
    with pytest.warns(UserWarning, match="refuses O_DIRECT"):
        flash, _ = load(layout, memory_budget="1MB", predictor="gate")
    dense, _ = load(layout)
    assert flash.io_stats()["mode"] == "buffered"
    tokens = [1, 2, 3, 4, 5]
    assert np.abs(flash.logits(tokens, 1) - dense.logits(tokens, 1)).max() <= 1e-5


class RandomGuess:
    """A lookahead guess that is wrong on purpose: random neurons each call."""

    def __init__(self, neurons: int, seed: int):
        self.neurons = neurons
        self.rng = np.random.default_rng(seed)

    def predict(self, layer: int, h) -> np.ndarray:
        return self.rng.random((h.shape[0], self.neurons)) < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", [("llama", "relu"), ("llama", "silu")])
def test_a_wrong_lookahead_costs_reads_never_the_answer(backend, model):
    """Reads ahead guess the next layer's neurons; the exact predictor still decides
    which rows the FFN uses. A random guess changes the reads and the order rows
    land in (so float sums round differently), nothing else: also for a SiLU
    model, whose output depends on exactly which rows are cached."""
    layout = tiny_layout(*model, 2, 80, 3)
    tokens = [1, 5, 9, 3, 22, 17, 4, 30, 2, 11, 39, 0, 7, 7, 12]
    runs = {}
    budget = budget_between(layout, "gate", 0.3, lookahead=True)
    second_buffer = io_buffer_bytes(Layout.open(layout))
    for guess in ("right", "random", "off"):
        flash, _ = load(
            layout,
            backend=backend,
            # without reads ahead, the same cache and scratch: no second buffer
            memory_budget=budget - (guess == "off") * second_buffer,
            window=3,
            predictor="gate",
            lookahead=guess != "off",
        )
        if guess == "random":
            flash.ffn.guess = RandomGuess(80, seed=0)
        logits = flash.logits(tokens, prefill=2)
        runs[guess] = (logits, flash.ffn.total)
    scale = np.abs(runs["off"][0]).max()
    for guess in ("right", "random"):
        logits, total = runs[guess]
        assert np.abs(logits - runs["off"][0]).max() <= 1e-5 * scale
        assert total.ahead_neurons > 0 and total.ahead_used > 0
    right, random = runs["right"][1], runs["random"][1]
    assert right.ahead_used / right.ahead_neurons > (
        random.ahead_used / random.ahead_neurons
    )
    # the same loads either way, but for a neuron whose pre-activation sits at the
    # threshold and flips with the rounding: the guess decides only what is read ahead
    loaded = [t.neurons_loaded for _, t in runs.values()]
    assert max(loaded) - min(loaded) <= 0.01 * max(loaded)
    assert runs["off"][1].ahead_neurons == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_short_prompt_reads_only_its_neurons(backend, tmp_path):
    """A ReLU model whose neurons mostly never fire: a prompt reads the union of its
    tokens' predicted neurons, not the whole FFN, and still equals dense; a long
    prompt whose union is most of the layer streams it instead."""
    config = tiny_config(
        "opt",
        "relu",
        hidden_size=32,
        ffn_dim=256,
        num_hidden_layers=2,
        word_embed_proj_dim=32,
    )
    weights = random_weights(config, seed=5)
    for name in [n for n in weights if n.endswith("fc1.bias")]:
        weights[name][:] = -10.0  # silent neurons ...
        weights[name][:8] = 0.0  # ... but for 8 of 256
    layout = convert(
        write_hf_checkpoint(tmp_path / "src", config, weights),
        tmp_path / "layout",
        dtype="float32",
        progress=False,
    )
    tokens = [1, 5, 9, 3, 22, 17]
    dense, _ = load(layout, backend=backend)
    flash, _ = load(layout, backend=backend, memory_budget="200%", predictor="gate")
    got = flash.logits(tokens, prefill=5)
    assert np.abs(got - dense.logits(tokens, prefill=5)).max() <= 1e-5
    total = flash.ffn.total
    assert total.prefill_streamed == 0
    assert 0 < total.prefill_neurons <= 2 * 8  # each layer: at most its 8 live ones
    # every neuron live: the union is the whole layer, so it streams
    for name in [n for n in weights if n.endswith("fc1.bias")]:
        weights[name][:] = 10.0
    layout = convert(
        write_hf_checkpoint(tmp_path / "src2", config, weights),
        tmp_path / "layout2",
        dtype="float32",
        progress=False,
    )
    flash, _ = load(layout, backend=backend, memory_budget="200%", predictor="gate")
    flash.logits(tokens, prefill=5)
    assert flash.ffn.total.prefill_streamed == 2
    assert flash.ffn.total.prefill_neurons == 2 * 256


@settings(max_examples=300, deadline=None)
@given(
    rows=st.integers(0, 5000),
    demand=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    cap=st.integers(1, 600),
)
def test_cache_rows_follow_each_layers_demand(rows, demand, cap):
    shares = share_rows(rows, demand, cap)
    assert len(shares) == len(demand) and all(0 <= s <= cap for s in shares)
    # every row is used unless every layer is full
    assert sum(shares) == min(rows, cap * len(demand))
    # more demand never means fewer rows (up to one row of rounding)
    for i in range(len(demand)):
        for j in range(len(demand)):
            if demand[i] > demand[j]:
                assert shares[i] >= shares[j] - 1


def test_the_plan_sizes_layers_by_the_predictors_report(tmp_path):
    layout = write_synthetic(tmp_path / "s", "opt-tiny", progress=False)
    lay = Layout.open(layout)
    report = lay.manifest["predictor"]["report"]
    demand = layer_demand(lay, "lowrank")
    assert demand == [r["predicted_fraction"] for r in report]
    assert layer_demand(lay, "all") is None
    plan = make_plan(lay, "150%", "lowrank")
    busiest = int(np.argmax(demand))
    quietest = int(np.argmin(demand))
    assert plan.capacity[busiest] >= plan.capacity[quietest]
    model, _ = load(layout, memory_budget="150%", predictor="lowrank")
    assert model.plan.capacity == plan.capacity
    assert sum(model.held_bytes().values()) == model.plan.weights <= model.plan.budget


def test_reads_ahead_by_default_where_they_can_pay(tmp_path):
    """Default: reads ahead for a ReLU model whose cache dwarfs the second read
    buffer; not where the buffer would eat the cache (tiny models), not for SiLU
    models (their guesses miss too often to pay: see loader.DEFAULT_LOOKAHEAD)."""
    shape = {
        "hidden_size": 64,
        "ffn_dim": 4096,
        "num_hidden_layers": 12,
        "num_attention_heads": 2,
        "vocab_size": 64,
        "max_position_embeddings": 64,
    }
    roomy = Layout.open(write_synthetic(tmp_path / "s", shape, progress=False))
    plan = make_plan(roomy, "150%", "lowrank")
    assert plan.lookahead and plan.io_buffer == io_buffer_bytes(roomy, True)
    assert not make_plan(roomy, "150%", "lowrank", lookahead=False).lookahead
    tiny = Layout.open(tiny_layout("llama", "relu", 2, 80, 3))
    assert not make_plan(tiny, "100%", "gate").lookahead
    silu = Layout.open(tiny_layout("llama", "silu", 2, 80, 3))
    assert not make_plan(silu, 10**9, "gate").lookahead


class RowsSeen:
    """A predictor that records how many token rows each call is given."""

    def __init__(self, predictor):
        self.predictor, self.rows = predictor, []

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def predict(self, layer: int, h):
        self.rows.append(h.shape[0])
        return self.predictor.predict(layer, h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_a_prompt_predicts_every_token_only_where_their_union_is_read(backend, act):
    """A SiLU model's prompt streams every neuron: only its last k tokens' sets are
    predicted (they seed the window); a ReLU model's may read their union, so
    every token's is. Both prompts still equal dense (and the ReLU model's exact
    decode steps; the SiLU model's gate predictor is approximate there)."""
    layout = tiny_layout("llama", act, 2, 80, 3)
    tokens = [1, 5, 9, 3, 22, 17, 4, 30]
    dense, _ = load(layout, backend=backend)
    flash, _ = load(
        layout, backend=backend, memory_budget="200%", window=3, predictor="gate"
    )
    flash.ffn.predictor = seen = RowsSeen(flash.ffn.predictor)
    got = flash.logits(tokens, prefill=6)
    exact = 6 if act == "silu" else len(tokens)
    expected = dense.logits(tokens, prefill=6)
    assert np.abs(got[:exact] - expected[:exact]).max() <= 1e-5
    layers = Layout.open(layout).args.num_hidden_layers
    prompt = 3 if act == "silu" else 6
    assert seen.rows == [prompt] * layers + [1] * (2 * layers)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_a_prompt_read_while_its_last_chunk_computes_equals_dense(
    backend, act, monkeypatch
):
    """With the scratch in two halves (each chunk read while the last computes),
    a prompt of several chunks still equals dense, and so do the decode steps that
    start from the cache it filled; the same as reading then computing each."""
    from mlx_flashinfer.flash import prompt_reads

    layout = tiny_layout("llama", act, 2, 400, 3)
    tokens = [1, 5, 9, 3, 22, 17, 4, 30, 2, 11]
    dense, _ = load(layout, backend=backend)
    expected = dense.logits(tokens, prefill=7)
    runs = {}
    for ahead in (True, False):
        monkeypatch.setattr(
            prompt_reads, "PREFILL_AHEAD_BYTES", 0 if ahead else 1 << 60
        )
        flash, _ = load(
            layout,
            backend=backend,
            memory_budget=budget_between(layout, "gate", 0.1),
            window=2,
            predictor="gate",
        )
        assert flash.ffn.plan.scratch_rows < 400  # several chunks a layer
        runs[ahead] = flash.logits(tokens, prefill=7)
        assert (flash.ffn._prefill_thread is not None) == ahead
        flash.ffn.close()
    exact = 7 if act == "silu" else len(tokens)  # a SiLU model decodes approximately
    for got in runs.values():
        assert np.abs(got[:exact] - expected[:exact]).max() <= 1e-5
    assert np.abs(runs[True] - runs[False]).max() <= 1e-5


def test_a_prompt_cut_short_leaves_no_read_running_into_the_scratch(monkeypatch):
    """An error while a prompt's chunk computes (its next chunk being read into the
    other half of the scratch) waits for that read: the decode steps after, which
    read into the scratch too, are not raced."""
    from mlx_flashinfer.flash import prompt_reads

    monkeypatch.setattr(prompt_reads, "PREFILL_AHEAD_BYTES", 0)
    layout = tiny_layout("llama", "relu", 2, 400, 3)
    flash, _ = load(
        layout,
        backend="numpy",
        memory_budget=budget_between(layout, "gate", 0.1),
        window=2,
        predictor="gate",
    )
    read = flash.ffn._read

    def slow_read(*args, **kwargs):  # a disk slower than the chunk's compute
        time.sleep(0.2)
        return read(*args, **kwargs)

    monkeypatch.setattr(flash.ffn, "_read", slow_read)
    chunks = flash.ffn._prefill_reads(0, np.arange(400), True)
    next(chunks)  # the first chunk landed, the second is being read
    pending = []
    submit = flash.ffn._prefill_thread.submit

    def submitted(*args):
        pending.append(submit(*args))
        return pending[-1]

    monkeypatch.setattr(flash.ffn._prefill_thread, "submit", submitted)
    next(chunks)  # the second landed, the third is being read
    chunks.close()  # as when the caller raises
    assert len(pending) == 1 and pending[0].done()
    flash.ffn.close()
