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
