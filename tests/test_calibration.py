"""Calibration: the shipped texts and their splits, the layer-by-layer runner, cuts
for a recall target, and the per-layer sparsity allocation for a loss target."""

import numpy as np
import pytest
from conftest import DATA
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import TOKENS, random_weights, tiny_config, write_hf_checkpoint

from fallback_numpy import backend as numpy_backend
from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.predictors import quality, texts
from mlx_flashinfer.predictors.calibrate import (
    TUNE_EVERY,
    LayerByLayer,
    calibration_sequences,
    domain_sequences,
    split_domains,
    split_sequences,
)
from mlx_flashinfer.predictors.lowrank import LowRankPredictor
from mlx_flashinfer.predictors.lowrank_fit import cut_for_recall, cut_report

BOOK = DATA / "alice_in_wonderland.txt"


def test_the_calibration_text_is_the_first_half_and_never_what_is_scored():
    calibration, passage = texts.calibration_text(), texts.verify_text()
    assert len(calibration) > 70_000 and "CHAPTER VI.\n" in calibration
    assert "CHAPTER VII.\n" not in calibration  # chapters I-VI (and the contents)
    assert passage.startswith("CHAPTER IX.") and passage not in calibration
    if not BOOK.exists():
        pytest.skip(f"{BOOK} is not here: the positions in the book go unchecked")
    book = BOOK.read_text(encoding="utf-8")
    held_out = texts.held_out_part(book)
    assert calibration + held_out == book
    assert 0.45 < len(calibration) / len(book) < 0.55  # the first half
    # the verify passage lies wholly after the calibration text
    assert book.index(passage) >= len(calibration) and passage in held_out
    with pytest.raises(ValueError, match="does not start with the shipped"):
        texts.held_out_part(held_out)


@settings(max_examples=100, deadline=None)
@given(count=st.integers(2, 400))
def test_train_and_tune_sequences_are_disjoint_and_cover_all(count):
    train, tune = split_sequences(count)
    assert not set(train) & set(tune)
    assert sorted(train + tune) == list(range(count))
    assert train and tune
    assert len(tune) == max(1, count // TUNE_EVERY)


def test_one_sequence_cannot_be_split():
    with pytest.raises(ValueError, match="need 2"):
        split_sequences(1)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(128, 3000), seq_len=st.integers(8, 512))
def test_calibration_sequences_keep_the_tokens_in_order(tokens, seq_len):
    class Words:  # a tokenizer: one id per character
        def encode(self, text):
            return [ord(c) % 97 for c in text]

    text = texts.calibration_text()
    sequences = calibration_sequences(Words(), [text], tokens, seq_len)
    ids = Words().encode(text)[:tokens]
    joined = [t for s in sequences for t in s]
    assert joined == ids[: len(joined)] and len(ids) - len(joined) <= 1
    assert len(sequences) >= TUNE_EVERY  # always one at least to tune on
    assert max(len(s) for s in sequences) <= seq_len


@pytest.fixture(scope="module")
def silu_layout(tmp_path_factory):
    config = tiny_config("llama", "silu", hidden_size=32, intermediate_size=64)
    folder = tmp_path_factory.mktemp("silu")
    src = write_hf_checkpoint(folder / "src", config, random_weights(config, seed=3))
    return convert(src, folder / "layout", dtype="float32", progress=False)


@pytest.mark.parametrize("name", ["silu", "opt"])
def test_layer_by_layer_computes_what_the_model_computes(silu_layout, tmp_path, name):
    if name == "silu":
        layout = silu_layout
    else:
        config = tiny_config("opt")
        src = write_hf_checkpoint(tmp_path / "src", config, random_weights(config))
        layout = convert(src, tmp_path / "layout", dtype="float32", progress=False)
    dense, _ = load(layout, backend="numpy")
    sequences = [TOKENS, TOKENS[3:9], TOKENS[::-1]]
    runner = LayerByLayer(Layout.open(layout), "numpy")
    streams = runner.embed(sequences)
    for layer in range(dense.args.num_hidden_layers):
        runner.load(layer)
        kept = runner.run(
            layer,
            streams,
            keep=lambda h: np.ones((h.shape[0], dense.args.intermediate_size), bool),
        )
        streams, records = runner.run(layer, streams, record=lambda *a: a)
        for a, b in zip(kept, streams, strict=True):
            np.testing.assert_array_equal(a, b)  # keeping every neuron changes nothing
        assert [r[0].shape[0] for r in records] == [len(s) for s in sequences]
    for seq, x in zip(sequences, streams, strict=True):
        np.testing.assert_allclose(
            runner.head(x), dense.logits(seq), rtol=1e-4, atol=1e-4
        )


def test_skipped_neurons_add_nothing(silu_layout):
    """`keep` drops exactly the activations it masks: the layer's output moves by
    the masked neurons' down columns times their activations."""
    runner = LayerByLayer(Layout.open(silu_layout), "numpy")
    runner.load(0)
    (x,) = runner.embed([TOKENS])
    rng = np.random.default_rng(0)
    mask = rng.random((len(TOKENS), 64)) < 0.5
    (full,), ((h, gate, up, act),) = runner.run(0, [x], record=lambda *a: a)
    (part,) = runner.run(0, [x], keep=lambda h: mask)
    down = Layout.open(silu_layout).read_parts(0)[2].astype(np.float32)
    np.testing.assert_allclose(full - part, (act * ~mask) @ down, rtol=1e-4, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 20),
    neurons=st.integers(1, 40),
    recall=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_cut_for_recall_is_the_highest_cut_that_keeps_the_recall(
    tokens, neurons, recall, seed
):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((tokens, neurons)).astype(np.float32)
    z[rng.random(z.shape) < 0.2] = 0.5  # ties
    Y = rng.random((tokens, neurons)) < 0.4
    cut = cut_for_recall(z, Y, recall)
    if not Y.any():
        assert cut is None
        return
    assert cut_report(z, Y, cut)["recall"] >= recall - 1e-9
    higher = z[Y][z[Y] > cut]  # any higher cut drops the lowest positive kept
    if len(higher):
        assert cut_report(z, Y, float(higher.min()))["recall"] < recall


def test_per_layer_cuts_and_an_override(silu_layout):
    rng = np.random.default_rng(1)
    A = [rng.standard_normal((4, 32)).astype(np.float32) for _ in range(2)]
    B = [rng.standard_normal((64, 4)).astype(np.float32) for _ in range(2)]
    h = rng.standard_normal((5, 32)).astype(np.float32)
    tuned = LowRankPredictor(numpy_backend, A, B, cuts=[None, 0.7])
    assert tuned.predict(0, h).all()  # None: every neuron
    np.testing.assert_array_equal(tuned.predict(1, h), (h @ A[1].T @ B[1].T) > 0.7)
    override = LowRankPredictor(numpy_backend, A, B, threshold=0.5, cuts=[None, 0.7])
    np.testing.assert_array_equal(override.predict(0, h), (h @ A[0].T @ B[0].T) > 0)
    with pytest.raises(ValueError, match="1 cuts for 2 layers"):
        LowRankPredictor(numpy_backend, A, B, cuts=[0.1])


def grids_from(errors: list[list[float]]) -> list[quality.LayerGrid]:
    return [quality.LayerGrid([None] * len(e), [{}] * len(e), e) for e in errors]


@settings(max_examples=60, deadline=None)
@given(
    increments=st.lists(
        st.lists(
            st.floats(0, 1),
            min_size=len(quality.GRID) - 1,
            max_size=len(quality.GRID) - 1,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_the_greedy_path_takes_the_cheapest_step_each_time(increments):
    errors = [list(np.concatenate([[0.0], np.cumsum(inc)])) for inc in increments]
    grids = grids_from(errors)
    path = quality.greedy_path(grids)
    assert len(path) == len(grids) * (len(quality.GRID) - 1)  # every layer to the top
    steps = [0] * len(grids)
    for layer in path:
        options = [
            errors[i][steps[i] + 1] - errors[i][steps[i]]
            for i in range(len(grids))
            if steps[i] + 1 < len(quality.GRID)
        ]
        assert errors[layer][steps[layer] + 1] - errors[layer][steps[layer]] == min(
            options
        )
        steps[layer] += 1


@settings(max_examples=100, deadline=None)
@given(
    layers=st.integers(1, 4),
    per_step=st.lists(st.floats(0.0, 0.05), min_size=40, max_size=40),
    target=st.floats(0.001, 0.5),
    seed=st.integers(0, 1000),
)
def test_allocate_finds_the_longest_prefix_within_the_target(
    layers, per_step, target, seed
):
    """Against a loss that grows along the path, the allocation meets the target,
    and the prefix is within 1/64 of the path (or MAX_PASSES) of the longest that
    does; when the first step alone exceeds it, the result says so."""
    rng = np.random.default_rng(seed)
    path = list(rng.integers(0, layers, layers * (len(quality.GRID) - 1)))
    cumulative = np.concatenate([[0.0], np.cumsum(per_step)])

    def loss_of(steps):
        k = sum(steps)  # a prefix's length is its total of steps
        return float(cumulative[min(k, len(cumulative) - 1)] * (1 + k / 100))

    calls = []
    result = quality.allocate(
        path, layers, target, lambda s: calls.append(1) or loss_of(s)
    )
    assert len(calls) <= quality.MAX_PASSES + 1
    best = max(
        k
        for k in range(len(path) + 1)
        if loss_of(quality.steps_after(path, k, layers)) <= target
    )
    if best == 0 and loss_of(quality.steps_after(path, 1, layers)) > target:
        assert not result.met and sum(result.steps) == 1
        assert result.loss == loss_of(result.steps)
        return
    assert result.met and result.loss <= target
    assert result.loss == loss_of(result.steps)
    assert best - sum(result.steps) <= max(1, len(path) // 64)


class Chars:  # a tokenizer: one id per character, a plain chat template
    chat_template = None

    def encode(self, text):
        return [ord(c) % 97 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(32, 4000), min_size=1, max_size=5),
    tokens=st.integers(128, 6000),
    seq_len=st.integers(8, 512),
)
def test_domain_sequences_share_the_tokens_and_spread_over_each_text(
    lengths, tokens, seq_len
):
    domains = {
        f"d{i}": "abcdefghij" * (n // 10) + "x" * (n % 10)
        for i, n in enumerate(lengths)
    }
    if sum(min(tokens // len(lengths), n) for n in lengths) < 128:
        with pytest.raises(ValueError, match="too short to train on"):
            domain_sequences(Chars(), domains, tokens, seq_len)
        return
    sequences, names = domain_sequences(Chars(), domains, tokens, seq_len)
    train, tune = split_domains(names)
    assert sorted(train + tune) == list(range(len(sequences)))
    for name, n in zip(domains, lengths, strict=True):
        own = [s for s, d in zip(sequences, names, strict=True) if d == name]
        assert sum(len(s) for s in own) == min(tokens // len(lengths), n)
        take = min(tokens // len(lengths), n)
        assert len(own) >= min(TUNE_EVERY, take // 2) and min(map(len, own)) >= 2
        assert max(map(len, own)) <= seq_len or len(own) == min(TUNE_EVERY, take // 2)
        assert {names[j] for j in tune} == set(domains)  # every domain tuned on
        assert {names[j] for j in train} == set(domains)


def test_domain_sequences_reach_the_end_of_a_long_text():
    text = "".join(chr(97 + i % 26) for i in range(10_000))
    sequences, _ = domain_sequences(Chars(), {"long": text}, 1000, 100)
    ids = Chars().encode(text)
    assert sequences[0] == ids[:100] and sequences[-1] == ids[-100:]
    assert len(sequences) == 10


def test_a_domain_too_short_is_refused_by_name():
    with pytest.raises(ValueError, match="'tiny' is too short to train on: 5 tokens"):
        domain_sequences(Chars(), {"long": "a" * 500, "tiny": "abcde"}, 400, 64)


def test_the_shipped_corpus_has_every_domain_and_its_held_out_part_apart():
    """Five domains, a few hundred KB in all, each with held-out passages that
    calibration never reads; the chat domain rendered through the chat template;
    every shipped file named in data/README.md with its source and licence."""
    corpus = texts.calibration_domains(Chars())
    held = texts.held_out_domains(Chars())
    assert list(corpus) == list(held) == list(texts.DOMAINS)
    assert len(corpus) == 5
    assert corpus["chat"].startswith("user: ") and "assistant: " in corpus["chat"]
    for name, text in corpus.items():
        assert len(text) > 4000 and len(held[name]) > 1000, name
        for line in held[name].splitlines():
            if len(line) > 60:  # no held-out line (beyond boilerplate) calibrates
                assert line not in text, (name, line)
    data = texts.resources.files(texts.__package__) / "data"
    files = sorted(f.name for f in data.iterdir() if f.name != "README.md")
    assert sum((data / f).stat().st_size for f in files) < 300_000
    readme = (data / "README.md").read_text(encoding="utf-8")
    for f in files:
        assert f"`{f}`" in readme, f


def test_a_cuts_error_is_its_worst_domains():
    """Two domains of 50 tokens: the second's activations are 3x larger on every
    neuron, so at every cut the worst domain's mean error is the second's, 9x the
    first's; without groups the error is the mean of all tokens."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((100, 16))
    act = np.ones((100, 16))
    act[50:] = 3.0
    args = (z, z > 0, act, np.ones(16), np.full(100, 4.0))
    groups = [np.arange(50), np.arange(50, 100)]
    pooled = quality.layer_grid(*args)
    worst = quality.layer_grid(*args, groups=groups)
    assert worst.cuts == pooled.cuts and worst.error[0] == pooled.error[0] == 0.0
    weight = act**2 / 16.0
    rows = zip(worst.cuts[1:], worst.error[1:], pooled.error[1:], strict=True)
    for cut, error, mean in rows:
        per_token = np.where(z <= cut, weight, 0.0).sum(axis=1)
        assert error == pytest.approx(per_token[50:].mean())
        assert mean == pytest.approx(per_token.mean())
