"""The Llama family's variants (Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3): dense equal to
transformers on both backends, flash equal to dense where it computes every neuron,
flash at a small budget, their conversion and their predictors."""

from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_refused
from tiny_models import (
    TOKENS,
    family_configs,
    has_mlx,
    longrope_configs,
    random_weights,
    tiny_config,
    write_hf_checkpoint,
)

from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.flash.memory import SLOT_BYTES, model_bytes, plan_floor
from mlx_flashinfer.formats.args import ModelArgs
from mlx_flashinfer.formats.checkpoints import open_checkpoint
from mlx_flashinfer.model.transformer import gate_magnitude, gelu_tanh_numpy
from mlx_flashinfer.predictors.kinds import predictor_nbytes
from mlx_flashinfer.predictors.train import train_predictor

BACKENDS = ["numpy"] + (["mlx"] if has_mlx() else [])
FAMILIES = list(family_configs())
GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        name: write_hf_checkpoint(root / name, config, random_weights(config, seed=3))
        for name, config in family_configs().items()
    }


@pytest.fixture(scope="module")
def layouts(sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family-layouts")
    return {
        name: convert(src, root / name, dtype="float32", progress=False)
        for name, src in sources.items()
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_dense_logits_equal_transformers(layouts, backend, name):
    """Golden logits from transformers (tools/make_golden.py, float32, eager
    attention); decoding token by token through the KV cache gives them too."""
    expected = np.load(GOLDEN / f"{name}.npz")
    model, _ = load(layouts[name], backend=backend)
    tokens = expected["tokens"].tolist()
    for prefill in (len(tokens), 3):
        got = model.logits(tokens, prefill=prefill)
        assert np.abs(got - expected["logits"]).max() <= 1e-3, (name, prefill)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_flash_with_every_neuron_equals_dense(layouts, backend, name):
    """SiLU and GeGLU are approximately sparse: flash is exact when it computes every
    neuron (the "all" predictor, the whole FFN in budget)."""
    dense, _ = load(layouts[name], backend=backend)
    flash, _ = load(
        layouts[name], backend=backend, memory_budget="200%", predictor="all"
    )
    expected = dense.logits(TOKENS, prefill=3)
    np.testing.assert_allclose(
        flash.logits(TOKENS, prefill=3), expected, atol=1e-4, rtol=0
    )
    assert flash.io_stats()["bytes_read"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_flash_at_a_small_budget_runs(layouts, backend, name):
    """A third of the FFN's rows cached, the gate predictor skipping half the
    neurons per token (CATS): approximate, finite, reading from flash."""
    lay = Layout.open(layouts[name])
    _, ffn = model_bytes(lay)
    floor = plan_floor(lay, predictor_nbytes("gate", lay), False)
    budget = floor + lay.bundle_bytes + SLOT_BYTES + ffn // 3
    dense, _ = load(layouts[name], backend=backend)
    flash, _ = load(
        layouts[name], backend=backend, memory_budget=budget, predictor="gate"
    )
    got = flash.logits(TOKENS, prefill=3)
    assert got.shape == (len(TOKENS), 40) and np.isfinite(got).all()
    assert flash.io_stats()["bytes_read"] > 0
    # the prompt is exact (smooth activations stream it densely)
    np.testing.assert_allclose(
        got[:3], dense.logits(TOKENS, prefill=3)[:3], atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_longrope_with_partial_rotary_equals_transformers(tmp_path, backend):
    """Phi-3.5 / Phi-4-mini: LongRoPE's short factors for a context within the
    pretraining one, its long factors past it (transformers' choice for a sequence
    that long), on the rotated half of each head; flash with every neuron too."""
    config = longrope_configs()["phi3-longrope"]
    src = write_hf_checkpoint(tmp_path / "src", config, random_weights(config, 3))
    layout = convert(src, tmp_path / "layout", dtype="float32", progress=False)
    expected = np.load(GOLDEN / "longrope" / "phi3-longrope.npz")
    short, _ = load(layout, backend=backend, max_context=32)
    got = short.logits(expected["tokens"].tolist())
    assert np.abs(got - expected["logits"]).max() <= 1e-3
    flash, _ = load(layout, backend=backend, memory_budget="200%", predictor="all")
    assert flash.max_context == 64  # past 32: the long factors
    got = flash.logits(expected["tokens_long"].tolist(), prefill=20)
    assert np.abs(got - expected["logits_long"]).max() <= 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["qwen3", "phi3", "gemma2"])
def test_relu_variants_are_exact_at_small_budgets(tmp_path, backend, name):
    """A ReLU-ified variant (the ReLU family's path: exact): flash over the gate
    predictor's neurons, a third of the FFN cached, equals dense, through the
    variants' attention (q/k norms, fused projections, sandwich norms, soft caps,
    sliding layers)."""
    config = family_configs()[name] | {
        "hidden_act": "relu",
        "hidden_activation": "relu",
    }
    src = write_hf_checkpoint(tmp_path / "src", config, random_weights(config, 5))
    layout = convert(src, tmp_path / "layout", dtype="float32", progress=False)
    lay = Layout.open(layout)
    assert lay.args.is_relu_family
    _, ffn = model_bytes(lay)
    floor = plan_floor(lay, predictor_nbytes("gate", lay), False)
    budget = floor + lay.bundle_bytes + SLOT_BYTES + ffn // 3
    dense, _ = load(layout, backend=backend)
    flash, _ = load(
        layout, backend=backend, memory_budget=budget, predictor="gate", window=2
    )
    expected = dense.logits(TOKENS, prefill=2)
    got = flash.logits(TOKENS, prefill=2)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


# -- conversion -------------------------------------------------------------------


def test_phi3_fused_projections_convert_as_llama_ones(sources, tmp_path):
    """Phi-3's qkv_proj and gate_up_proj split into the Llama names: the same
    layout as the unfused checkpoint's (one family of bundles)."""
    config = family_configs()["phi3"]
    weights = random_weights({**config, "model_type": "llama"}, seed=3)
    llama = write_hf_checkpoint(
        tmp_path / "llama", {**config, "model_type": "llama"}, weights
    )
    phi = open_checkpoint(sources["phi3"])
    unfused = open_checkpoint(llama)
    assert phi.shapes == unfused.shapes
    for name in phi.shapes:
        np.testing.assert_array_equal(phi.tensor(name), unfused.tensor(name))


def test_gemma_norms_are_stored_with_their_offset(sources):
    """Gemma's RMSNorm multiplies by 1 + weight: the 1 is added at conversion (as
    llama.cpp does), so the model's norm is Llama's."""
    src = open_checkpoint(sources["gemma3"])
    raw = random_weights(family_configs()["gemma3"], seed=3)
    for name in ("norm.weight", "layers.1.self_attn.k_norm.weight"):
        np.testing.assert_array_equal(src.tensor(name), raw["model." + name] + 1)
    q = "layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(src.tensor(q), raw["model." + q])


def test_a_multimodal_gemma3_converts_its_text_model(tmp_path):
    """Gemma 3 4B and up: the text model's config nested, its tensors under
    language_model. (vision tensors beside them are left out)."""
    text = family_configs()["gemma3"]
    config = {"model_type": "gemma3", "text_config": text, "eos_token_id": [2]}
    weights = random_weights(text, seed=3, prefix="language_model.model.")
    weights["vision_tower.patch_embedding.weight"] = np.ones((4, 3), np.float32)
    src = write_hf_checkpoint(tmp_path / "src", config, weights)
    layout = convert(src, tmp_path / "layout", dtype="float32", progress=False)
    expected = np.load(GOLDEN / "gemma3.npz")
    got = load(layout, backend="numpy")[0].logits(expected["tokens"].tolist())
    assert np.abs(got - expected["logits"]).max() <= 1e-3


def test_variant_args_from_their_configs():
    configs = family_configs()
    qwen2 = ModelArgs.from_hf_config(configs["qwen2"])
    assert qwen2.qkv_bias and not qwen2.attention_bias and qwen2.is_relu_family is False
    qwen3 = ModelArgs.from_hf_config(configs["qwen3"])
    assert qwen3.qk_norm and qwen3.head_dim == 8
    gemma2 = ModelArgs.from_hf_config(configs["gemma2"])
    assert gemma2.hidden_act == "gelu_tanh" and not gemma2.is_relu_family
    assert gemma2.layer_types == ["sliding_attention", "full_attention"]
    assert gemma2.embed_scale == 4.0 and gemma2.norm_offset == 1.0
    assert ModelArgs.from_dict(gemma2.to_dict()) == gemma2  # through the manifest
    gemma3 = ModelArgs.from_hf_config(configs["gemma3"])
    assert (gemma3.rope_local_theta, gemma3.rope_theta) == (100.0, 10000.0)
    # a multimodal Gemma 3's config: its text model
    nested = {"model_type": "gemma3", "text_config": configs["gemma3"]}
    assert ModelArgs.from_hf_config(nested) == gemma3
    few = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34}
    big = ModelArgs.from_hf_config({"model_type": "gemma3", "text_config": few})
    assert (big.head_dim, big.num_key_value_heads, big.vocab_size) == (256, 4, 262208)
    assert big.layer_types[4:6] == ["sliding_attention", "full_attention"]


@pytest.mark.parametrize("name", ["phi3", "gemma2"])
def test_q8_layouts_of_the_variants(name, tmp_path):
    """Quantized layouts of the variants: close to float32, the same on both
    backends up to MLX's float16 rounding of quantized products (as
    test_quantized's bound)."""
    config = family_configs()[name] | {"hidden_size": 32, "intermediate_size": 64}
    src = write_hf_checkpoint(tmp_path / "src", config, random_weights(config, 4))
    exact = convert(src, tmp_path / "f32", dtype="float32", progress=False)
    q8 = convert(src, tmp_path / "q8", dtype="q8", group_size=32, progress=False)
    expected = load(exact, backend="numpy")[0].logits(TOKENS)
    got = load(q8, backend="numpy")[0].logits(TOKENS)
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
    if has_mlx():
        other = load(q8, backend="mlx")[0].logits(TOKENS)
        assert np.abs(other - got).max() <= 2e-2 * max(1.0, float(np.abs(got).max()))


@pytest.mark.parametrize(
    "change, says",
    [
        (
            {"model_type": "phi3", "partial_rotary_factor": 0.25},
            "partial_rotary_factor 0.25 of head_dim 4 does not give an even number",
        ),
        (
            {"model_type": "gemma2", "layer_types": ["full_attention"]},
            "layer_types must list 2 layers",
        ),
        (
            {"model_type": "gemma2", "layer_types": ["local", "global"]},
            "unknown layer type 'local'",
        ),
        (
            {"model_type": "gemma2", "sliding_window": 0},
            "sliding_window must be a positive integer, got 0",
        ),
    ],
)
def test_bad_variant_configs_are_one_line(tmp_path, capsys, change, says):
    config = tiny_config("llama", "silu") | change
    weights = random_weights(tiny_config("llama", "silu"), seed=1)
    src = write_hf_checkpoint(tmp_path / "src", config, weights)
    assert_refused(["convert", str(src), str(tmp_path / "out")], says, capsys)


def test_fused_rows_that_do_not_add_up_are_refused(tmp_path):
    config = family_configs()["phi3"]
    weights = random_weights(config, seed=1)
    name = "model.layers.0.mlp.gate_up_proj.weight"
    weights[name] = weights[name][:-2]
    src = write_hf_checkpoint(tmp_path / "src", config, weights)
    with pytest.raises(
        ValueError, match="gate_up_proj.weight has 78 rows, expected 80"
    ):
        open_checkpoint(src)


# -- GeGLU's predictors ----------------------------------------------------------


def test_gelu_tanh_matches_its_formula_on_both_backends():
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    exact = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(gelu_tanh_numpy(x), exact, atol=1e-6)
    np.testing.assert_allclose(gate_magnitude("gelu_tanh", x), np.abs(exact), atol=1e-6)
    from mlx_flashinfer.model.backends import get_backend

    for backend in BACKENDS:
        B = get_backend(backend)
        np.testing.assert_allclose(
            B.to_numpy(B.gelu_tanh(B.array(x))), exact, atol=1e-6
        )


@pytest.fixture(scope="module")
def gemma_trained(tmp_path_factory) -> Path:
    """A Gemma 2 of d_model 32 (the low-bit predictor's groups need it) with a
    trained low-bit predictor."""
    config = family_configs()["gemma2"] | {"hidden_size": 32, "intermediate_size": 64}
    root = tmp_path_factory.mktemp("gemma-lowbit")
    src = write_hf_checkpoint(root / "src", config, random_weights(config, seed=5))
    layout = convert(src, root / "layout", dtype="float32", progress=False)
    train_predictor(layout, tokens=600, rank=8, progress=False, force=True)
    return layout


def test_geglu_trains_the_low_bit_predictor_by_default(gemma_trained):
    section = Layout.open(gemma_trained).manifest["predictor"]
    assert section["kind"] == "lowbit"
    assert section["silu_sparsity"] == 0.5  # the gate's calibrated cut, GeGLU's too
    assert len(section["silu_thresholds"]) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_geglu_low_bit_scores_use_gelu(gemma_trained, backend):
    """The low-bit predictor of a GeGLU model scores |gelu(g) x u| x |down|, and a
    flash run with it works."""
    flash, _ = load(gemma_trained, backend=backend, memory_budget="200%")
    predictor = flash.ffn.predictor
    assert predictor.name == "lowbit" and predictor.act == "gelu_tanh"
    B = flash.backend
    h = B.array(np.random.default_rng(0).standard_normal((2, 32)))
    y = B.to_numpy(B.linear(h, predictor.rows[0]))
    n = predictor.down_norms[0].shape[0]
    expected = np.abs(gelu_tanh_numpy(y[:, :n]) * y[:, n:]) * predictor.down_norms[0]
    np.testing.assert_allclose(predictor.scores(0, h), expected, rtol=1e-5)
    assert np.isfinite(flash.logits(TOKENS, prefill=3)).all()


# -- GGUF ---------------------------------------------------------------------------

# what llama.cpp fixes rather than stores (families.gguf_config), set alike in the
# Hugging Face checkpoint the GGUF is compared with
GGUF_FIXED = {
    "gemma2": {"query_pre_attn_scalar": 8},
    "gemma3": {
        "query_pre_attn_scalar": 8,
        "rope_local_base_freq": 10000.0,
        "layer_types": None,  # five sliding layers to one global: both sliding here
    },
}


@pytest.mark.parametrize("name", FAMILIES)
def test_a_variants_gguf_converts_as_its_checkpoint(name, tmp_path):
    """A GGUF written as llama.cpp writes the variant (q/k not permuted, Gemma's
    norms with their 1 added, Phi-3's fused tensors) gives the logits of the same
    weights from a Hugging Face folder, which equal transformers'."""
    from family_gguf import write_family_gguf

    config = family_configs()[name] | {"vocab_size": 300} | GGUF_FIXED.get(name, {})
    weights = random_weights(config, seed=3)
    hf = write_hf_checkpoint(tmp_path / "hf", config, weights)
    gguf = write_family_gguf(tmp_path / f"{name}.gguf", config, weights)
    expected = load(convert(hf, tmp_path / "a", dtype="float32", progress=False))[0]
    layout = convert(gguf, tmp_path / "b", dtype="float32", progress=False)
    got = load(layout, backend="numpy")[0]
    assert got.args.model_type == expected.args.model_type
    tokens = [1, 5, 290, 3, 22, 17, 4, 30, 2, 211, 39, 0]
    np.testing.assert_allclose(
        got.logits(tokens), expected.logits(tokens), atol=1e-5, rtol=0
    )


def test_a_longrope_gguf_converts_as_its_checkpoint(tmp_path):
    """Phi-3.5 / Phi-4-mini GGUF: LongRoPE's factors as tensors, its original
    context and attention factor as metadata, partial rotary as the rotated dims."""
    from family_gguf import write_family_gguf

    config = longrope_configs()["phi3-longrope"] | {"vocab_size": 300}
    weights = random_weights(config, seed=3)
    hf = write_hf_checkpoint(tmp_path / "hf", config, weights)
    gguf = write_family_gguf(tmp_path / "phi.gguf", config, weights)
    for context, tokens in ((32, TOKENS), (64, (TOKENS * 4)[:40])):  # short, long
        expected = load(
            convert(hf, tmp_path / f"a{context}", dtype="float32", progress=False),
            max_context=context,
        )[0].logits(tokens)
        layout = convert(
            gguf, tmp_path / f"b{context}", dtype="float32", progress=False
        )
        got = load(layout, max_context=context)[0].logits(tokens)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_fused_q8_0_blocks_are_taken_unchanged(tmp_path):
    """Phi-3's fused qkv and gate/up in Q8_0: each part is whole rows of the fused
    tensor's blocks, taken without a second rounding in a q8 layout."""
    import gguf as gg
    from family_gguf import write_family_gguf

    config = family_configs()["phi3"] | {
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
    }
    weights = random_weights(config, seed=3)
    q8_0 = gg.GGMLQuantizationType.Q8_0
    src = write_family_gguf(tmp_path / "q.gguf", config, weights, qtype=q8_0)
    f32 = write_family_gguf(tmp_path / "f.gguf", config, weights)
    layout = convert(src, tmp_path / "q8", dtype="q8", progress=False)
    record = Layout.open(layout).manifest["quantization"]
    # embeddings, lm_head; per layer q, k, v, o, gate, up (down: along d_model)
    assert record["exact_from_source"] == 2 + 6 * config["num_hidden_layers"]
    assert record["requantized_from_source"] == ["mlp.down_proj.weight"]
    exact = convert(f32, tmp_path / "f32", dtype="float32", progress=False)
    tokens = [1, 5, 290, 3, 22, 17]
    expected = load(exact, backend="numpy")[0].logits(tokens)
    got = load(layout, backend="numpy")[0].logits(tokens)
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()
