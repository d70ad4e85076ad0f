"""The streamed placement: every neuron computed, a share of each layer held and the
rest read every token ahead of compute; exact for any activation, within its plan."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_flash import BACKENDS, tiny_layout

from mlx_flashinfer import Layout, load
from mlx_flashinfer.flash.memory import (
    io_buffer_bytes,
    model_bytes,
    plan_streamed,
    slot_bytes,
)
from mlx_flashinfer.flash.reader import FlashReader
from mlx_flashinfer.flash.streamed import StreamedFFN, StreamRing, stream_schedule
from mlx_flashinfer.model.transformer import Model

ACTIVATIONS = [("llama", "silu"), ("llama", "relu"), ("opt", "relu")]


def streamed_budget(layout, fraction: float, chunk_rows: int, slots: int) -> int:
    """A budget from the smallest a streamed plan takes (nothing held) to all held."""
    lay = Layout.open(layout)
    resident, ffn = model_bytes(lay)
    ring = slots * slot_bytes(chunk_rows, lay.bundle_bytes)
    smallest = resident + io_buffer_bytes(lay) + ring
    return int(smallest + fraction * (ffn + 1))


@settings(max_examples=30, deadline=None)
@given(
    model=st.sampled_from(ACTIVATIONS),
    ffn=st.integers(4, 60),
    layers=st.integers(1, 3),
    fraction=st.floats(0.0, 1.0),
    backend=st.sampled_from(BACKENDS),
    tokens=st.lists(st.integers(0, 39), min_size=2, max_size=10),
    data=st.data(),
)
def test_streamed_logits_equal_dense_logits_for_every_activation(
    model, ffn, layers, fraction, backend, tokens, data
):
    layout = tiny_layout(*model, 2, ffn, layers)
    lay = Layout.open(layout)
    prefill = data.draw(st.integers(1, len(tokens)), label="prefill")
    chunk_rows = data.draw(st.integers(1, ffn), label="chunk_rows")
    slots = data.draw(st.integers(2, 5), label="slots")
    budget = streamed_budget(layout, fraction, chunk_rows, slots)
    plan = plan_streamed(
        lay, budget, 0, 64, chunk_bytes=chunk_rows * lay.bundle_bytes, slots=slots
    )
    dense, _ = load(layout, backend=backend)
    ffn_streamed = StreamedFFN(dense.backend, lay, dense.w, plan)
    flash = Model(lay.args, dense.backend, dense.w, ffn_streamed, dense.max_context)
    try:
        expected = dense.logits(tokens, prefill=prefill)
        got = flash.logits(tokens, prefill=prefill)
        assert np.abs(got - expected).max() <= 1e-5
        held = flash.held_bytes()
        assert sum(held.values()) == plan.weights <= plan.budget
        # every token (the prompt once) reads every row not held, once
        streamed = sum(ffn - held for held in plan.capacity) * lay.bundle_bytes
        passes = 1 + len(tokens) - prefill
        assert flash.io_stats()["bytes_useful"] == streamed * passes
    finally:
        flash.ffn.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_streams_within_its_budget(backend):
    layout = tiny_layout("llama", "silu", 2, 200, 12)
    lay = Layout.open(layout)
    resident, ffn = model_bytes(lay)
    ring = 6 * slot_bytes(200, lay.bundle_bytes)  # 12 spans: 6 slots of a layer
    budget = resident + io_buffer_bytes(lay) + ring + ffn // 4
    dense, _ = load(layout, backend=backend)
    flash, _ = load(layout, backend=backend, memory_budget=budget, placement="streamed")
    assert flash.plan.placement == "streamed" and 0 < flash.plan.capacity[0] < 200
    tokens = [5, 6, 7, 8, 9]
    got, expected = flash.logits(tokens, prefill=3), dense.logits(tokens, prefill=3)
    assert np.abs(got - expected).max() <= 1e-5
    assert sum(flash.held_bytes().values()) == flash.plan.weights <= budget
    with pytest.raises(ValueError, match="no predictor"):
        load(layout, memory_budget=budget, placement="streamed", predictor="gate")
    with pytest.raises(ValueError, match="unknown placement"):
        load(layout, memory_budget=budget, placement="nowhere")
    flash.ffn.close()


def test_a_plan_holds_an_equal_share_of_every_layer_and_streams_the_rest():
    layout = Layout.open(tiny_layout("llama", "silu", 2, 48, 3))
    resident, ffn = model_bytes(layout)
    whole = plan_streamed(layout, resident + 2 * ffn, 0, 64)
    assert whole.capacity == [48, 48, 48] and whole.ring_slots == 0
    half = plan_streamed(layout, resident + io_buffer_bytes(layout) + 2**20, 0, 64)
    assert half.placement == "streamed" and max(half.capacity) - min(half.capacity) <= 1
    assert half.weights <= half.budget
    with pytest.raises(ValueError, match="too small to stream.*bytes more"):
        plan_streamed(layout, resident, 0, 64)


def test_a_token_cut_short_leaves_the_ring_ahead_and_the_next_token_exact():
    """Rule 2: the reads run in a fixed order; layers a cut token never reached
    leave their spans in the ring, and the next token skips them."""
    layout = tiny_layout("llama", "silu", 2, 400, 3)
    lay = Layout.open(layout)
    chunk = 40 * lay.bundle_bytes  # several spans a layer, 3 slots: the ring runs ahead
    budget = streamed_budget(layout, 0.3, 40, 3)
    plan = plan_streamed(lay, budget, 0, 64, chunk_bytes=chunk, slots=3)
    dense, _ = load(layout)
    flash = Model(
        lay.args,
        dense.backend,
        dense.w,
        StreamedFFN(dense.backend, lay, dense.w, plan),
        64,
    )
    assert plan.ring_slots == 3 and 0 < plan.capacity[0] < 400
    tokens = [3, 1, 4, 1, 5]
    flash.logits(tokens[:2], prefill=1)
    # a token that stops after its first layer (an error, Ctrl-C)
    flash.ffn(0, np.zeros((1, lay.args.hidden_size), np.float32))
    expected = dense.logits(tokens, prefill=2)
    got = flash.logits(tokens, prefill=2)
    assert np.abs(got - expected).max() <= 1e-5
    flash.ffn.close()


def test_the_ring_reads_its_schedule_in_order_and_refills_released_slots(tmp_path):
    path = tmp_path / "ffn.bin"
    data = np.arange(3 * 8192, dtype=np.uint8)
    data.tofile(path)
    from mlx_flashinfer.formats.layout import LayerExtent

    layers = [LayerExtent(0, 64), LayerExtent(8192, 64), LayerExtent(16384, 64)]
    schedule = stream_schedule([10, 64, 0], 64, 20)
    assert schedule == [
        (0, 10, 30),
        (0, 30, 50),
        (0, 50, 64),
        (2, 0, 20),
        (2, 20, 40),
        (2, 40, 60),
        (2, 60, 64),
    ]
    with FlashReader(path, layers, 128, threads=2, mode="buffered") as reader:
        ring = StreamRing(reader, schedule, 20 * 128 + 2 * 4096, 2)
        try:
            for _ in range(2):  # two tokens: the schedule repeats
                for layer, start, stop in schedule:
                    chunk = ring.take(layer, start)
                    assert (chunk.layer, chunk.stop) == (layer, stop)
                    got = ring.bytes[chunk.at : chunk.at + (stop - start) * 128]
                    first = layers[layer].offset + start * 128
                    assert np.array_equal(got, data[first : first + len(got)])
                    ring.release(chunk)
        finally:
            ring.close()


def test_generate_streamed_with_stats(capsys):
    # a SiLU model streamed is exact: no line on approximate sparsity (the report
    # once asked the streamed FFN for a predictor it does not have)
    from cli_checks import run

    layout = tiny_layout("llama", "silu", 2, 200, 12)
    lay = Layout.open(layout)
    resident, ffn = model_bytes(lay)
    budget = resident + io_buffer_bytes(lay) + 6 * slot_bytes(200, lay.bundle_bytes)
    budget += ffn // 4
    status, out, err = run(
        ["generate", "--model", str(layout), "-p", "the", "-m", "3", "--stats"]
        + ["--memory-budget", str(budget), "--placement", "streamed"],
        capsys,
    )
    assert status == 0, err
    assert "flash, per decoded token" in out + err
    assert "approximate" not in out + err
