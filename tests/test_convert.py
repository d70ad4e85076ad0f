"""Conversion from Hugging Face directories and GGUF files into the flash layout."""

import json
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import random_weights, tiny_config, write_gguf, write_hf_checkpoint

from mlx_flashinfer import Layout, convert
from mlx_flashinfer.cli import main
from mlx_flashinfer.formats.args import ModelArgs
from mlx_flashinfer.formats.safetensors_stream import decode, decode_into, encode

Q = gguf.GGMLQuantizationType


def stored(array: np.ndarray, dtype: str) -> np.ndarray:
    """What `array` becomes once written in `dtype` and read back as float32."""
    return decode(encode(array, dtype), dtype).astype(np.float32)


def assert_layout_matches(layout: Layout, weights: dict, config: dict) -> None:
    """Every bundle equals its source rows/columns; every resident tensor its source."""
    canon = {
        k.removeprefix("model.").removeprefix("decoder."): v for k, v in weights.items()
    }
    resident = layout.resident_tensors()
    dtype = layout.dtype
    for i in range(config["num_hidden_layers"]):
        bundles = layout.read_bundles(i)
        if config["model_type"] == "opt":
            sources = [
                canon[f"layers.{i}.fc1.weight"],
                canon[f"layers.{i}.fc2.weight"].T,
            ]
        else:
            p = f"layers.{i}.mlp."
            sources = [
                canon[p + "gate_proj.weight"],
                canon[p + "up_proj.weight"],
                canon[p + "down_proj.weight"].T,
            ]
        for part, source in enumerate(sources):
            np.testing.assert_array_equal(bundles[:, part, :], stored(source, dtype))
    for name, value in resident.items():
        expected = canon[name]
        kept = "float32" if expected.ndim == 1 else dtype
        np.testing.assert_array_equal(value, stored(expected, kept), err_msg=name)


@pytest.mark.parametrize(
    "family,act",
    [("llama", a) for a in ("silu", "relu", "fatrelu", "relu2", "drelu")]
    + [("opt", "relu")],
)
def test_every_family_and_activation_converts(tmp_path, family, act):
    config = tiny_config(family, act)
    weights = random_weights(config)
    src = write_hf_checkpoint(tmp_path / "src", config, weights)
    layout = Layout.open(convert(src, tmp_path / "out", progress=False))
    assert layout.args.family == family and layout.args.hidden_act == act
    if act == "fatrelu":
        assert layout.args.activation_threshold == 0.05
    assert_layout_matches(layout, weights, config)
    layout.verify()


def test_opt_350m_shape_projections_and_post_norm(tmp_path):
    config = tiny_config("opt", word_embed_proj_dim=8, do_layer_norm_before=False)
    weights = random_weights(config)
    layout = Layout.open(
        convert(
            write_hf_checkpoint(tmp_path / "s", config, weights),
            tmp_path / "o",
            progress=False,
        )
    )
    assert layout.args.word_embed_proj_dim == 8 and not layout.args.do_layer_norm_before
    names = set(layout.resident_tensors())
    assert {"project_in.weight", "project_out.weight"} <= names
    assert "final_layer_norm.weight" not in names
    assert_layout_matches(layout, weights, config)


@settings(max_examples=15, deadline=None)
@given(
    family=st.sampled_from(["llama", "opt"]),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([2, 4, 8]),
    ffn=st.integers(1, 70),
    layers=st.integers(1, 3),
    dtype=st.sampled_from(["float16", "float32", "bfloat16"]),
    shards=st.integers(1, 3),
    arrangement=st.sampled_from(["bundled", "separate"]),
    prefix=st.sampled_from(["model.", ""]),
    tied=st.booleans(),
)
def test_bundles_hold_the_source_rows_and_columns(
    family, heads, head_dim, ffn, layers, dtype, shards, prefix, tied, arrangement
):
    d = heads * head_dim
    sizes = {
        "hidden_size": d,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
    }
    sizes["ffn_dim" if family == "opt" else "intermediate_size"] = ffn
    if family == "opt":
        sizes["word_embed_proj_dim"] = d
    else:
        sizes["num_key_value_heads"] = 1
    config = tiny_config(family, "relu", tie_word_embeddings=tied, **sizes)
    weights = random_weights(config, seed=ffn, prefix=prefix)
    with tempfile.TemporaryDirectory() as tmp:
        src = write_hf_checkpoint(Path(tmp) / "src", config, weights, shards=shards)
        layout = Layout.open(
            convert(
                src,
                Path(tmp) / "out",
                dtype=dtype,
                progress=False,
                arrangement=arrangement,
            )
        )
        assert layout.args.tie_word_embeddings == tied
        assert all(e.offset % 4096 == 0 for e in layout.layers)
        assert_layout_matches(layout, weights, config)


def test_missing_lm_head_means_tied_embeddings(tmp_path):
    config = tiny_config("llama", tie_word_embeddings=False)
    weights = random_weights(config)
    del weights["lm_head.weight"]
    layout = Layout.open(
        convert(
            write_hf_checkpoint(tmp_path / "s", config, weights),
            tmp_path / "o",
            progress=False,
        )
    )
    assert layout.args.tie_word_embeddings
    assert "lm_head.weight" not in layout.resident_tensors()


def test_bfloat16_checkpoint_written_by_mlx(tmp_path):
    mx = pytest.importorskip("mlx.core", reason="mlx writes the bfloat16 source file")
    config = tiny_config("llama")
    weights = random_weights(config)
    src = write_hf_checkpoint(tmp_path / "s", config, weights)
    (src / "model.safetensors").unlink()
    mx.save_safetensors(
        str(src / "model.safetensors"),
        {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()},
    )
    layout = Layout.open(convert(src, tmp_path / "o", dtype="float32", progress=False))
    rounded = {k: stored(v, "bfloat16") for k, v in weights.items()}
    assert_layout_matches(layout, rounded, config)


def test_llama3_rope_scaling_becomes_rope_divisors(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # head_dim 8, theta 5e5: wavelengths 6, 167, 4480, 118000 against the 2048..8192
    # band
    config = tiny_config("llama", rope_scaling=scaling, hidden_size=32, rope_theta=5e5)
    layout = Layout.open(
        convert(
            write_hf_checkpoint(tmp_path / "s", config, random_weights(config)),
            tmp_path / "o",
            progress=False,
        )
    )
    divisors = layout.resident_tensors()["rope_freqs"]
    assert divisors.shape == (layout.args.head_dim // 2,)
    # high frequencies untouched, low ones divided by the factor, monotone in between
    assert divisors[0] == divisors[1] == 1.0 and divisors[3] == pytest.approx(8.0)
    assert 1.0 < divisors[2] < 8.0


# -- GGUF -----------------------------------------------------------------------------


def gguf_config(**overrides):
    return tiny_config(
        "llama",
        "silu",
        hidden_size=256,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        **overrides,
    )


def test_gguf_f32_round_trip_restores_hugging_face_weights(tmp_path):
    """llama.cpp permutes q/k rows; conversion must give back the original matrices."""
    config = gguf_config()
    weights = random_weights(config)
    src = write_gguf(tmp_path / "m.gguf", config, weights)
    layout = Layout.open(convert(src, tmp_path / "o", dtype="float32", progress=False))
    assert layout.args.num_key_value_heads == 2 and not layout.args.tie_word_embeddings
    assert_layout_matches(layout, weights, config)
    assert layout.manifest["tokenizer"]["chat_template"]


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K])
def test_gguf_quantized_tensors_are_dequantized(tmp_path, qtype):
    config = gguf_config(tie_word_embeddings=True)
    weights = random_weights(config)
    src = write_gguf(tmp_path / "m.gguf", config, weights, qtype_of=lambda n, a: qtype)
    layout = Layout.open(convert(src, tmp_path / "o", dtype="float32", progress=False))
    reader = gguf.GGUFReader(src)
    expected = {}
    for t in reader.tensors:  # gguf's own dequantization of what was written
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        expected[t.name] = values.reshape([int(x) for x in reversed(t.shape)])
    from tiny_models import gguf_name, llama_cpp_permute

    original = {}
    for name in weights:
        value = expected[gguf_name(name)]
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config[
                "num_attention_heads" if "q_proj" in name else "num_key_value_heads"
            ]
            value = _inverse_permute(value, heads, llama_cpp_permute)
        original[name] = value
    assert_layout_matches(layout, original, config)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16):  # really quantized from the weights
        up = layout.read_bundles(0)[:, 1, :]
        assert np.abs(up - weights["model.layers.0.mlp.up_proj.weight"]).max() < 0.1


def _inverse_permute(value, heads, permute):
    # the permutation is a fixed reordering of rows: invert it through an index vector
    rows = np.arange(value.shape[0], dtype=np.float64)[:, None]
    order = permute(rows, heads)[:, 0].astype(int)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return value[inverse]


def test_unsupported_gguf_quantization_is_refused(tmp_path):
    config = gguf_config()
    weights = random_weights(config)
    path = tmp_path / "q81.gguf"
    write_gguf(path, config, weights, qtype_of=lambda n, a: Q.Q8_0)
    # rewrite one tensor's type as Q8_1, which the gguf package cannot dequantize
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":
            block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
            rows = int(t.shape[1])
            raw = np.zeros((rows, 256 // block * size), np.uint8)
            writer.add_tensor(t.name, raw, raw_dtype=Q.Q8_1)
        else:
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="Q8_1"):
        convert(tmp_path / "bad.gguf", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


# -- bad input ------------------------------------------------------------------------


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert(tmp_path / "nope", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        convert(tmp_path / "empty", tmp_path / "o")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        convert(tmp_path / "gpt2", tmp_path / "o")
    (tmp_path / "x.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="not a GGUF"):
        convert(tmp_path / "x.bin", tmp_path / "o")
    config = tiny_config("llama")
    weights = random_weights(config)
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="lacks tensor layers.1.mlp.up_proj.weight"):
        convert(
            write_hf_checkpoint(tmp_path / "partial", config, weights), tmp_path / "o"
        )
    with pytest.raises(ValueError, match="unknown dtype"):
        convert(tmp_path / "partial", tmp_path / "o", dtype="int8")
    assert not (tmp_path / "o").exists()


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    config = tiny_config("llama")
    src = write_hf_checkpoint(tmp_path / "s", config, random_weights(config))
    from mlx_flashinfer.formats import checkpoints

    original, calls = checkpoints.HFCheckpoint.tensor, []

    def interrupted(self, name):
        calls.append(name)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return original(self, name)

    monkeypatch.setattr(checkpoints.HFCheckpoint, "tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_existing_destination_needs_force(tmp_path):
    config = tiny_config("opt")
    src = write_hf_checkpoint(tmp_path / "s", config, random_weights(config))
    convert(src, tmp_path / "o", progress=False)
    with pytest.raises(FileExistsError, match="--force"):
        convert(src, tmp_path / "o", progress=False)
    convert(src, tmp_path / "o", dtype="float32", force=True, progress=False)
    assert Layout.open(tmp_path / "o").dtype == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "s"]


def test_cli_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "a", "b", "--dtype", "int3"])
    assert exit_info.value.code == 2


def test_model_args_from_hf_config_ignores_unknown_keys():
    args = ModelArgs.from_hf_config(tiny_config("opt", word_embed_proj_dim=8))
    assert args.family == "opt" and args.word_embed_proj_dim == 8
    assert args.bundle_parts == ("fc1", "fc2")
    with pytest.raises(ValueError, match="unsupported activation 'gelu'"):
        ModelArgs.from_hf_config(tiny_config("llama", "gelu"))


@pytest.mark.parametrize("width", [1, 7, 4096, 70000])
def test_decode_into_float16_is_exact_for_every_value(width):
    """The fast float16 widening equals NumPy's cast bit for bit on all 65536 values
    (subnormals, infinities, nans, signed zeros), through a strided view, for rows
    narrower and wider than its block."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    bits = np.resize(bits, (-(-(1 << 16) // width) + 1) * width).reshape(-1, width)
    interleaved = np.stack([bits, bits[::-1]], axis=1)  # (n, 2, width), like bundles
    for part in range(2):
        source = interleaved[:, part].view(np.float16)
        out = np.full(source.shape, 7.0, np.float32)
        decode_into(source, "float16", out)
        expected = source.astype(np.float32)
        assert np.array_equal(out.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_into_other_dtypes(dtype):
    values = np.random.default_rng(0).standard_normal((5, 3, 9)).astype(np.float32)
    stored = encode(values, dtype)
    out = np.empty((5, 9), np.float32)
    decode_into(stored[:, 1], dtype, out)
    assert np.array_equal(out, decode(stored, dtype)[:, 1])


def test_decode_into_nothing():
    out = np.empty((0, 4), np.float32)
    assert decode_into(np.empty((0, 4), np.float16), "float16", out) is out


@pytest.mark.parametrize(
    "qtype, dtype", [(Q.F16, "float16"), (Q.Q8_0, "q8"), (Q.Q4_0, "q4"), (Q.Q4_K, "q4")]
)
def test_a_gguf_is_cached_at_its_own_width(tmp_path, qtype, dtype):
    from mlx_flashinfer.loader import resolve_model

    config = gguf_config()
    path = tmp_path / "m.gguf"
    write_gguf(path, config, random_weights(config), qtype_of=lambda n, a: qtype)
    layout = Layout.open(resolve_model(path, cache_dir=tmp_path / "cache"))
    assert layout.dtype == dtype
    if dtype != "float16":  # its blocks taken as they are
        assert layout.quantization["exact_from_source"] > 0
