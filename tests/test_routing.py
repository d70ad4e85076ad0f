"""A mixture of experts' routing recorded on calibration text (predictors/routing.py):
the rates are the router's counts, the hit rates are what the experts placement's
cache measures, the manifest stays valid, and the planner predicts from them."""

import shutil

import numpy as np
import pytest
from cli_checks import assert_refused, run
from test_moe import budgets, moe_layout
from test_plan import fake_machine
from tiny_models import WORDS
from tiny_moe import tiny_moe_configs

from mlx_flashinfer import Layout, load
from mlx_flashinfer.formats.tokenizer import load_tokenizer
from mlx_flashinfer.predictors.routing import (
    SEQUENCE_TOKENS,
    capacity_grid,
    record_routing,
    routing_sequences,
    warmup_tokens,
)


def words(count: int, seed: int = 0) -> str:
    """A text of the tiny tokenizer's words, skewed towards some (as text is)."""
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, len(WORDS) + 1)
    return " ".join(rng.choice(WORDS, count, p=p / p.sum()))


def copied(tmp_path, name="qwen2-moe"):
    """A private copy of a tiny MoE layout (the session's are shared: recording
    writes the manifest)."""
    return shutil.copytree(
        moe_layout(name, tiny_moe_configs()[name]), tmp_path / "layout"
    )


def test_the_capacity_grid():
    assert capacity_grid(64, 8) == list(range(8, 65, 4))
    assert capacity_grid(8, 2) == [2, 3, 4, 5, 6, 7, 8]
    assert capacity_grid(5, 1) == [1, 2, 3, 4, 5]


def test_recorded_routing_is_the_routers_and_the_caches(tmp_path):
    path = copied(tmp_path)
    text = words(400)
    section = record_routing(path, texts={"words": text}, tokens=256, progress=False)
    layout = Layout.open(path)
    layout.verify()  # the manifest's checksum and every file's, after the rewrite
    args = layout.args
    k, experts = args.experts_per_token, args.num_experts
    assert layout.manifest["routing"] == section
    assert section["tokens"] == 256 and section["texts"] == ["words"]
    # the rates: each token's k experts, counted by routing the same prompts through
    # the whole dense model (every expert in memory) with the router wrapped
    sequences = routing_sequences(
        load_tokenizer(layout), {"words": text}, 256, min(SEQUENCE_TOKENS, 64)
    )
    dense, _ = load(path, backend="numpy")
    counts = np.zeros((args.num_hidden_layers, experts))
    route = dense.ffn.route

    def counting(layer, h):
        ids, weights = route(layer, h)
        np.add.at(counts[layer], ids.ravel(), 1)
        return ids, weights

    dense.ffn.route = counting
    for seq in sequences:
        dense.logits(seq)
    rates = np.array(section["rates"])
    assert rates.sum(axis=1) == pytest.approx(k, abs=1e-4)
    assert rates == pytest.approx(counts / 256, abs=1e-6)
    # the hit rates: what the experts placement's cache measures decoding the same
    # prompts a token at a time, past each one's first `warmup` tokens
    warmup = warmup_tokens(args)
    assert section["warmup"] == warmup
    for at, capacity in enumerate(section["capacities"][:3]):
        spare = args.num_hidden_layers * (capacity - k) * (layout.bundle_bytes + 8)
        model, _ = load(
            path,
            backend="numpy",
            memory_budget=budgets(path)["least"] + spare,
            window=4,
            max_context=64,
        )
        assert model.ffn.plan.capacity == [capacity] * args.num_hidden_layers
        hits = routed = 0
        for seq in sequences:
            cache = model.make_cache()
            for t, token in enumerate(seq):
                if t == warmup:
                    before = model.io_stats()["decode"]
                model([token], cache)
            after = model.io_stats()["decode"]
            hits += after["neurons_hit"] - before["neurons_hit"]
            routed += after["neurons_predicted"] - before["neurons_predicted"]
        model.ffn.close()
        measured = [layer[at] for layer in section["hit_rates"]]
        assert np.mean(measured) == pytest.approx(hits / routed, abs=1e-6)
        assert capacity < experts and 0 < hits < routed


def test_the_planner_predicts_from_the_recorded_routing(tmp_path):
    from mlx_flashinfer.flash.expert_plan import plan_experts
    from mlx_flashinfer.flash.memory import model_bytes
    from mlx_flashinfer.plan.expert_costs import (
        experts_cost,
        experts_paging_cost,
        hit_rates,
    )

    path = copied(tmp_path)
    machine = fake_machine(disk_rate=1e8)
    half = budgets(path)["half"]
    resident, ffn = model_bytes(Layout.open(path))

    def predicted():
        layout = Layout.open(path)
        plan = plan_experts(layout, half, 0, 64)
        return (
            layout,
            plan,
            experts_cost(layout, plan, machine, 4),
            # a page cache of half the experts beside the resident weights
            experts_paging_cost(layout, resident + ffn // 2, machine),
        )

    _, _, assumed, assumed_paging = predicted()
    assert "assumed" in assumed.note
    record_routing(path, texts=[words(400)], tokens=256, progress=False)
    layout, plan, measured, measured_paging = predicted()
    assert "measured on 256 tokens of text 1" in measured.note
    section = layout.manifest["routing"]
    k = layout.args.experts_per_token
    # the bytes read follow the recorded curve at the plan's capacity (bundles
    # off the 512-byte alignment read with the aligned bytes around them)
    misses = sum(k * (1 - hit) for hit in hit_rates(layout, plan.capacity)[0])
    slack = 0 if layout.bundle_bytes % 512 == 0 else 512
    assert misses > 0
    assert measured.bytes_read == pytest.approx(misses * (layout.bundle_bytes + slack))
    assert measured.bytes_read != pytest.approx(assumed.bytes_read)
    assert measured_paging.bytes_read != pytest.approx(assumed_paging.bytes_read)
    # on the grid the recorded value, between two points the line through them, a
    # cache of every expert reads nothing
    grid, rates = section["capacities"], section["hit_rates"][1]
    layers = layout.args.num_hidden_layers

    def hit_rate(layer, capacity):
        return hit_rates(layout, [capacity] * layers)[0][layer]

    assert hit_rate(1, grid[2]) == pytest.approx(rates[2])
    middle = (grid[1] + grid[2]) / 2
    assert hit_rate(1, middle) == pytest.approx((rates[1] + rates[2]) / 2)
    assert hit_rate(1, layout.args.num_experts) == 1.0
    assert hit_rate(1, 0) == 0.0


def test_train_predictor_records_a_mixture_of_experts_routing(tmp_path, capsys):
    path = copied(tmp_path)
    text = tmp_path / "words.txt"
    text.write_text(words(400))
    base = ["train-predictor", path, "--text", text]
    for option, value in (
        ("--kind", "lowrank"),
        ("--sparsity", "0.3"),
        ("--max-loss", "3%"),
        ("--rank", "8"),
        ("--force", None),
    ):
        argv = [*base, option] + ([value] if value else [])
        assert_refused(argv, f"{option}: not for a mixture of experts", capsys)
    assert "routing" not in Layout.open(path).manifest  # nothing written
    status, out, err = run([*base, "--tokens", "256"], capsys)
    assert status == 0, err
    assert "routing recorded on 256 tokens (texts)" in out and "most routed" in out
    assert len(Layout.open(path).manifest["routing"]["rates"]) == 2
    status, out, err = run(["inspect", path], capsys)
    assert status == 0, err
    assert "measured on 256 tokens of words.txt: a cache of half" in out


def test_a_skewed_router_hits_more_than_uniform_routing(tmp_path):
    # the synthetic MoE's routers prefer some experts (bench/synth_moe.py): its
    # measured hit rate at half the experts beats the uniform assumption's 50%
    from mlx_flashinfer.bench.synth_moe import write_synthetic_moe
    from mlx_flashinfer.plan.expert_costs import lru_hit_rate

    path = write_synthetic_moe(
        tmp_path / "synth", "moe-tiny", "float32", progress=False
    )
    section = record_routing(path, tokens=1024, progress=False)
    assert section["source"] == "shipped corpus" and len(section["texts"]) == 5
    half = section["capacities"].index(4)  # of 8 experts
    for layer, rates in zip(section["hit_rates"], section["rates"], strict=True):
        assert layer[half] > 0.5 + 0.04
        # and the curve grows with the cache
        assert np.all(np.diff(layer) >= 0)
        # Che's approximation from the measured rates alone sits between
        assert 0.5 < lru_hit_rate(np.array(rates), 4) < 1.0


def test_a_token_stream_is_recorded_as_given(tmp_path):
    path = copied(tmp_path)
    rng = np.random.default_rng(1)
    stream = [rng.integers(3, 40, n).tolist() for n in (64, 50)]
    section = record_routing(path, token_ids=stream, progress=False)
    assert section["tokens"] == 114 and section["texts"] == ["token ids"]
    assert section["counted"] == 114 - 2 * section["warmup"]
    with pytest.raises(ValueError, match="texts or token_ids"):
        record_routing(path, texts=["the"], token_ids=stream, progress=False)
    with pytest.raises(ValueError, match="the model's context"):
        record_routing(path, token_ids=[list(range(65))], progress=False)
    from test_flash import tiny_layout

    with pytest.raises(ValueError, match="is a dense model"):
        record_routing(tiny_layout("llama", "silu", 2, 32, 2), progress=False)
