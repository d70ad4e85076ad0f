"""Granite-MoE as mlx-community stores it: mlx-lm's sanitize splits each layer's
`input_linear` (experts, 2 * n, d_model) into `switch_mlp.gate_proj` and `up_proj`
and renames `output_linear` `switch_mlp.down_proj`; `convert -q` then quantizes them
with a leading expert axis (the router `block_sparse_moe.router.layer` at 8 bits, as
its quant_predicate says) and drops the tied head. Without `-q` the stacks stay
float16 or bfloat16 (or float32).

The tiny model is the one of tests/tiny_moe.py; the reference is its Hugging Face
folder: the values MLX wrote, joined back into input_linear.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_models import TOKENS, has_mlx, write_hf_checkpoint
from tiny_moe import moe_config, moe_weights, tiny_moe_configs

from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.flash.expert_plan import experts_floor
from mlx_flashinfer.loader import resolve_model

mx = pytest.importorskip("mlx.core", reason="making MLX checkpoints needs mlx")
from tiny_mlx import (  # noqa: E402
    assert_dequantizes_as_written,
    fields,
    write_mlx_checkpoint,
    write_tokenizer,
)

BACKENDS = ["numpy"] + (["mlx"] if has_mlx() else [])
GOLDEN = Path(__file__).parent / "golden" / "moe" / "granitemoe.npz"
# d_model and n of 64 take groups of 64; attention_multiplier 0.1 scales q by 0.4
CONFIG = moe_config(
    "granitemoe", hidden_size=64, intermediate_size=64, attention_multiplier=0.1
)
SWITCH = "block_sparse_moe.switch_mlp."


def mlx_lm_names(weights: dict, config: dict) -> dict:
    """Granite's Hugging Face tensors as mlx-lm's sanitize names them."""
    out = {}
    for name, w in weights.items():
        if name.endswith("input_linear.weight"):
            gate, up = np.split(w, 2, axis=1)
            out[name.replace("input_linear", "switch_mlp.gate_proj")] = gate
            out[name.replace("input_linear", "switch_mlp.up_proj")] = up
        elif name.endswith("output_linear.weight"):
            out[name.replace("output_linear", "switch_mlp.down_proj")] = w
        elif name != "lm_head.weight" or not config["tie_word_embeddings"]:
            out[name] = w
    return out


def hf_names(values: dict) -> dict:
    """mlx-lm's names back into Granite's: gate and up stacks joined."""
    out = {}
    for name, v in values.items():
        if SWITCH + "up_proj" in name:
            continue
        if SWITCH + "gate_proj" in name:
            up = values[name.replace("gate_proj", "up_proj")]
            out[name.replace("switch_mlp.gate_proj", "input_linear")] = np.concatenate(
                [v, up], axis=1
            )
        else:
            out[name.replace("switch_mlp.down_proj", "output_linear")] = v
    return out


def write_granite(path: Path, config: dict, weights: dict, bits: int):
    """A quantized mlx-community Granite-MoE: (folder, MLX's stored tensors, the
    dequantized model under Granite's own names)."""
    routers = {
        f"model.layers.{i}.block_sparse_moe.router.layer": {"group_size": 64, "bits": 8}
        for i in range(config["num_hidden_layers"])
    }
    src, saved, values = write_mlx_checkpoint(
        path, config, mlx_lm_names(weights, config), bits=bits, overrides=routers
    )
    return src, saved, hf_names(values)


def write_granite_float(path: Path, config: dict, weights: dict, dtype):
    """mlx-lm's unquantized form: the same names, every tensor as `dtype`; returns
    (folder, its values under Granite's names, float32)."""
    saved = {
        n: mx.array(w).astype(dtype) for n, w in mlx_lm_names(weights, config).items()
    }
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), saved, {"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path)
    values = {n: np.array(a.astype(mx.float32)) for n, a in saved.items()}
    return path, hf_names(values)


def moe_budget(layout: Path) -> int:
    """The smallest budget the experts placement takes: one token's experts."""
    lay = Layout.open(layout)
    a = lay.args
    return experts_floor(lay) + a.num_hidden_layers * a.experts_per_token * (
        lay.bundle_bytes + 8
    )


# Granite's multipliers, as convert folds them (formats/experts.py `fold_factor`)
FOLDED = {
    "model.embed_tokens": CONFIG["embedding_multiplier"],
    "self_attn.q_proj": CONFIG["attention_multiplier"] * 16**0.5,
    "self_attn.o_proj": CONFIG["residual_multiplier"],
}


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_switch_mlp_converts_as_written(tmp_path, bits):
    """A q4 (q8) mlx-community Granite-MoE: its float32 layout is byte for byte the
    one of its dequantized Hugging Face folder (gate and up joined as input_linear,
    the multipliers folded in); a layout of its bits takes each expert's gate and
    up rows as MLX stored them, and the scaled matrices' integers too, their scales
    and biases times the multiplier, rounded to float16 once (counted)."""
    weights = moe_weights(CONFIG, seed=2)
    src, saved, values = write_granite(tmp_path / "mlx", CONFIG, weights, bits)
    assert "model.layers.0.block_sparse_moe.switch_mlp.up_proj.scales" in saved
    assert "lm_head.weight" not in saved  # tied: mlx-lm drops it
    _, ref = assert_dequantizes_as_written(tmp_path, src, CONFIG, values)
    # each expert's part within a step (its largest scale) of the model MLX
    # quantized, as the Hugging Face folder converts it
    hf = write_hf_checkpoint(tmp_path / "hf", CONFIG, weights)
    hf = Layout.open(convert(hf, tmp_path / "hf-f32", dtype="float32", progress=False))
    for layer in range(CONFIG["num_hidden_layers"]):
        ours, theirs = Layout.open(ref).read_parts(layer), hf.read_parts(layer)
        for p, name in enumerate(("gate_proj", "up_proj", "down_proj")):
            scales = saved[f"model.layers.{layer}.{SWITCH}{name}.scales"]
            step = np.abs(np.array(scales.astype(mx.float32))).max()
            if name == "down_proj":  # the residual multiplier folded in
                step *= CONFIG["residual_multiplier"]
            assert np.abs(ours[p] - theirs[p]).max() <= step, (layer, name)
    dtype = f"q{bits}"
    lay = Layout.open(convert(src, tmp_path / dtype, dtype=dtype, progress=False))
    record = lay.quantization
    layers, experts = CONFIG["num_hidden_layers"], CONFIG["num_local_experts"]
    # q, k, v, o per layer, the embedding and the head (the embedding scaled apart)
    assert record["exact_from_source"] == layers * experts * 2 + layers * 4 + 2
    assert record["requantized_from_source"] == [
        "block_sparse_moe.output_linear.weight"
    ]
    f = CONFIG["intermediate_size"]
    for layer in range(layers):
        parts = lay.read_parts(layer)
        for p, name in enumerate(("gate_proj", "up_proj")):
            mlx = fields(saved, f"model.layers.{layer}.{SWITCH}{name}")
            ours = (parts[p].packed, parts[p].scales, parts[p].biases)
            for o, t in zip(ours, mlx, strict=True):
                assert np.array_equal(o.reshape(experts, f, -1), t)
    resident = dict(lay.iter_resident(stored=True))
    rounded = 0
    modules = {"embed_tokens": ("model.embed_tokens", FOLDED["model.embed_tokens"])}
    modules["lm_head"] = ("model.embed_tokens", 1 / CONFIG["logits_scaling"])
    for i in range(layers):
        for proj in ("q_proj", "o_proj"):
            modules[f"layers.{i}.self_attn.{proj}"] = (
                f"model.layers.{i}.self_attn.{proj}",
                FOLDED[f"self_attn.{proj}"],
            )
    for name, (module, factor) in modules.items():
        got = resident[name + ".weight"]
        packed, *groups = fields(saved, module)
        assert np.array_equal(got.packed, packed), name
        for ours, theirs in zip((got.scales, got.biases), groups, strict=True):
            wide = theirs.astype(np.float32) * np.float32(factor)
            assert np.array_equal(ours, wide.astype(np.float16)), name
            rounded += int(np.count_nonzero(ours.astype(np.float32) != wide))
    assert 0 < rounded == record["scales_rounded_to_float16"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_switch_mlp_matches_transformers(tmp_path, backend):
    """mlx-lm's unquantized Granite-MoE (float32) of the golden model: dense logits
    within 1e-4 of transformers', as its Hugging Face folder's are; its float16
    and bfloat16 forms convert to the layouts of folders of their values."""
    config = tiny_moe_configs()["granitemoe"]
    weights = moe_weights(config, seed=5)  # tools/make_moe_golden.py's
    golden = np.load(GOLDEN)
    src, _ = write_granite_float(tmp_path / "f32", config, weights, mx.float32)
    layout = convert(src, tmp_path / "lay", dtype="float32", progress=False)
    got = load(layout, backend=backend)[0].logits(golden["tokens"].tolist())
    assert np.abs(got - golden["logits"]).max() <= 1e-4
    for dtype in (mx.float16, mx.bfloat16):
        name = str(dtype).rsplit(".", 1)[-1]
        src, values = write_granite_float(tmp_path / name, config, weights, dtype)
        assert_dequantizes_as_written(tmp_path / f"{name}-ref", src, config, values)


def test_q4_switch_mlp_flash_equals_dense(tmp_path):
    """The q4 layout of a 4-bit mlx-community Granite-MoE: flash gives dense's
    logits at the smallest budget on each backend, and holds its plan."""
    src, _, _ = write_granite(tmp_path / "mlx", CONFIG, moe_weights(CONFIG, 3), 4)
    q4 = convert(src, tmp_path / "q4", dtype="q4", progress=False)
    for backend in BACKENDS:
        dense, _ = load(q4, backend=backend)
        expected = dense.logits(TOKENS, prefill=4)
        flash, _ = load(q4, backend=backend, memory_budget=moe_budget(q4), window=1)
        assert np.abs(flash.logits(TOKENS, prefill=4) - expected).max() <= 1e-5
        assert sum(flash.held_bytes().values()) == flash.plan.weights


def test_a_4bit_granite_moe_is_cached_as_q4(tmp_path):
    # `--model` of a 4-bit one: cached at its own width, its groups taken as stored
    src, _, _ = write_granite(tmp_path / "mlx", CONFIG, moe_weights(CONFIG, 5), 4)
    cached = Layout.open(resolve_model(src, cache_dir=tmp_path / "cache"))
    assert cached.dtype == "q4" and cached.quantization["exact_from_source"] > 0


def test_a_q4_0_granite_moe_gguf_is_cached_as_q4(tmp_path):
    # the cache's width comes from the first bundle part's tensor: Granite's stack
    # (named per expert before, which no Granite source holds: a KeyError)
    gguf = pytest.importorskip("gguf")
    from moe_gguf import write_moe_gguf

    config = moe_config("granitemoe", hidden_size=64, intermediate_size=32)
    q4_0 = gguf.GGMLQuantizationType.Q4_0
    src = write_moe_gguf(tmp_path / "g.gguf", config, moe_weights(config, 7), q4_0)
    assert Layout.open(resolve_model(src, cache_dir=tmp_path / "cache")).dtype == "q4"
