"""mlx-community checkpoints (mlx-lm's quantized safetensors) as sources.

Each test makes its checkpoint as mlx-lm's convert would: random weights quantized by
MLX's own `mx.quantize`, saved by `mx.save_safetensors` beside a config.json with its
quantization block (and per-module overrides); a mixture of experts with its experts
stacked as `switch_mlp`. The reference is the same model dequantized (MLX's values)
and saved as a plain Hugging Face folder.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from cli_checks import assert_refused, run
from tiny_models import (
    TOKENS,
    has_mlx,
    random_weights,
    tiny_config,
)
from tiny_moe import moe_config, moe_weights

from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.flash.expert_plan import experts_floor
from mlx_flashinfer.formats.quantize import dequantize
from mlx_flashinfer.loader import resolve_model

mx = pytest.importorskip("mlx.core", reason="making MLX checkpoints needs mlx")
from tiny_mlx import (  # noqa: E402
    assert_dequantizes_as_written,
    fields,
    write_float,
    write_mlx_checkpoint,
)

BACKENDS = ["numpy"] + (["mlx"] if has_mlx() else [])
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}


def down_columns(layout: Path) -> list[np.ndarray]:
    """Each layer's down matrix as the layout holds it, float32 (d_model, n)."""
    lay = Layout.open(layout)
    group = lay.quantization["group_size"]
    out = []
    for layer in range(lay.args.num_hidden_layers):
        q = lay.read_parts(layer)[-1]
        cols = dequantize(q.packed, q.scales, q.biases, q.bits, group)
        out.append(np.ascontiguousarray(cols.T))
    return out


CONFIGS = {
    "llama": tiny_config("llama", "silu", **SIZES),
    # head_dim 8: o_proj's rows of 32 do not take groups of 64, kept float as
    # mlx-lm keeps them
    "qwen3": tiny_config("llama", "silu", **SIZES, model_type="qwen3", head_dim=8),
}


@pytest.mark.parametrize("scales", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_q4_takes_the_groups_as_stored(tmp_path, name, scales):
    """A q4 layout at the checkpoint's own group size (the default) holds every
    quantized attention, embedding, head, gate and up matrix byte for byte as MLX
    stored it (so its values are MLX's dequantized ones exactly); only the down
    columns are quantized again, along d_model, within half a step."""
    config = CONFIGS[name]
    weights = random_weights(config, seed=3)
    src, saved, values = write_mlx_checkpoint(
        tmp_path / "mlx", config, weights, dtype=getattr(mx, scales)
    )
    layout = convert(src, tmp_path / "q4", dtype="q4", progress=False)
    lay = Layout.open(layout)
    record = lay.quantization
    assert record["group_size"] == 64 and record["part_bits"] == [4, 4, 8]
    quantized = {n.removesuffix(".scales") for n in saved if n.endswith(".scales")}
    down = {m for m in quantized if m.endswith("down_proj")}
    assert record["exact_from_source"] == len(quantized - down)
    assert record["requantized_from_source"] == ["mlp.down_proj.weight"]
    assert "scales_rounded_to_float16" not in record  # none below 2**-14 here
    resident = dict(lay.iter_resident(stored=True))
    for module in quantized - down:
        plain = module.removeprefix("model.")
        layer_part = plain.split(".")
        if "mlp" in layer_part:  # a gate or up part of its layer's bundles
            parts = lay.read_parts(int(layer_part[1]))
            got = parts[0 if layer_part[-1] == "gate_proj" else 1]
        else:
            got = resident[plain + ".weight"]
        for ours, theirs in zip(
            (got.packed, got.scales, got.biases), fields(saved, module), strict=True
        ):
            assert np.array_equal(ours, theirs), module
        assert np.array_equal(
            dequantize(got.packed, got.scales, got.biases, 4, 64),
            values[module + ".weight"],
        )
    if name == "qwen3":  # o_proj was float in the source: float16 as stored
        assert "layers.0.self_attn.o_proj.weight" not in record["tensors"]
    for layer, cols in enumerate(down_columns(layout)):
        reference = values[f"model.layers.{layer}.mlp.down_proj.weight"]
        q = lay.read_parts(layer)[-1]
        step = np.repeat(q.scales.astype(np.float32), 64, axis=1).T
        assert np.all(np.abs(cols - reference) <= 0.51 * step + 1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_dense_logits_are_the_dequantized_models(tmp_path, name):
    """The q4 layout computes the dequantized model: its dense logits equal, within
    float rounding, those of the dequantized weights converted as a plain folder
    (with the down matrices the q4 layout holds); and a float32 layout of the
    checkpoint is that folder's layout byte for byte."""
    config = CONFIGS[name]
    src, _, values = write_mlx_checkpoint(
        tmp_path / "mlx", config, random_weights(config, seed=4)
    )
    q4 = convert(src, tmp_path / "q4", dtype="q4", progress=False)
    float32 = convert(src, tmp_path / "f32", dtype="float32", progress=False)
    plain = write_float(tmp_path / "plain", config, values)
    reference = convert(plain, tmp_path / "ref", dtype="float32", progress=False)
    for file in ("resident.safetensors", "ffn.bin"):
        assert (float32 / file).read_bytes() == (reference / file).read_bytes()
    as_held = dict(values)
    for layer, cols in enumerate(down_columns(q4)):
        as_held[f"model.layers.{layer}.mlp.down_proj.weight"] = cols
    held = write_float(tmp_path / "held", config, as_held)
    expected_layout = convert(
        held, tmp_path / "held-ref", dtype="float32", progress=False
    )
    expected = load(expected_layout, backend="numpy")[0].logits(TOKENS)
    got = load(q4, backend="numpy")[0].logits(TOKENS)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    # against the dequantized model itself, the down columns' rounding is all
    dequantized = load(reference, backend="numpy")[0].logits(TOKENS)
    assert np.abs(got - dequantized).max() <= 2e-2 * np.abs(dequantized).max()


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 128])
def test_any_affine_format_dequantizes_to_mlxs_values(tmp_path, bits, group_size):
    """Every bits and group size MLX's affine mode packs (3, 5 and 6 bits run
    across words) is read to MLX's own dequantized values exactly; a q4 layout
    holds what it cannot hold natively quantized again, and says so."""
    wide = {"hidden_size": 128, "intermediate_size": 256} if group_size > 64 else {}
    config = tiny_config("llama", "silu", **SIZES | wide)
    src, _, values = write_mlx_checkpoint(
        tmp_path / "mlx",
        config,
        random_weights(config, seed=bits),
        bits=bits,
        group_size=group_size,
    )
    f32 = Layout.open(convert(src, tmp_path / "f32", dtype="float32", progress=False))
    resident = f32.resident_tensors()
    assert np.array_equal(
        resident["embed_tokens.weight"], values["model.embed_tokens.weight"]
    )
    gate = f32.read_parts(1)[0]
    assert np.array_equal(gate, values["model.layers.1.mlp.gate_proj.weight"])
    q4 = Layout.open(convert(src, tmp_path / "q4", dtype="q4", progress=False))
    # resident matrices keep 4 or 8 bits; bundles' gate and up rows are the
    # layout's 4 bits
    assert q4.quantization["group_size"] == group_size
    assert (q4.quantization["exact_from_source"] > 0) == (bits in (4, 8))
    requantized = set(q4.quantization["requantized_from_source"])
    assert ("mlp.gate_proj.weight" in requantized) == (bits != 4)
    assert ("self_attn.q_proj.weight" in requantized) == (bits not in (4, 8))
    assert "mlp.down_proj.weight" in requantized
    if bits == 8:  # a q8 layout takes every matrix but the down columns
        q8 = Layout.open(convert(src, tmp_path / "q8", dtype="q8", progress=False))
        record = q8.quantization
        assert record["requantized_from_source"] == ["mlp.down_proj.weight"]
        assert record["exact_from_source"] == 2 + 6 * config["num_hidden_layers"]


def test_fused_projections_take_row_ranges_of_their_groups(tmp_path):
    """Phi-3's qkv_proj and gate_up_proj, quantized whole: each part is a range of
    the fused matrix's rows, groups and all, taken as stored."""
    config = tiny_config("llama", "silu", **SIZES, model_type="phi3", pad_token_id=0)
    src, saved, values = write_mlx_checkpoint(
        tmp_path / "mlx", config, random_weights(config, seed=9)
    )
    assert "model.layers.0.mlp.gate_up_proj.scales" in saved
    plain, ref = assert_dequantizes_as_written(tmp_path, src, config, values)
    lay = Layout.open(convert(src, tmp_path / "q4", dtype="q4", progress=False))
    # per layer q, k, v, o, gate, up; embeddings and head
    assert lay.quantization["exact_from_source"] == 2 + 6 * 2
    f = config["intermediate_size"]
    for layer in range(2):
        gate_up = fields(saved, f"model.layers.{layer}.mlp.gate_up_proj")
        for p, part in enumerate(lay.read_parts(layer)[:2]):
            ours = (part.packed, part.scales, part.biases)
            for o, t in zip(ours, gate_up, strict=True):
                assert np.array_equal(o, t[p * f : (p + 1) * f])


def test_per_module_overrides(tmp_path):
    """mlx-lm's mixed recipes: an 8-bit down_proj (quantized again along d_model
    like any), a 3-bit gate (requantized, recorded), an 8-bit embedding (kept at 8
    bits in a q4 layout), a projection kept float (`false`)."""
    config = CONFIGS["llama"]
    eight = {"group_size": 64, "bits": 8}
    overrides = {
        "model.embed_tokens": eight,
        "model.layers.0.mlp.down_proj": eight,
        "model.layers.1.mlp.gate_proj": {"group_size": 32, "bits": 3},
        "model.layers.1.self_attn.q_proj": False,
    }
    src, saved, values = write_mlx_checkpoint(
        tmp_path / "mlx", config, random_weights(config, seed=6), overrides=overrides
    )
    assert saved["model.layers.1.self_attn.q_proj.weight"].dtype == mx.float16
    plain, ref = assert_dequantizes_as_written(tmp_path, src, config, values)
    q4 = Layout.open(convert(src, tmp_path / "q4", dtype="q4", progress=False))
    record = q4.quantization
    assert record["tensors"]["embed_tokens.weight"] == 8
    assert "layers.1.self_attn.q_proj.weight" in record["tensors"]  # quantized here
    assert record["requantized_from_source"] == [
        "mlp.down_proj.weight",
        "mlp.gate_proj.weight",
    ]
    resident = dict(q4.iter_resident(stored=True))
    embed = resident["embed_tokens.weight"]
    for ours, theirs in zip(
        (embed.packed, embed.scales, embed.biases),
        fields(saved, "model.embed_tokens"),
        strict=True,
    ):
        assert np.array_equal(ours, theirs)
    # closer to the dequantized model than its plain conversion, which rounds all
    requantized = convert(plain, tmp_path / "all", dtype="q4", progress=False)
    reference = load(ref, backend="numpy")[0].logits(TOKENS)
    error = {
        lay: np.abs(load(lay, backend="numpy")[0].logits(TOKENS) - reference).max()
        for lay in (q4.path, requantized)
    }
    assert error[q4.path] < error[requantized]


def test_bfloat16_scales_below_float16s_normals_round_and_are_counted(tmp_path, capsys):
    """bfloat16 scales and biases are float16's values exactly down to 2**-17;
    rows of tiny weights have smaller ones, which round to float16's subnormals (by
    at most 2**-25) and are counted in the record."""
    config = CONFIGS["llama"]
    weights = random_weights(config, seed=8)
    weights["model.layers.0.mlp.gate_proj.weight"][:8] *= 1e-5
    src, saved, _ = write_mlx_checkpoint(
        tmp_path / "mlx", config, weights, dtype=mx.bfloat16
    )
    lay = Layout.open(convert(src, tmp_path / "q4", dtype="q4", progress=False))
    stored = [
        np.array(saved["model.layers.0.mlp.gate_proj" + k].astype(mx.float32))
        for k in (".scales", ".biases")
    ]
    gate = lay.read_parts(0)[0]
    changed = 0
    for ours, theirs in zip((gate.scales, gate.biases), stored, strict=True):
        assert np.all(np.abs(ours.astype(np.float32) - theirs) <= 2.0**-25)
        changed += int(np.count_nonzero(ours.astype(np.float32) != theirs))
    assert 0 < changed == lay.quantization["scales_rounded_to_float16"]
    status, out, _ = run(["inspect", lay.path], capsys)
    assert status == 0 and f"{changed} scales or biases rounded" in out


def moe_budget(layout: Path) -> int:
    """The smallest budget the experts placement takes: one token's experts."""
    lay = Layout.open(layout)
    a = lay.args
    rows = a.num_hidden_layers * a.experts_per_token
    return experts_floor(lay) + rows * (lay.bundle_bytes + 8)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_switch_mlp_experts_convert_and_flash_equals_dense(tmp_path, family):
    """Experts stacked as `switch_mlp` (routers at 8 bits, as mlx-lm's recipes
    keep them; Qwen2-MoE's shared expert beside): each expert's gate and up rows
    are taken as stored, the float32 layout equals the per-expert dequantized
    model's, and flash == dense."""
    sizes = {"hidden_size": 64, "intermediate_size": 64}
    if family != "mixtral":
        sizes["moe_intermediate_size"] = 64
    if family == "qwen2_moe":
        sizes["shared_expert_intermediate_size"] = 64
    config = moe_config(family, **sizes)
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    routers = {
        f"model.layers.{i}.{block}.gate": {"group_size": 64, "bits": 8}
        for i in range(config["num_hidden_layers"])
    }
    src, saved, values = write_mlx_checkpoint(
        tmp_path / "mlx",
        config,
        moe_weights(config, seed=2),
        overrides=routers,
    )
    assert f"model.layers.0.{block}.switch_mlp.gate_proj.scales" in saved
    plain, ref = assert_dequantizes_as_written(tmp_path, src, config, values)
    q4 = convert(src, tmp_path / "q4", dtype="q4", progress=False)
    lay = Layout.open(q4)
    layers, experts = config["num_hidden_layers"], lay.args.num_experts
    # attention, embeddings, head, a shared expert (resident: its down rows too)
    resident = [
        n
        for n in saved
        if n.endswith(".scales")
        and "switch_mlp" not in n
        and not n.endswith((".gate.scales", "shared_expert_gate.scales"))
    ]
    assert lay.quantization["exact_from_source"] == (
        layers * experts * 2 + len(resident)
    )
    down = "w2" if family == "mixtral" else "down_proj"
    assert lay.quantization["requantized_from_source"] == [
        f"{block}.experts.*.{down}.weight"
    ]
    f = lay.args.intermediate_size
    for layer in range(layers):
        gate = lay.read_parts(layer)[0]
        mlx = fields(saved, f"model.layers.{layer}.{block}.switch_mlp.gate_proj")
        ours = (gate.packed, gate.scales, gate.biases)
        for o, t in zip(ours, mlx, strict=True):
            assert np.array_equal(o.reshape(experts, f, -1), t)
    for backend in BACKENDS:
        dense, _ = load(q4, backend=backend)
        expected = dense.logits(TOKENS, prefill=4)
        flash, _ = load(q4, backend=backend, memory_budget=moe_budget(q4), window=1)
        assert np.abs(flash.logits(TOKENS, prefill=4) - expected).max() <= 1e-5
        assert sum(flash.held_bytes().values()) == flash.plan.weights
    # the dequantized model, but for the down columns' second rounding
    requantized = convert(plain, tmp_path / "all", dtype="q4", progress=False)
    reference = load(ref, backend="numpy")[0].logits(TOKENS, prefill=4)
    error = {
        lay: np.abs(load(lay, backend="numpy")[0].logits(TOKENS, prefill=4) - reference)
        for lay in (q4, requantized)
    }
    assert error[q4].max() < error[requantized].max()


def test_unsupported_quantizations_are_refused_in_one_line(tmp_path, capsys):
    config = CONFIGS["llama"]
    src, _, _ = write_mlx_checkpoint(
        tmp_path / "mlx", config, random_weights(config, seed=1)
    )
    settings = json.loads((src / "config.json").read_text())
    for block, says in [
        ({"group_size": 32, "bits": 4, "mode": "mxfp4"}, "mode 'mxfp4'"),
        ({"group_size": 64, "bits": 7}, "7 bits in groups of 64"),
    ]:
        (src / "config.json").write_text(json.dumps(settings | {"quantization": block}))
        with pytest.raises(ValueError, match=says):
            convert(src, tmp_path / "out", dtype="q4", progress=False)
        assert_refused(["convert", src, tmp_path / "out"], says, capsys)
    gptq = settings | {"quantization_config": {"quant_method": "gptq", "bits": 4}}
    del gptq["quantization"]
    (src / "config.json").write_text(json.dumps(gptq))
    assert_refused(
        ["convert", src, tmp_path / "out"], "'gptq' is not supported", capsys
    )
    assert not (tmp_path / "out").exists()


def test_a_quantized_checkpoint_is_cached_at_its_own_width(tmp_path):
    # `--model` / load() of a quantized source: cached as q4 (q8) with its groups
    # taken as stored, not as float16 four times its size
    config = CONFIGS["llama"]
    weights = random_weights(config, seed=3)
    src, _, _ = write_mlx_checkpoint(tmp_path / "mlx4", config, weights)
    cached = Layout.open(resolve_model(src, cache_dir=tmp_path / "cache"))
    assert cached.dtype == "q4" and cached.quantization["exact_from_source"] > 0
    src8, _, _ = write_mlx_checkpoint(tmp_path / "mlx8", config, weights, bits=8)
    assert Layout.open(resolve_model(src8, cache_dir=tmp_path / "cache")).dtype == "q8"
    plain = write_float(tmp_path / "plain", config, weights)
    assert Layout.open(resolve_model(plain, cache_dir=tmp_path / "cache")).dtype == (
        "float16"
    )
