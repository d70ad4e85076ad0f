"""Synthetic sparse models: the structure they are built with is what they run with."""

import numpy as np
import pytest

from mlx_flashinfer import Layout, load
from mlx_flashinfer.bench.synth import write_synthetic
from mlx_flashinfer.bench.synth_moe import MOE_SHAPES
from mlx_flashinfer.bench.synth_opt import SHAPES, Structure, SyntheticOPT, simulate
from mlx_flashinfer.formats.experts import router_name
from mlx_flashinfer.model.moe import route

TOKENS = np.random.default_rng(0).integers(4, 512, 200).tolist()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    bundled = write_synthetic(folder / "bundled", "opt-tiny", progress=False)
    separate = write_synthetic(
        folder / "separate", "opt-tiny", arrangement="separate", progress=False
    )
    return bundled, separate


def decode_stats(layout, **flash):
    model, _ = load(layout, memory_budget="200%", **flash)
    logits = model.logits(TOKENS, prefill=64)
    stats = model.io_stats()["decode"]
    neurons = model.args.intermediate_size * model.args.num_hidden_layers
    return logits, stats, neurons


def test_layout_is_valid_deterministic_and_sized_as_asked(synthetic, tmp_path):
    bundled, separate = synthetic
    layout = Layout.open(bundled)
    layout.verify()
    assert layout.args.family == "opt" and layout.args.hidden_size == 64
    assert layout.manifest["source"]["kind"] == "synthetic"
    again = write_synthetic(tmp_path / "again", "opt-tiny", progress=False)
    assert Layout.open(again).manifest["files"] == layout.manifest["files"]
    assert Layout.open(separate).arrangement == "separate"
    np.testing.assert_array_equal(
        Layout.open(separate).read_bundles(1), layout.read_bundles(1)
    )


def test_the_forward_pass_has_the_built_in_sparsity_and_reuse(synthetic):
    bundled, _ = synthetic
    dense, _ = load(bundled)
    expected = dense.logits(TOKENS, prefill=64)
    logits, oracle, neurons = decode_stats(bundled, predictor="oracle", window=4)
    assert np.abs(logits - expected).max() < 1e-4  # ReLU: exact through flash
    source = SyntheticOPT("opt-tiny", Structure())
    built = np.mean([source.layer_rate(i) for i in range(2)])
    active = oracle["neurons_predicted"] / oracle["tokens"] / neurons
    assert built / 2 < active < built * 2  # about 97% of neurons stay inactive
    _, alone, _ = decode_stats(bundled, predictor="lowrank", window=0)
    _, windowed, _ = decode_stats(bundled, predictor="lowrank", window=4)
    predicted = alone["neurons_predicted"] / alone["tokens"] / neurons
    assert 2 * active < predicted < 4 * active  # the predictor predicts about 3x
    assert windowed["bytes_useful"] < alone["bytes_useful"] / 2  # the window reuses


def test_simulation_matches_the_targets_it_was_calibrated_to():
    model = SyntheticOPT("opt-tiny", Structure())
    result = simulate(model, 1)
    assert result["window_load"] == pytest.approx(0.024, rel=0.15)
    assert result["report"]["recall"] > 0.9


def test_bad_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown shape 'opt-9000b'"):
        write_synthetic(tmp_path / "x", "opt-9000b", progress=False)
    with pytest.raises(ValueError, match="slow_dims"):
        write_synthetic(
            tmp_path / "x", "opt-tiny", structure=Structure(slow_dims=3), progress=False
        )
    assert not (tmp_path / "x").exists()


def test_custom_sizes(tmp_path):
    opt = dict(SHAPES["opt-tiny"], num_hidden_layers=3, ffn_dim=256)
    args = Layout.open(write_synthetic(tmp_path / "opt", opt, progress=False)).args
    assert (args.family, args.num_hidden_layers, args.intermediate_size) == (
        "opt",
        3,
        256,
    )
    with pytest.raises(ValueError, match="not a multiple of the 4 attention heads"):
        write_synthetic(tmp_path / "x", dict(opt, hidden_size=30), progress=False)
    assert not (tmp_path / "x").exists()


def test_llama_fatrelu_model_has_its_structure(tmp_path):
    layout = write_synthetic(tmp_path / "llama", "llama-tiny", progress=False)
    assert Layout.open(layout).args.hidden_act == "fatrelu"
    tokens = np.random.default_rng(1).integers(4, 512, 300).tolist()
    dense, _ = load(layout)
    expected = dense.logits(tokens, prefill=128)
    flash, _ = load(layout, memory_budget="200%", predictor="oracle", window=2)
    assert np.abs(flash.logits(tokens, prefill=128) - expected).max() < 1e-4
    oracle = flash.io_stats()["decode"]
    neurons = 2 * 512
    active = oracle["neurons_predicted"] / oracle["tokens"] / neurons
    assert 0.04 < active < 0.2  # about 90% of neurons stay inactive
    lowrank, _ = load(layout, memory_budget="200%", window=2)
    lowrank.logits(tokens, prefill=128)
    stats = lowrank.io_stats()["decode"]
    predicted = stats["neurons_predicted"] / stats["tokens"] / neurons
    assert 1.3 * active < predicted < 3 * active
    assert (
        stats["neurons_loaded"] + stats["neurons_scratch"]
        < stats["neurons_predicted"] / 2
    )


def test_synthetic_moe_is_deterministic_skewed_and_records_custom_sizes(tmp_path):
    """A synthetic MoE (bench/synth_moe.py) writes the same files twice, at float16
    and q4; popular experts win more routings than uniform routing would give; a
    custom shape's sizes are in the manifest, so the same source can be rebuilt."""
    from mlx_flashinfer.bench.synth_moe import SyntheticMoE, write_synthetic_moe

    sizes = {**MOE_SHAPES["moe-tiny"], "num_hidden_layers": 1, "hidden_size": 32}
    first = write_synthetic_moe(tmp_path / "a", sizes, "float16", progress=False)
    again = write_synthetic_moe(tmp_path / "b", sizes, "float16", progress=False)
    layout = Layout.open(first)
    layout.verify()
    assert layout.manifest["files"] == Layout.open(again).manifest["files"]
    source = layout.manifest["source"]
    assert source["shape"] == "custom" and source["sizes"] == sizes
    rebuilt = SyntheticMoE(source["sizes"], source["seed"], source["skew"])
    assert rebuilt.args.hidden_size == 32 and rebuilt.args.num_hidden_layers == 1
    q4 = write_synthetic_moe(tmp_path / "q4", "moe-tiny", "q4", progress=False)
    assert Layout.open(q4).dtype == "q4"
    assert "sizes" not in Layout.open(q4).manifest["source"]  # a named shape
    # skew: the routers of the source, on its normalised embeddings of random
    # tokens, send more than 2/experts of the routings to the most popular expert
    tiny = SyntheticMoE("moe-tiny", 0, 1.0)
    h = tiny.tensor("embed_tokens.weight")[TOKENS]
    h /= np.sqrt((h * h).mean(axis=1, keepdims=True))
    experts = tiny.args.num_experts
    for layer in range(tiny.args.num_hidden_layers):
        logits = h @ tiny.tensor(router_name(tiny.args, layer)).T
        ids, _ = route(tiny.args, logits)
        counts = np.bincount(ids.reshape(-1), minlength=experts)
        assert counts.max() / counts.sum() > 2 / experts  # uniform (skew 0): 1.3
