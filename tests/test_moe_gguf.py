"""Mixtures of experts from GGUF (experts stacked as ffn_{gate,up,down}_exps, or
one tensor each as in the first Mixtral GGUFs): the same layout as from the Hugging
Face checkpoint, transformers' logits, quantized expert rows taken unchanged, and
the refusals."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from cli_checks import assert_refused, run
from moe_gguf import write_moe_gguf
from safetensors.numpy import load_file
from test_moe import GOLDEN, budgets
from tiny_models import TOKENS, write_hf_checkpoint
from tiny_moe import moe_config, moe_weights, tiny_moe_configs

from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.formats.quantize import rows_float32

F16 = gguf.GGMLQuantizationType.F16
# what a GGUF does not store but llama.cpp fixes, stated for the tiny models
EXTRA = {"qwen3-moe-unnormed": {"expert_weights_norm": False}}


def same_model_args(a: Path, b: Path) -> None:
    """Two layouts' ModelArgs agree (GGUF keeps floats at float32 precision)."""
    args = [json.loads((x / "manifest.json").read_text())["model_args"] for x in (a, b)]
    for key, value in args[0].items():
        if isinstance(value, float):
            assert args[1][key] == pytest.approx(value, rel=1e-6), key
        else:
            assert args[1][key] == value, key


def same_values(a: Path, b: Path) -> None:
    """Two float16 layouts' tensors within two float16 roundings of each other
    (subnormals: two of their steps)."""
    x, y = (np.fromfile(p / "ffn.bin", dtype=np.float16) for p in (a, b))
    np.testing.assert_allclose(x, y, rtol=2**-9, atol=2**-23)
    x, y = (load_file(p / "resident.safetensors") for p in (a, b))
    assert x.keys() == y.keys()
    for name in x:
        np.testing.assert_allclose(x[name], y[name], rtol=2**-9, atol=2**-23)


@pytest.mark.parametrize("name", sorted(tiny_moe_configs()))
def test_a_moe_gguf_converts_as_its_checkpoint(name, tmp_path):
    """Written as llama.cpp writes it (stacked experts, q/k permuted for Mixtral and
    Granite, Granite's multipliers as metadata), a GGUF converts to the bytes of
    the Hugging Face folder's layout (float32, and float16 from F16 tensors); its
    logits are transformers', and flash equals dense."""
    config = tiny_moe_configs()[name]
    weights = moe_weights(config, seed=5)  # the golden logits' weights
    hf = write_hf_checkpoint(tmp_path / "hf", config, weights)
    extra = EXTRA.get(name)
    for qtype, dtype in ((None, "float32"), (F16, "float16")):
        src = write_moe_gguf(
            tmp_path / f"{dtype}.gguf", config, weights, qtype, extra=extra
        )
        a = convert(hf, tmp_path / f"hf-{dtype}", dtype=dtype, progress=False)
        b = convert(src, tmp_path / f"gguf-{dtype}", dtype=dtype, progress=False)
        same_model_args(a, b)
        if name == "granitemoe" and dtype == "float16":  # F16 values scaled, rounded
            same_values(a, b)  # again: one float16 rounding apart
            continue
        for file in ("ffn.bin", "resident.safetensors"):
            assert (a / file).read_bytes() == (b / file).read_bytes(), (dtype, file)
    golden = np.load(GOLDEN / f"{name}.npz")
    layout = tmp_path / "gguf-float32"
    dense, _ = load(layout, backend="numpy")
    expected = dense.logits(golden["tokens"].tolist())
    assert np.abs(expected - golden["logits"]).max() <= 1e-4
    flash, _ = load(
        layout, backend="numpy", memory_budget=budgets(layout)["least"], window=2
    )
    got = flash.logits(golden["tokens"].tolist(), prefill=4)
    assert (
        np.abs(got - dense.logits(golden["tokens"].tolist(), prefill=4)).max() <= 1e-5
    )


# matrices whose Q4_0 blocks a q4 layout takes unchanged, per layer: the attention's
# projections, each expert's gate and up rows (down goes in as columns: rounded
# again), the shared expert's; Granite's scaled q, o and experts are new values
EXACT_PER_LAYER = {
    "mixtral": 4 + 2 * 6,
    "qwen2_moe": 4 + 2 * 6 + 3,
    "olmoe": 4 + 2 * 6,
    "granitemoe": 2,
}


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
@pytest.mark.parametrize("family", sorted(EXACT_PER_LAYER))
def test_quantized_experts_are_taken_unchanged(family, qtype, tmp_path):
    """A Q4_0 (Q8_0) GGUF into a q4 (q8) layout: each expert's gate and up rows are
    its stack's blocks at [e], the same values exactly (no second rounding; Granite's,
    joined as input_linear, are rounded again); flash equals dense; the logits stay
    near those of the GGUF's own values in float32."""
    kind = getattr(gguf.GGMLQuantizationType, qtype)
    dtype = "q4" if qtype == "Q4_0" else "q8"
    size = "intermediate_size" if family != "qwen2_moe" else "moe_intermediate_size"
    config = moe_config(family, experts=6, hidden_size=64, **{size: 32})
    if family == "granitemoe":  # q scaled by attention_multiplier * sqrt(head_dim)
        config["attention_multiplier"] = 0.125
    src = write_moe_gguf(tmp_path / "q.gguf", config, moe_weights(config, 7), kind)
    layout = convert(src, tmp_path / dtype, dtype=dtype, progress=False)
    lay = Layout.open(layout)
    record = lay.quantization
    tied = family == "granitemoe"  # its head is the embedding scaled: not exact
    per_layer = EXACT_PER_LAYER[family]
    assert record["exact_from_source"] == (0 if tied else 2) + 2 * per_layer
    stacks = {t.name: t for t in gguf.GGUFReader(src).tensors}
    f, d = 32, 64
    for layer in range(2):
        gate, up, _ = lay.read_parts(layer)
        for part, stack in ((gate, "ffn_gate_exps"), (up, "ffn_up_exps")):
            t = stacks[f"blk.{layer}.{stack}.weight"]
            for e in range(6):
                expected = gguf.quants.dequantize(t.data[e], kind)
                got = rows_float32(part, dtype, e, e + 1).reshape(f, d)
                if family == "granitemoe":  # requantized: near, not equal
                    assert np.abs(got - expected).max() < 0.2 * np.abs(expected).max()
                else:
                    assert np.array_equal(got, expected), (layer, stack, e)
    if family != "granitemoe":
        down = {"mixtral": "w2"}.get(family, "down_proj")
        block = "block_sparse_moe" if family == "mixtral" else "mlp"
        assert f"{block}.experts.*.{down}.weight" in record["requantized_from_source"]
    dense, _ = load(layout, backend="numpy")
    expected = dense.logits(TOKENS, prefill=4)
    flash, _ = load(
        layout, backend="numpy", memory_budget=budgets(layout)["least"], window=2
    )
    assert np.abs(flash.logits(TOKENS, prefill=4) - expected).max() <= 1e-5
    exact = convert(src, tmp_path / "f32", dtype="float32", progress=False)
    reference = load(exact, backend="numpy")[0].logits(TOKENS, prefill=4)
    assert np.abs(expected - reference).max() < 0.05 * np.abs(reference).max()


def test_inspect_a_moe_gguf_says_its_experts(tmp_path, capsys):
    config = tiny_moe_configs()["qwen2-moe"]
    src = write_moe_gguf(tmp_path / "m.gguf", config, moe_weights(config, 5))
    status, out, err = run(["inspect", src, "--cache-dir", tmp_path / "cache"], capsys)
    assert status == 0, err
    assert "6 per layer, 2 per token" in out
    assert "qwen2_moe: top-k of a softmax; a shared expert of 32" in out


def test_routing_fixed_by_llama_cpp_unless_the_metadata_says(tmp_path):
    """Qwen3-MoE's GGUF does not store norm_topk_prob: llama.cpp renormalises, and
    so does the layout, unless {arch}.expert_weights_norm says otherwise."""
    config = tiny_moe_configs()["qwen3-moe-unnormed"]
    weights = moe_weights(config, 5)
    for extra, normed in ((None, True), ({"expert_weights_norm": False}, False)):
        src = write_moe_gguf(tmp_path / f"{normed}.gguf", config, weights, extra=extra)
        layout = convert(src, tmp_path / f"l{normed}", dtype="float32", progress=False)
        assert Layout.open(layout).args.norm_topk_prob is normed


def test_linear_rope_scaling_as_in_its_checkpoint(tmp_path):
    config = tiny_moe_configs()["olmoe"]
    config = config | {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    weights = moe_weights(config, 5)
    rope = {"rope.scaling.type": "linear", "rope.scaling.factor": 2.0}
    src = write_moe_gguf(tmp_path / "r.gguf", config, weights, extra=rope)
    hf = write_hf_checkpoint(tmp_path / "hf", config, weights)
    a = convert(hf, tmp_path / "a", dtype="float32", progress=False)
    b = convert(src, tmp_path / "b", dtype="float32", progress=False)
    same_model_args(a, b)
    expected = load(a, backend="numpy")[0].logits(TOKENS)
    got = load(b, backend="numpy")[0].logits(TOKENS)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_moe_ggufs_refused_in_one_line(tmp_path, capsys):
    config = tiny_moe_configs()["mixtral"]
    weights = moe_weights(config, 5)
    out = tmp_path / "out"
    src = write_moe_gguf(tmp_path / "ds.gguf", config, weights, arch="deepseek2")
    assert_refused(
        ["convert", src, out], "unsupported GGUF mixture of experts 'deepseek2'", capsys
    )
    sigmoid = {"expert_gating_func": 2}
    src = write_moe_gguf(tmp_path / "sig.gguf", config, weights, extra=sigmoid)
    assert_refused(["convert", src, out], "routing other than softmax", capsys)
    granite = tiny_moe_configs()["granitemoe"]
    shared = {"expert_shared_feed_forward_length": 16}
    src = write_moe_gguf(
        tmp_path / "gs.gguf", granite, moe_weights(granite, 5), extra=shared
    )
    assert_refused(["convert", src, out], "blk.0.ffn_gate_shexp or ffn_up", capsys)
    for extra, refusal in (
        ({"leading_dense_block_count": 1}, "leading_dense_block_count is not"),
        ({"expert_shared_count": 2}, "llama with 2 shared expert(s) is not"),
        ({"expert_count": 7}, "expected a stack of 7 experts"),
    ):
        src = write_moe_gguf(tmp_path / "x.gguf", config, weights, extra=extra)
        assert_refused(["convert", src, out], refusal, capsys)


@pytest.mark.parametrize(
    ("qtype", "dtype"),
    [(None, "float32"), ("F16", "float16"), ("Q4_0", "q4"), ("Q8_0", "q8")],
)
def test_an_old_style_mixtral_gguf_converts_as_the_stacked_one(qtype, dtype, tmp_path):
    """The first Mixtral GGUFs, each expert's matrices a tensor of its own
    (blk.N.ffn_gate.E.weight), convert to the bytes of the same model written
    stacked; Q4_0 and Q8_0 gate and up rows are each expert tensor's blocks
    unchanged; the dense logits are the stacked one's."""
    kind = qtype and getattr(gguf.GGMLQuantizationType, qtype)
    config = moe_config("mixtral", hidden_size=64, intermediate_size=32)
    weights = moe_weights(config, 7)
    layouts = []
    for form, layers in (("stacked", ()), ("own", (0, 1))):
        src = write_moe_gguf(
            tmp_path / f"{form}.gguf", config, weights, kind, per_expert=layers
        )
        layouts.append(convert(src, tmp_path / form, dtype=dtype, progress=False))
    stacked, own = layouts
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "own.gguf").tensors}
    assert "blk.1.ffn_down.5.weight" in tensors
    assert not any(name.endswith("_exps.weight") for name in tensors)
    same_model_args(stacked, own)
    for file in ("ffn.bin", "resident.safetensors"):
        assert (stacked / file).read_bytes() == (own / file).read_bytes(), file
    lay = Layout.open(own)
    assert lay.quantization == Layout.open(stacked).quantization
    if dtype in ("q4", "q8"):
        exact = 2 + 2 * EXACT_PER_LAYER["mixtral"]  # embedding, head, 2 layers
        assert lay.quantization["exact_from_source"] == exact
        for layer in range(2):
            gate, up, _ = lay.read_parts(layer)
            for part, name in ((gate, "ffn_gate"), (up, "ffn_up")):
                for e in range(6):
                    t = tensors[f"blk.{layer}.{name}.{e}.weight"]
                    got = rows_float32(part, dtype, e, e + 1).reshape(32, 64)
                    expected = gguf.quants.dequantize(t.data, kind)
                    assert np.array_equal(got, expected), (layer, name, e)
    a, b = (load(x, backend="numpy")[0].logits(TOKENS, prefill=4) for x in layouts)
    assert np.array_equal(a, b)


def test_old_style_moe_ggufs_refused_in_one_line(tmp_path, capsys):
    """Stacks and per-expert tensors in one file, an expert's tensor missing (or
    fewer experts than the metadata's), per-expert tensors where llama.cpp does not
    read them (Qwen2-MoE): each refused, naming the tensor."""
    config = tiny_moe_configs()["mixtral"]
    weights = moe_weights(config, 5)
    out = tmp_path / "out"
    src = write_moe_gguf(tmp_path / "m.gguf", config, weights, per_expert=(1,))
    err = assert_refused(["convert", src, out], "experts are either stacked", capsys)
    assert "_exps.weight beside blk.1.ffn_" in err
    for extra, without, refusal in (
        (None, ("blk.1.ffn_up.3.weight",), "blk.1.ffn_up.3.weight is missing"),
        ({"expert_count": 7}, (), "blk.0.ffn_gate.6.weight is missing"),
    ):
        src = write_moe_gguf(
            tmp_path / "x.gguf",
            config,
            weights,
            extra=extra,
            per_expert=(0, 1),
            without=without,
        )
        assert_refused(["convert", src, out], refusal, capsys)
    qwen = tiny_moe_configs()["qwen2-moe"]
    src = write_moe_gguf(
        tmp_path / "q.gguf", qwen, moe_weights(qwen, 5), per_expert=(0, 1)
    )
    assert_refused(["convert", src, out], "unsupported tensor blk.0.ffn_", capsys)
