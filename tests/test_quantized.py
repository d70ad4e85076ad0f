"""Quantized layouts (q4, q8): the format, lossless GGUF blocks, flash equal to dense at
the same quantized layout, what the plan counts is what is held, and bad input."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import (
    has_mlx,
    random_weights,
    tiny_config,
    write_gguf,
    write_hf_checkpoint,
)

from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.cli import main
from mlx_flashinfer.flash.memory import SLOT_BYTES, model_bytes, plan_floor
from mlx_flashinfer.formats.quantize import (
    GGUF_TYPES,
    Quantized,
    dequantize,
    from_gguf_blocks,
    pack,
    quantize,
    unpack,
)
from mlx_flashinfer.model.backends import get_backend
from mlx_flashinfer.predictors.kinds import predictor_nbytes

BACKENDS = ["numpy"] + (["mlx"] if has_mlx() else [])
_LAYOUTS: dict = {}


@settings(max_examples=50, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    rows=st.integers(1, 5),
    words=st.integers(1, 6),
    seed=st.integers(0, 2**31),
)
def test_pack_and_unpack_round_trip(bits, rows, words, seed):
    k = words * 32 // bits
    q = np.random.default_rng(seed).integers(0, 1 << bits, (rows, k))
    packed = pack(q, bits)
    assert packed.dtype == np.uint32 and packed.shape == (rows, words)
    assert np.array_equal(unpack(packed, bits), q)
    # MLX's order: value j of a row at bit (j % per_word) * bits of word j // per_word
    j = k - 1
    per_word = 32 // bits
    word = packed[0, j // per_word]
    assert (int(word) >> ((j % per_word) * bits)) & ((1 << bits) - 1) == q[0, j]


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    group=st.sampled_from([32, 64, 128]),
    groups=st.integers(1, 3),
    rows=st.integers(1, 4),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31),
)
def test_quantize_is_within_half_a_step(bits, group, groups, rows, scale, seed):
    """Each value lands within half a step of its group's grid, plus what storing
    the scale and bias as float16 costs (relative 2**-11 each, the scale's error
    times the levels at the top of the grid)."""
    w = np.random.default_rng(seed).standard_normal((rows, group * groups)) * scale
    w = w.astype(np.float32)
    packed, scales, biases = quantize(w, bits, group)
    got = dequantize(packed, scales, biases, bits, group)
    s = np.repeat(scales.astype(np.float32), group, axis=1)
    low = np.repeat(np.abs(biases.astype(np.float32)), group, axis=1)
    levels = (1 << bits) - 1
    bound = 0.5 * s + levels * s * 2.0**-10 + low * 2.0**-10 + 1e-30
    assert np.all(np.abs(got - w) <= bound)


def test_an_empty_matrix_quantizes_to_empty_fields():
    fields = quantize(np.zeros((0, 64), np.float32), 4, 32)
    assert [f.shape for f in fields] == [(0, 8), (0, 2), (0, 2)]
    assert dequantize(*fields, 4, 32).shape == (0, 64)


@pytest.mark.parametrize("kind", sorted(GGUF_TYPES))
@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 4), blocks=st.integers(1, 4), seed=st.integers(0, 2**31))
def test_gguf_blocks_map_to_the_same_values(kind, rows, blocks, seed):
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    w = np.random.default_rng(seed).standard_normal((rows, 32 * blocks))
    raw = gguf.quants.quantize(w.astype(np.float32), qtype)
    packed, scales, biases = from_gguf_blocks(raw, kind)
    got = dequantize(packed, scales, biases, GGUF_TYPES[kind][0], 32)
    assert np.array_equal(got, gguf.quants.dequantize(raw, qtype))


def _gguf_config() -> dict:
    return tiny_config(
        "llama",
        "silu",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def test_a_gguf_converts_to_q4_taking_its_blocks_unchanged(tmp_path):
    """Q4_1 / Q4_0 / Q8_0 matrices are stored as they are (the layout dequantizes to
    gguf's own values exactly, q/k rows unpermuted); down columns, which GGUF
    quantizes along the neurons, are quantized again along d_model."""
    import gguf

    Q = gguf.GGMLQuantizationType
    config = _gguf_config()
    weights = random_weights(config, seed=5)
    kinds = {"q_proj": Q.Q4_0, "k_proj": Q.Q4_0, "embed_tokens": Q.Q8_0}

    def qtype_of(name, array):
        return next((q for key, q in kinds.items() if key in name), Q.Q4_1)

    src = write_gguf(tmp_path / "m.gguf", config, weights, qtype_of=qtype_of)
    exact = convert(src, tmp_path / "f32", dtype="float32", progress=False)
    q4 = convert(src, tmp_path / "q4", dtype="q4", progress=False)
    lay, ref = Layout.open(q4), Layout.open(exact)
    assert lay.quantization["group_size"] == 32
    assert lay.quantization["tensors"]["embed_tokens.weight"] == 8  # Q8_0 kept
    assert lay.quantization["requantized_from_source"] == ["mlp.down_proj.weight"]
    ours, theirs = dict(lay.iter_resident()), dict(ref.iter_resident())
    for name, values in theirs.items():
        assert np.array_equal(ours[name], values), name
    for layer in range(config["num_hidden_layers"]):
        parts, expected = lay.read_parts(layer), ref.read_parts(layer)
        for p, (q, f) in enumerate(zip(parts, expected, strict=True)):
            got = dequantize(q.packed, q.scales, q.biases, q.bits, 32)
            if p < 2:  # gate, up rows: the blocks themselves
                assert np.array_equal(got, f)
            else:  # down columns: one more rounding, at 8 bits by default
                assert q.bits == 8
                step = np.repeat(q.scales.astype(np.float32), 32, axis=1)
                assert np.all(np.abs(got - f) <= 0.51 * step + 1e-3 * np.abs(f))


def layout_of(
    family: str, act: str, dtype: str, down_bits=None, arrangement="bundled"
) -> Path:
    """A tiny layout with d_model 64 (groups of 32 and 64 divide it), built once."""
    key = (family, act, dtype, down_bits, arrangement)
    if key not in _LAYOUTS:
        sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
        sizes["ffn_dim" if family == "opt" else "intermediate_size"] = 96
        if family == "opt":
            sizes["word_embed_proj_dim"] = 64
        else:
            sizes["num_key_value_heads"] = 2
        config = tiny_config(family, act, **sizes)
        tmp = Path(tempfile.mkdtemp(prefix="quantized-"))
        src = write_hf_checkpoint(tmp / "src", config, random_weights(config, seed=7))
        group = 32 if dtype.startswith("q") else None
        _LAYOUTS[key] = convert(
            src,
            tmp / "layout",
            dtype=dtype,
            group_size=group,
            down_bits=down_bits,
            arrangement=arrangement,
            progress=False,
        )
    return _LAYOUTS[key]


def budget_for(layout: Path, predictor: str, rows: int) -> int:
    lay = Layout.open(layout)
    held = plan_floor(lay, predictor_nbytes(predictor, lay))
    return held + rows * (lay.bundle_bytes + SLOT_BYTES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,down_bits,arrangement",
    [("q4", None, "bundled"), ("q8", None, "bundled"), ("q4", 4, "bundled")]
    + [("q4", None, "separate")],  # parts of unequal size in their own regions
)
@settings(max_examples=8, deadline=None)
@given(
    model=st.sampled_from([("opt", "relu"), ("llama", "relu"), ("llama", "relu2")]),
    rows=st.integers(1, 120),
    window=st.integers(0, 3),
    predictor=st.sampled_from(["oracle", "gate"]),
    tokens=st.lists(st.integers(0, 39), min_size=2, max_size=10),
    data=st.data(),
)
def test_flash_equals_dense_at_the_same_quantized_layout(
    backend, dtype, down_bits, arrangement, model, rows, window, predictor, tokens, data
):
    """Quantization changes the model, not the flash path: ReLU-family flash logits
    equal dense ones up to the order of float32 sums (NumPy), or the float16
    rounding of each product's output that MLX's quantized matmul makes, once per
    piece summed (the bound of test_precision at 16 bits)."""
    layout = layout_of(*model, dtype, down_bits, arrangement)
    prefill = data.draw(st.integers(1, len(tokens)), label="prefill")
    dense, _ = load(layout_of(*model, dtype, down_bits), backend=backend)
    flash, _ = load(
        layout,
        backend=backend,
        memory_budget=budget_for(layout, predictor, rows),
        window=window,
        predictor=predictor,
    )
    expected = dense.logits(tokens, prefill=prefill)
    got = flash.logits(tokens, prefill=prefill)
    scale = max(1.0, float(np.abs(expected).max()))
    pieces = 1 + -(-flash.args.intermediate_size // flash.plan.scratch_rows)
    bound = 1e-5 * scale if backend == "numpy" else 4 * 2.0**-10 * (pieces + 1) * scale
    assert np.abs(got - expected).max() <= bound
    assert flash.io_stats()["landing"] == "in place"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["q4", "q8"])
def test_quantized_weights_are_held_packed_and_counted(backend, dtype):
    layout = layout_of("llama", "relu", dtype)
    lay = Layout.open(layout)
    model, _ = load(
        layout, backend=backend, memory_budget=budget_for(layout, "gate", 50)
    )
    held, plan = model.held_bytes(), model.plan
    assert held["resident"] == plan.resident
    assert held["neuron cache"] == plan.cache_bytes
    assert held["predictor"] == plan.predictor == predictor_nbytes("gate", lay)
    assert sum(held.values()) == plan.weights <= plan.budget
    assert isinstance(model.w["layers.0.self_attn.q_proj.weight"], Quantized)
    dense, _ = load(layout, backend=backend)
    assert sum(dense.held_bytes().values()) == sum(model_bytes(lay))
    # bytes per value: bits / 8 (down columns: 8 bits by default), plus a float16
    # scale and bias per 32 values; float16 takes 2
    f16 = Layout.open(layout_of("llama", "relu", "float16"))
    bits = {"q4": 4, "q8": 8}[dtype]
    assert lay.part_bits == [bits, bits, 8]
    per_value = sum(b / 8 + 4 / 32 for b in lay.part_bits) / 3
    assert lay.bundle_bytes / f16.bundle_bytes == per_value / 2


@pytest.mark.skipif(not has_mlx(), reason="needs MLX")
@pytest.mark.parametrize("dtype", ["q4", "q8"])
def test_both_backends_compute_the_same_quantized_model(dtype):
    layout = layout_of("llama", "silu", dtype)
    tokens = [3, 9, 27, 1, 5]
    numpy_model, _ = load(layout, backend="numpy")
    mlx_model, _ = load(layout, backend="mlx")
    a = numpy_model.logits(tokens, prefill=2)
    b = mlx_model.logits(tokens, prefill=2)
    # MLX rounds each quantized product's output to float16 (eps 2**-10)
    assert np.abs(a - b).max() <= 2e-2 * max(1.0, float(np.abs(a).max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_linear_maps_rows_and_columns(backend):
    """`linear` with a quantized weight: x @ W.T, and with columns_weight x @ W, of
    the dequantized W. NumPy accumulates in float32 (bound 1e-5 of the sum of
    |terms|); MLX casts x to float16 and rounds its output to float16 (2**-11 each,
    bound 2**-8 of the sum of |terms|)."""
    B = get_backend(backend)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 64)).astype(np.float32)
    q = Quantized(*quantize(w, 4, 32), 4, 32)
    values = dequantize(q.packed, q.scales, q.biases, 4, 32)
    held = B.weight(q)
    rel = 1e-5 if backend == "numpy" else 2.0**-8
    x = rng.standard_normal((3, 64)).astype(np.float32)
    got = B.to_numpy(B.linear(B.array(x), B.rows_weight(held)))
    assert np.all(np.abs(got - x @ values.T) <= rel * (np.abs(x) @ np.abs(values.T)))
    a = rng.standard_normal((3, 40)).astype(np.float32)
    got = B.to_numpy(B.linear(B.array(a), B.columns_weight(held)))
    assert np.all(np.abs(got - a @ values) <= rel * (np.abs(a) @ np.abs(values)))
    rows = B.to_numpy(B.weight_rows(held, [5, 0, 5]))
    # MLX computes scale * q + bias in float16: two roundings of terms up to
    # 15 |scale| and |bias|
    ids = [5, 0, 5]
    s, b = (
        np.repeat(np.abs(v[ids]).astype(np.float32), 32, 1)
        for v in (q.scales, q.biases)
    )
    assert np.all(np.abs(rows - values[ids]) <= 2.0**-10 * (15 * s + b))


def test_bad_quantization_options_exit_2_and_write_nothing(tmp_path, capsys):
    config = tiny_config("llama", "relu", hidden_size=24)
    src = write_hf_checkpoint(tmp_path / "src", config, random_weights(config))
    dst = tmp_path / "out"
    assert main(["convert", str(src), str(dst), "--dtype", "q4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "group size 64 does not divide" in err and len(err.splitlines()) == 1
    assert not dst.exists()
    assert (
        main(
            ["convert", str(src), str(dst), "--dtype", "float16", "--group-size", "32"]
        )
        == 2
    )
    assert "applies to q4 and q8" in capsys.readouterr().err
    assert not dst.exists()
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(src), str(dst), "--dtype", "q4", "--group-size", "48"])
    assert exit_.value.code == 2
    assert not dst.exists()


def test_version_1_layouts_still_open(tmp_path):
    """Float layouts written before quantized dtypes (version 1) load unchanged."""
    import json
    import shutil

    from mlx_flashinfer.formats.layout import MANIFEST, write_manifest

    layout = shutil.copytree(layout_of("llama", "relu", "float16"), tmp_path / "v1")
    manifest = json.loads((layout / MANIFEST).read_text())
    manifest["version"] = 1
    write_manifest(layout, manifest)
    old, _ = load(layout, backend="numpy")
    new, _ = load(layout_of("llama", "relu", "float16"), backend="numpy")
    assert np.array_equal(old.logits([1, 2, 3]), new.logits([1, 2, 3]))
