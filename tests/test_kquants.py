"""GGUF K-quant (and IQ4) blocks mapped to the affine group format (kquants.py):
random blocks of every type against gguf's own dequantization, and tiny K-quant
GGUF models converted to quantized layouts."""

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import random_blocks, random_weights, tiny_config, write_gguf

from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.formats.kquants import (
    KQUANT_TYPES,
    float16_rounding,
    from_kquant_blocks,
)
from mlx_flashinfer.formats.quantize import dequantize, unpack

Q = gguf.GGMLQuantizationType
EXACT = [kind for kind, (_, _, exact) in KQUANT_TYPES.items() if exact]


def _ours_and_gguf(kind, rows, blocks, d, dmin, seed):
    """(our dequantized values, gguf's, our integers, scales, biases as float32)."""
    qtype = Q[kind]
    cols = blocks * gguf.GGML_QUANT_SIZES[qtype][0]
    raw = random_blocks(np.random.default_rng(seed), qtype, (rows, cols), d, dmin)
    bits = KQUANT_TYPES[kind][0]
    packed, scales, biases = from_kquant_blocks(raw, kind)
    assert packed.dtype == np.uint32 and scales.dtype == biases.dtype == np.float16
    assert scales.shape == biases.shape == (rows, cols // 32)
    ours = dequantize(packed, scales, biases, bits, 32)
    theirs = gguf.quants.dequantize(raw, qtype).reshape(rows, cols)
    widen = [np.repeat(f.astype(np.float32), 32, axis=1) for f in (scales, biases)]
    return ours, theirs, unpack(packed, bits).astype(np.float32), *widen


# a float16 with at most 5 significant bits: its products with the 6-bit sub-block
# scales (and Q3_K's offset 124) fit float16's 11, so nothing may round
few_bits = st.builds(
    lambda k, e: float(np.float16(k * 2.0**e)),
    st.integers(-31, 31),
    st.integers(-24, -2),
)


@pytest.mark.parametrize("kind", EXACT)
@given(
    rows=st.integers(1, 3),
    blocks=st.integers(1, 3),
    d=few_bits,
    dmin=few_bits,
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=25, deadline=None)
def test_representable_scales_give_gguf_values_bit_for_bit(
    kind, rows, blocks, d, dmin, seed
):
    ours, theirs, *_ = _ours_and_gguf(kind, rows, blocks, d, dmin, seed)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("kind", EXACT)
@given(
    rows=st.integers(1, 3),
    blocks=st.integers(1, 3),
    d=st.floats(-1, 1, width=16),  # a weight's scale; 1 allows values of 4000
    dmin=st.floats(-1, 1, width=16),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=40, deadline=None)
def test_any_scales_are_within_the_float16_bound(kind, rows, blocks, d, dmin, seed):
    """The integers are kept; only a scale d x sc (a bias dmin x m) rounds to
    float16, by at most 2**-11 of itself: a value within 2**-11 (|scale q| + |bias|)
    of gguf's (plus float32's own rounding of either sum)."""
    ours, theirs, q, scales, biases = _ours_and_gguf(kind, rows, blocks, d, dmin, seed)
    terms = np.abs(scales) * q + np.abs(biases)
    bound = terms * (2.0**-11 * 1.001 + 2.0**-22)
    assert np.all(np.abs(ours - theirs) <= bound)
    if kind in ("Q3_K", "IQ4_NL"):  # scale d itself: only -124 d may round
        bias_exact = biases == -128 * scales
        np.testing.assert_array_equal(ours[bias_exact], theirs[bias_exact])


@pytest.mark.parametrize("kind", EXACT)
@given(
    d=st.floats(-1, 1, width=16),
    dmin=st.floats(-1, 1, width=16),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=25, deadline=None)
def test_the_measured_scale_rounding_is_within_half_an_ulp(kind, d, dmin, seed):
    qtype = Q[kind]
    cols = 2 * gguf.GGML_QUANT_SIZES[qtype][0]
    raw = random_blocks(np.random.default_rng(seed), qtype, (2, cols), d, dmin)
    got = float16_rounding(raw, kind)
    assert got["groups"] == 2 * cols // 32
    assert 0 <= got["max_relative"] <= 2.0**-11
    assert (got["rounded"] > 0) == (got["max_relative"] > 0)
    exactly = random_blocks(np.random.default_rng(seed), qtype, (2, cols), 2**-9, 0.0)
    assert float16_rounding(exactly, kind)["rounded"] == 0


def test_types_without_a_group_32_form_and_huge_scales_are_refused():
    with pytest.raises(ValueError, match="no exact group-32 form"):
        from_kquant_blocks(np.zeros((1, 210), np.uint8), "Q6_K")
    raw = random_blocks(np.random.default_rng(0), Q.IQ4_NL, (1, 32), 1000.0)
    with pytest.raises(ValueError, match="beyond float16"):  # bias -128 d
        from_kquant_blocks(raw, "IQ4_NL")


def _k_config() -> dict:
    # ggml's K-quant rows are multiples of 256 values
    return tiny_config(
        "llama",
        "silu",
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )


def _down_on_an_8_bit_grid(weights, config, seed=0):
    """Down matrices whose columns (d_model long) are exact 8-bit groups of 32 with
    float16 scales and biases, each group reaching 0 and 255: a bundle's down
    columns are quantized along d_model whatever the source, and these come back
    unchanged, so the model's logits can be compared within float rounding."""
    rng = np.random.default_rng(seed)
    for layer in range(config["num_hidden_layers"]):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        cols, rows = weights[name].shape  # (d_model, n_ffn): groups along d_model
        q = rng.integers(0, 256, (rows, cols)).astype(np.float32)
        q[:, ::32], q[:, 1::32] = 0, 255
        step = 2.0**-12 * rng.integers(8, 16, (rows, cols // 32, 1)) / 8
        grid = q.reshape(rows, -1, 32) * step - 128 * step
        weights[name] = np.ascontiguousarray(grid.reshape(rows, cols).T, np.float32)
    return weights


KINDS = {  # one of each exact type; down in float32
    "embed_tokens": Q.Q3_K,
    "lm_head": Q.Q5_K,
    "q_proj": Q.Q4_K,
    "k_proj": Q.Q5_K,
    "v_proj": Q.IQ4_XS,
    "o_proj": Q.IQ4_NL,
    "gate_proj": Q.Q4_K,
    "up_proj": Q.Q4_K,
}


def _write(path, config, weights, kinds):
    def qtype_of(name, _):
        return next((q for key, q in kinds.items() if key in name), Q.F32)

    # scales of 1 and 2 significant bits: every product is a float16
    return write_gguf(
        path, config, weights, qtype_of, block_scales=(2**-11, 3 * 2**-13)
    )


def test_a_k_quant_gguf_converts_to_q4_without_a_second_rounding(tmp_path):
    """Every K-quant matrix is taken from its blocks (Q4_K at 4 bits, the others at
    8, resident); the dense model equals the float32 layout of the same GGUF (gguf's
    dequantization) within float rounding (NumPy backend)."""
    config = _k_config()
    weights = _down_on_an_8_bit_grid(random_weights(config, seed=2), config)
    src = _write(tmp_path / "k.gguf", config, weights, KINDS)
    q4 = convert(src, tmp_path / "q4", dtype="q4", progress=False)
    ref = convert(src, tmp_path / "f32", dtype="float32", progress=False)
    record = Layout.open(q4).manifest["quantization"]
    assert record["group_size"] == 32
    # embeddings, lm_head; per layer q, k, v, o, gate, up
    assert record["exact_from_source"] == 2 + 6 * config["num_hidden_layers"]
    assert record["requantized_from_source"] == []
    bits = record["tensors"]
    assert bits["embed_tokens.weight"] == bits["lm_head.weight"] == 8
    assert bits["layers.0.self_attn.q_proj.weight"] == 4
    assert bits["layers.0.self_attn.o_proj.weight"] == 8
    tokens = [1, 5, 290, 3, 22, 17, 100, 257]
    expected = load(ref, backend="numpy")[0].logits(tokens)
    got = load(q4, backend="numpy")[0].logits(tokens)
    scale = np.abs(expected).max()
    assert scale > 1e-3  # not a model of zeros
    np.testing.assert_allclose(got, expected, atol=2e-5 * scale, rtol=0)


def test_q6_k_and_q2_k_are_quantized_again_and_said_so(tmp_path):
    """Q6_K and Q2_K sub-blocks of 16 have no group-32 form: gguf's values are
    quantized again (Q6_K at 8 bits, Q2_K at 4), within half a step, and listed;
    a q8 layout takes Q5_K gate/up rows unchanged and quantizes Q4_K ones again."""
    config = _k_config()
    weights = random_weights(config, seed=4)
    kinds = {
        "embed_tokens": Q.Q6_K,
        "q_proj": Q.Q2_K,
        "gate_proj": Q.Q5_K,
        "up_proj": Q.Q4_K,
    }
    src = _write(tmp_path / "k.gguf", config, weights, kinds)
    ref = Layout.open(convert(src, tmp_path / "f32", dtype="float32", progress=False))
    q4 = Layout.open(convert(src, tmp_path / "q4", dtype="q4", progress=False))
    record = q4.manifest["quantization"]
    assert record["tensors"]["embed_tokens.weight"] == 8
    assert record["tensors"]["layers.0.self_attn.q_proj.weight"] == 4
    assert {"embed_tokens.weight", "self_attn.q_proj.weight"} <= set(
        record["requantized_from_source"]
    )
    ours, theirs = dict(q4.iter_resident()), dict(ref.iter_resident())
    for name in ("embed_tokens.weight", "layers.1.self_attn.q_proj.weight"):
        values = theirs[name]
        groups = values.reshape(len(values), -1, 32)
        bits = record["tensors"][name]
        step = np.ptp(groups, axis=-1, keepdims=True) / (2**bits - 1)
        error = np.abs(ours[name].reshape(groups.shape) - groups)
        assert np.all(error <= 0.51 * step + 2**-11 * np.abs(groups)), name
    q8 = Layout.open(convert(src, tmp_path / "q8", dtype="q8", progress=False))
    record = q8.manifest["quantization"]
    assert "mlp.up_proj.weight" in record["requantized_from_source"]
    assert "mlp.gate_proj.weight" not in record["requantized_from_source"]
    gate = q8.read_parts(0)[0]
    got = dequantize(gate.packed, gate.scales, gate.biases, 8, 32)
    np.testing.assert_array_equal(got, ref.read_parts(0)[0])
