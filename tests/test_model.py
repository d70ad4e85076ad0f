"""Dense inference on both backends: parity, KV cache, chunked prefill, the default
model."""

from pathlib import Path

import numpy as np
import pytest
from tiny_models import has_mlx, random_weights, tiny_model_configs, write_hf_checkpoint

import mlx_flashinfer
from mlx_flashinfer import convert, load
from mlx_flashinfer.model import transformer as model


@pytest.fixture(scope="module")
def tiny_layouts(tmp_path_factory) -> dict:
    """float32 layouts of every family and activation (plus OPT post-LN +
    projections)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, config in tiny_model_configs().items():
        src = write_hf_checkpoint(root / name, config, random_weights(config, seed=3))
        out[name] = convert(
            src, root / f"{name}-layout", dtype="float32", progress=False
        )
    return out


def need(backend: str) -> None:
    if backend == "mlx" and not has_mlx():
        pytest.skip("mlx is not installed (pip install 'mlx-flashinfer[mlx]')")


from tiny_models import TOKENS  # noqa: E402


@pytest.mark.parametrize("name", list(tiny_model_configs()))
def test_numpy_and_mlx_logits_agree(tiny_layouts, name):
    need("mlx")
    reference = load(tiny_layouts[name], backend="numpy")[0].logits(TOKENS)
    other = load(tiny_layouts[name], backend="mlx")[0].logits(TOKENS)
    assert reference.shape == (len(TOKENS), 40) and reference.dtype == np.float32
    assert np.abs(reference - other).max() <= 1e-4


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
@pytest.mark.parametrize(
    "name", ["llama-silu", "llama-relu2", "opt-relu", "opt-350m-like"]
)
def test_kv_cache_decode_equals_full_forward(tiny_layouts, backend, name):
    need(backend)
    m, _ = load(tiny_layouts[name], backend=backend)
    full = m.logits(TOKENS)
    cache = m.make_cache()
    # a prompt's logits are its last token's only: the head runs on no others
    rows = [m.backend.to_numpy(m.prefill(TOKENS[:3], cache))]
    assert rows[0].shape == (1, full.shape[1])
    for token in TOKENS[
        3:
    ]:  # one decode step per token; cache grows past its first step
        rows.append(m.backend.to_numpy(m([token], cache)))
    np.testing.assert_allclose(np.concatenate(rows), full[2:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_chunked_prefill_and_cache_growth(tiny_layouts, backend, monkeypatch):
    need(backend)
    m, _ = load(tiny_layouts["llama-relu"], backend=backend)
    tokens = (TOKENS * 5)[:50]
    whole = m.logits(tokens)
    monkeypatch.setattr(model, "PREFILL_CHUNK", 7)
    monkeypatch.setattr(model.KVCache, "step", 4)
    np.testing.assert_allclose(m.logits(tokens), whole, atol=1e-4, rtol=0)


# -- bad input ------------------------------------------------------------------------


def test_bad_input_is_refused_clearly(tiny_layouts):
    m, tok = load(tiny_layouts["llama-relu"], backend="numpy", max_context=16)
    with pytest.raises(ValueError, match="prompt is empty"):
        m.logits([])
    with pytest.raises(ValueError, match="token id 40 out of range"):
        m.logits([1, 40])
    with pytest.raises(
        ValueError,
        match="17 tokens exceed the context of 16 chosen for the KV cache; the model "
        "allows 64: raise --max-context",
    ):
        m.logits([1] * 17)
    full, _ = load(tiny_layouts["llama-relu"], backend="numpy")
    with pytest.raises(ValueError, match="65 tokens exceed the model's context of 64"):
        full.logits([1] * 65)
    for ids, says in [
        ("1 2", "not str"),
        (b"\x01\x02", "not bytes"),
        ([1, 2.0], "token id 2.0 is not an integer"),
        ([1, True], "token id True is not an integer"),
    ]:
        with pytest.raises(ValueError, match=says):
            m.logits(ids)
        if not isinstance(ids, str):  # text is a prompt
            with pytest.raises(ValueError, match="bytes|not an integer"):
                mlx_flashinfer.generate(m, tok, ids, max_tokens=2)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        load(tiny_layouts["llama-relu"], backend="cuda")
    for bad in (100, 0, -1, 2.5):
        with pytest.raises(ValueError, match=f"max_context {bad} out of range"):
            load(tiny_layouts["llama-relu"], max_context=bad)
    with pytest.raises(ValueError, match="memory budget must be positive"):
        load(tiny_layouts["llama-relu"], memory_budget=0)
    with pytest.raises(ValueError, match="prompt is empty"):
        mlx_flashinfer.generate(m, tok, "", max_tokens=2)


def test_missing_mlx_gives_the_pip_command(monkeypatch, tiny_layouts):
    import sys

    # None in sys.modules makes `import mlx.core` raise ImportError, as if not installed
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    monkeypatch.delitem(sys.modules, "mlx_flashinfer.model.mlx_backend", raising=False)
    monkeypatch.delattr(mlx_flashinfer.model, "mlx_backend", raising=False)
    with pytest.raises(ImportError, match=r'pip install "mlx-flashinfer\[mlx\]"'):
        load(tiny_layouts["llama-relu"], backend="mlx")


# -- the embedded default model -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_default_model_knows_paris(default_layout, backend):
    need(backend)
    m, tok = load(default_layout, backend=backend)
    ids = tok.encode("The capital of France is")
    assert ids == [504, 3575, 282, 4649, 314]
    assert mlx_flashinfer.generate(m, tok, ids, max_tokens=1) == " Paris"


@pytest.mark.slow
def test_default_model_greedy_tokens_identical_on_both_backends(default_layout):
    need("mlx")
    prompts = [
        "The capital of France is",
        "Alice was beginning to get very tired of sitting by her sister",
        "def fibonacci(n):",
    ]
    results = {}
    for backend in ("numpy", "mlx"):
        m, tok = load(default_layout, backend=backend)
        results[backend] = [
            [r.token for r in mlx_flashinfer.stream_generate(m, tok, p, max_tokens=32)]
            for p in prompts
        ]
        tokens_seen = sum(len(r) for r in results[backend])
        assert tokens_seen >= 3  # EOS may end one early; the others run long
    assert results["numpy"] == results["mlx"]


def test_golden_logits_from_transformers(tiny_layouts):
    """Logits of tiny checkpoints computed by Hugging Face transformers (float32, torch
    CPU) with tools/reference_logits.py, stored in tests/golden/: an independent
    implementation."""
    golden_dir = Path(__file__).parent / "golden"
    files = sorted(golden_dir.glob("*.npz"))
    if not files:
        pytest.skip("no golden files (make them with tools/make_golden.py)")
    for file in files:
        name = file.stem
        expected = np.load(file)
        m, _ = load(tiny_layouts[name], backend="numpy")
        got = m.logits(expected["tokens"].tolist())
        assert np.abs(got - expected["logits"]).max() <= 1e-4, name
