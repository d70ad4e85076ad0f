"""Granite-MoE with a shared expert (transformers' `granitemoeshared`): beside the
routed experts an ungated FFN, `shared_mlp.input_linear` (its gate and up rows in one
matrix) and `shared_mlp.output_linear`, added to the experts' sum before the residual
multiplier (folded into output_linear like the experts' down stacks)."""

from pathlib import Path

import numpy as np
import pytest
from tiny_models import TOKENS, has_mlx, write_hf_checkpoint
from tiny_moe import hf_only_moe_configs, moe_config, moe_weights

from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.flash.expert_plan import experts_floor

BACKENDS = ["numpy"] + (["mlx"] if has_mlx() else [])
GOLDEN = Path(__file__).parent / "golden" / "moe"


def least_budget(layout) -> int:
    """The smallest budget the experts placement takes: one token's experts."""
    lay = Layout.open(layout)
    a = lay.args
    rows = a.num_hidden_layers * a.experts_per_token
    return experts_floor(lay) + rows * (lay.bundle_bytes + 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_equals_transformers(tmp_path, backend):
    """Logits within 1e-4 of transformers' (tools/make_moe_golden.py); without
    its shared expert the same model is far from them."""
    config = hf_only_moe_configs()["granitemoeshared"]
    golden = np.load(GOLDEN / "granitemoeshared.npz")
    weights = moe_weights(config, seed=5)
    src = write_hf_checkpoint(tmp_path / "src", config, weights)
    layout = convert(src, tmp_path / "lay", dtype="float32", progress=False)
    lay = Layout.open(layout)
    assert lay.args.shared_expert_size == config["shared_intermediate_size"]
    assert "layers.1.shared_mlp.input_linear.weight" in lay.resident_tensors()
    got = load(layout, backend=backend)[0].logits(golden["tokens"].tolist())
    assert np.abs(got - golden["logits"]).max() <= 1e-4
    for name in [n for n in weights if "shared_mlp.output_linear" in n]:
        weights[name] = np.zeros_like(weights[name])
    src = write_hf_checkpoint(tmp_path / "unshared", config, weights)
    bare = convert(src, tmp_path / "bare", dtype="float32", progress=False)
    without = load(bare, backend=backend)[0].logits(golden["tokens"].tolist())
    assert np.abs(without - golden["logits"]).max() > 1e-2


@pytest.mark.parametrize("dtype", ["float32", "q4"])
def test_flash_equals_dense(tmp_path, dtype):
    """At the smallest budget and one that holds every expert, any window: flash
    gives dense's logits, holds its plan; both backends agree."""
    config = moe_config("granitemoeshared", hidden_size=64)
    src = write_hf_checkpoint(tmp_path / "src", config, moe_weights(config, 3))
    group = {"group_size": 32} if dtype == "q4" else {}
    layout = convert(src, tmp_path / dtype, dtype=dtype, progress=False, **group)
    lay = Layout.open(layout)
    spare = lay.args.num_hidden_layers * lay.args.num_experts * (lay.bundle_bytes + 8)
    logits = {}
    for backend in BACKENDS:
        dense, _ = load(layout, backend=backend)
        expected = dense.logits(TOKENS, prefill=4)
        for budget in (least_budget(layout), least_budget(layout) + spare):
            for window in (0, 2):
                flash, _ = load(
                    layout, backend=backend, memory_budget=budget, window=window
                )
                got = flash.logits(TOKENS, prefill=4)
                assert np.abs(got - expected).max() <= 1e-5, (backend, budget)
                assert sum(flash.held_bytes().values()) == flash.plan.weights
        logits[backend] = expected
    if "mlx" in logits:
        assert np.abs(logits["mlx"] - logits["numpy"]).max() <= 1e-2


def test_its_gguf_converts_as_its_checkpoint(tmp_path):
    """llama.cpp writes it as granitemoe with the shared MLP's size in the metadata
    and its input_linear split into ffn_gate_shexp and ffn_up_shexp: joined again,
    a float32 GGUF gives the folder's layout byte for byte and transformers'
    logits; a Q4_0 one keeps the shared gate and up rows' blocks (no multiplier
    scales them) and flash equals dense."""
    import gguf
    from moe_gguf import write_moe_gguf
    from test_moe_gguf import same_model_args

    from mlx_flashinfer.formats.quantize import rows_float32

    config = hf_only_moe_configs()["granitemoeshared"]
    golden = np.load(GOLDEN / "granitemoeshared.npz")
    weights = moe_weights(config, seed=5)
    hf = write_hf_checkpoint(tmp_path / "hf", config, weights)
    src = write_moe_gguf(tmp_path / "f32.gguf", config, weights)
    a = convert(hf, tmp_path / "hf-f32", dtype="float32", progress=False)
    b = convert(src, tmp_path / "gguf-f32", dtype="float32", progress=False)
    same_model_args(a, b)
    for file in ("ffn.bin", "resident.safetensors"):
        assert (a / file).read_bytes() == (b / file).read_bytes(), file
    got = load(b, backend="numpy")[0].logits(golden["tokens"].tolist())
    assert np.abs(got - golden["logits"]).max() <= 1e-4
    # Q4_0 into q4: the shared gate and up rows are their tensors' blocks
    config = moe_config("granitemoeshared", hidden_size=64, shared_intermediate_size=32)
    kind = gguf.GGMLQuantizationType.Q4_0
    src = write_moe_gguf(tmp_path / "q.gguf", config, moe_weights(config, 7), kind)
    layout = convert(src, tmp_path / "q4", dtype="q4", progress=False)
    lay = Layout.open(layout)
    tensors = {t.name: t for t in gguf.GGUFReader(src).tensors}
    weights = dict(lay.iter_resident(stored=True))
    for layer in range(config["num_hidden_layers"]):
        expected = np.concatenate(
            [
                gguf.quants.dequantize(tensors[f"blk.{layer}.{name}"].data, kind)
                for name in ("ffn_gate_shexp.weight", "ffn_up_shexp.weight")
            ]
        )
        joined = weights[f"layers.{layer}.shared_mlp.input_linear.weight"]
        got = rows_float32(joined, "q4", 0, expected.shape[0])
        assert np.array_equal(got.reshape(expected.shape), expected), layer
    dense, _ = load(layout, backend="numpy")
    flash, _ = load(layout, backend="numpy", memory_budget=least_budget(layout))
    expected = dense.logits(TOKENS, prefill=4)
    assert np.abs(flash.logits(TOKENS, prefill=4) - expected).max() <= 1e-5
