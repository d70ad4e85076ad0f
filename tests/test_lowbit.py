"""The low-bit predictor: 4-bit copies of gate and up that score each SiLU neuron's
contribution (lowbit.py), trained and used end to end."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny_models import (
    has_mlx,
    random_weights,
    tiny_config,
    write_gguf,
    write_hf_checkpoint,
)

import fallback_numpy.backend as numpy_backend
from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.cli import main
from mlx_flashinfer.flash.memory import format_bytes
from mlx_flashinfer.formats.model_cache import CACHE_ENV
from mlx_flashinfer.formats.quantize import dequantize, rows_float32
from mlx_flashinfer.loader import resolve_model
from mlx_flashinfer.predictors import lowbit
from mlx_flashinfer.predictors.kinds import predictor_nbytes
from mlx_flashinfer.predictors.report import (
    gate_comparison,
    gate_dominates,
    skipped_share,
)
from mlx_flashinfer.predictors.train import train_predictor

BACKENDS = ["numpy", "mlx"] if has_mlx() else ["numpy"]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    config = tiny_config("llama", "silu", hidden_size=64, intermediate_size=96)
    folder = tmp_path_factory.mktemp("lowbit")
    return write_hf_checkpoint(folder / "src", config, random_weights(config, seed=7))


@pytest.fixture(scope="module")
def layouts(source, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("layouts")
    return {
        dtype: convert(source, folder / dtype, dtype=dtype, progress=False)
        for dtype in ("float32", "float16", "q4")
    }


@pytest.fixture(scope="module")
def trained(layouts, tmp_path_factory) -> Path:
    layout = Path(
        shutil.copytree(layouts["float16"], tmp_path_factory.mktemp("t") / "l")
    )
    train_predictor(layout, tokens=600, progress=False)  # SiLU: lowbit by default
    return layout


def stored_float(layout: Layout, layer: int) -> list[np.ndarray]:
    parts = layout.read_parts(layer)
    return [rows_float32(p, layout.dtype, 0, p.shape[0]) for p in parts]


def test_rows_stored_at_4_bits_are_taken_unchanged(layouts):
    layout = Layout.open(layouts["q4"])
    parts = layout.read_parts(1)
    rows, norms = lowbit.layer_rows(parts, layout.dtype)
    gate, up, down = parts
    assert (rows.bits, rows.group_size) == (4, gate.group_size)
    for field in ("packed", "scales", "biases"):
        expected = np.concatenate([getattr(gate, field), getattr(up, field)])
        np.testing.assert_array_equal(getattr(rows, field), expected)
    down_rows = stored_float(layout, 1)[2]
    np.testing.assert_allclose(norms, np.linalg.norm(down_rows, axis=1), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_float_rows_are_quantized_within_half_a_step(layouts, dtype):
    layout = Layout.open(layouts[dtype])
    rows, norms = lowbit.layer_rows(layout.read_parts(0), layout.dtype)
    gate, up, down = stored_float(layout, 0)
    assert rows.shape == (2 * gate.shape[0], gate.shape[1]) and rows.group_size == 64
    values = dequantize(rows.packed, rows.scales, rows.biases, 4, 64)
    # half a step of each group, plus the float16 rounding of its scale and bias
    step = np.repeat(rows.scales.astype(np.float32), 64, axis=1)
    bound = 0.5 * step + 2e-3 * np.abs(np.concatenate([gate, up])) + 1e-6
    assert np.all(
        np.abs(values - np.concatenate([gate, up])) <= bound + 8 * step / 2**10
    )
    np.testing.assert_allclose(norms, np.linalg.norm(down, axis=1), rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_are_silu_gate_times_up_times_down_of_the_4_bit_rows(layouts, backend):
    layout = Layout.open(layouts["float32"])
    rows, norms = lowbit.layer_rows(layout.read_parts(0), layout.dtype)
    predictor = lowbit.LowBitPredictor(
        load(layouts["float32"], backend=backend)[0].backend, [rows], [norms], [None]
    )
    h = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    q = dequantize(rows.packed, rows.scales, rows.biases, 4, 64).astype(np.float64)
    y = h.astype(np.float64) @ q.T
    g, u = y[:, :96], y[:, 96:]
    expected = np.abs(g / (1 + np.exp(-g)) * u) * norms
    scores = predictor.scores(0, predictor.backend.array(h))
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5 * expected.max())
    assert predictor.predict(0, predictor.backend.array(h)).all()  # no cut: all


def test_4_bit_scores_rank_neurons_like_the_exact_contribution(layouts):
    """What the predictor exists for: per token, the half of the neurons it ranks
    highest is (nearly) the half that adds most to the FFN output."""
    layout = Layout.open(layouts["float32"])
    gate, up, down = stored_float(layout, 0)
    rows, norms = lowbit.layer_rows(layout.read_parts(0), layout.dtype)
    predictor = lowbit.LowBitPredictor(numpy_backend, [rows], [norms], [None])
    h = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    g, u = h @ gate.T, h @ up.T
    exact = np.abs(g / (1 + np.exp(-g)) * u) * norms
    scores = predictor.scores(0, h)

    def top(s):  # per token, the upper half
        return s >= np.median(s, axis=1, keepdims=True)

    overlap = (top(exact) & top(scores)).sum() / top(exact).sum()
    assert overlap > 0.85
    # and the contribution it keeps is almost all the oracle keeps
    assert (exact * top(scores)).sum() > 0.97 * (exact * top(exact)).sum()


def test_lowbit_is_trained_by_default_for_silu_and_counted_in_the_plan(trained):
    layout = Layout.open(trained)
    section = layout.manifest["predictor"]
    assert section["kind"] == "lowbit" and section["bits"] == 4
    assert section["group_size"] == 64 and section["recall_target"] == 0.99
    for report in section["report"]:
        assert report["recall"] >= 0.99 and report["bits"] == 4
    layout.verify()  # the predictor file is in the checksums
    assert section["nbytes"] == predictor_nbytes("lowbit", layout)
    for backend in BACKENDS:
        model, _ = load(trained, backend=backend, memory_budget="100%")
        assert model.ffn.predictor.name == "lowbit"  # the trained one by default
        assert model.held_bytes()["predictor"] == model.plan.predictor
        assert model.plan.predictor == section["nbytes"]
        assert model.ffn.predictor.cuts == section["cuts"]
        assert np.isfinite(model.logits([1, 5, 9, 3, 22], prefill=2)).all()


def test_both_backends_predict_the_same_neurons(trained):
    if not has_mlx():
        pytest.skip("mlx is not installed")
    h = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    masks, scores = {}, {}
    for backend in BACKENDS:
        model, _ = load(trained, backend=backend, memory_budget="100%")
        p, B = model.ffn.predictor, model.backend
        masks[backend] = p.predict(0, B.array(h))
        scores[backend] = p.scores(0, B.array(h))
    np.testing.assert_allclose(scores["mlx"], scores["numpy"], rtol=1e-4, atol=1e-5)
    near = np.isclose(scores["numpy"], model.ffn.predictor.cuts[0], rtol=1e-3)
    assert np.array_equal(masks["mlx"][~near], masks["numpy"][~near])


def test_a_loss_target_skips_more_for_a_looser_target(layouts, tmp_path):
    layout = Path(shutil.copytree(layouts["float16"], tmp_path / "l"))
    tight = train_predictor(layout, tokens=600, max_loss=0.02, progress=False)
    loose = train_predictor(layout, tokens=600, max_loss=0.3, progress=False)
    assert tight["kind"] == loose["kind"] == "lowbit"
    assert tight["quality"]["loss"] <= 0.02 or not tight["quality"]["met"]
    skipped = [
        sum(1 - r["predicted_fraction"] for r in s["report"]) for s in (tight, loose)
    ]
    assert skipped[1] >= skipped[0]


def test_asking_for_the_kind_not_trained_says_which_is(trained):
    with pytest.raises(ValueError, match="trained predictor is lowbit, not lowrank"):
        load(trained, memory_budget="100%", predictor="lowrank")
    assert (
        main(
            [
                "generate",
                "--model",
                str(trained),
                "--memory-budget",
                "100%",
                "--predictor",
                "lowrank",
                "--prompt",
                "hi",
            ]
        )
        == 2
    )


def test_bad_lowbit_requests_exit_2_with_one_line(trained, tmp_path, capsys):
    argv = ["train-predictor", str(trained), "--kind", "lowbit", "--rank", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--rank" in err and len(err.splitlines()) == 1
    config = tiny_config("opt", hidden_size=32, ffn_dim=64, word_embed_proj_dim=32)
    src = write_hf_checkpoint(tmp_path / "opt", config, random_weights(config))
    opt = convert(src, tmp_path / "opt-layout", dtype="float32", progress=False)
    assert main(["train-predictor", str(opt), "--kind", "lowbit"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "for SiLU and GeGLU models, this one is relu" in err
        and len(err.splitlines()) == 1
    )
    assert Layout.open(opt).manifest["predictor"] is None  # nothing written


def test_generate_says_what_the_low_bit_predictor_skips_and_costs(trained, capsys):
    section = Layout.open(trained).manifest["predictor"]
    skipped = 1 - np.mean([r["predicted_fraction"] for r in section["report"]])
    argv = ["generate", "--model", str(trained), "--memory-budget", "100%"]
    assert main([*argv, "--prompt", "alice", "--max-tokens", "2"]) == 0
    captured = capsys.readouterr()
    (line,) = [
        x for x in (captured.out + captured.err).splitlines() if "sparse FFN" in x
    ]
    assert f"low-bit predictor skips {skipped:.0%} of neurons per token" in line
    measured = section["quality"]
    assert f"calibrated on 5 domains, worst {measured['loss']:+.1%}" in line


@pytest.mark.parametrize("dtype", ["float16", "q4"])
def test_calibration_counts_the_predictor_it_makes(layouts, dtype, tmp_path):
    layout = Layout.open(layouts[dtype])
    rows = [lowbit.layer_rows(layout.read_parts(i), layout.dtype) for i in range(2)]
    held = sum(q.nbytes + norms.nbytes for q, norms in rows)
    assert lowbit.predictor_bytes(layout) == held
    copy = Path(shutil.copytree(layouts[dtype], tmp_path / "l"))
    with pytest.raises(ValueError, match="the predictor\\): more than the budget"):
        train_predictor(copy, tokens=600, memory_budget="1KB", progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_every_neuron_kept_the_flash_path_equals_dense(trained, backend):
    """The plumbing from the low-bit scores to the FFN: with no cut, every neuron is
    read and computed, and the flash logits are the dense ones; with the trained
    cuts fewer neurons are read and the logits move, but not far."""
    ids = [1, 5, 9, 3, 22, 17, 4, 30]
    dense = load(trained, backend=backend)[0].logits(ids, prefill=2)
    model, _ = load(trained, backend=backend, memory_budget="100%", window=0)
    cuts = list(model.ffn.predictor.cuts)
    model.ffn.predictor.cuts = [-np.inf] * len(cuts)
    scale = np.abs(dense).max()
    tol = 1e-4 if backend == "numpy" else 5e-2  # MLX: float16 products
    assert np.abs(model.logits(ids, prefill=2) - dense).max() <= tol * scale
    everything = model.io_stats()["decode"]["neurons_predicted"]
    model.ffn.predictor.cuts = cuts
    sparse = model.logits(ids, prefill=2)
    assert model.io_stats()["decode"]["neurons_predicted"] - everything < everything
    assert np.abs(sparse - dense).max() < 0.5 * scale


def test_the_embedded_model_comes_with_its_predictor(tmp_path, monkeypatch, capsys):
    """First use of the default model converts it into the cache and makes its
    predictor (a SiLU model: low-bit), so flash mode is calibrated from the start;
    a training that fails leaves the converted layout and says how to retry."""
    config = tiny_config(
        "llama", "silu", hidden_size=64, intermediate_size=96, vocab_size=300
    )
    gguf = write_gguf(tmp_path / "tiny.gguf", config, random_weights(config))
    monkeypatch.setattr(
        "mlx_flashinfer.formats.default_model.default_gguf_path", lambda: gguf
    )
    layout = Layout.open(
        resolve_model(None, cache_dir=tmp_path / "cache", progress=False)
    )
    assert layout.manifest["predictor"]["kind"] == "lowbit"
    assert layout.manifest["predictor"]["recall_target"] == 0.99
    layout.verify()
    # "default" names that layout to train-predictor too
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert main(["train-predictor", "default", "--max-loss", "5%"]) == 0
    retrained = Layout.open(layout.path).manifest["predictor"]
    assert retrained["quality"]["max_loss"] == 0.05

    def fail(*args, **kwargs):
        raise MemoryError("out of memory")

    monkeypatch.setattr("mlx_flashinfer.predictors.train.train_predictor", fail)
    layout = Layout.open(
        resolve_model(None, cache_dir=tmp_path / "other", progress=False)
    )
    assert layout.manifest["predictor"] is None
    err = capsys.readouterr().err
    assert "no predictor made (out of memory)" in err and "train-predictor" in err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # a first run cut during training (Ctrl-C): the next run makes the predictor
    monkeypatch.setattr("mlx_flashinfer.predictors.train.train_predictor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(None, cache_dir=tmp_path / "cut", progress=False)
    cut = Layout.open(next((tmp_path / "cut").glob("*/manifest.json")).parent)
    assert cut.manifest["predictor"] is None
    monkeypatch.undo()
    monkeypatch.setattr(
        "mlx_flashinfer.formats.default_model.default_gguf_path", lambda: gguf
    )
    layout = Layout.open(
        resolve_model(None, cache_dir=tmp_path / "cut", progress=False)
    )
    assert layout.manifest["predictor"]["kind"] == "lowbit"
    # a layout or a checkpoint the user names is converted as it is, no predictor
    src = write_gguf(tmp_path / "named.gguf", config, random_weights(config))
    named = Layout.open(
        resolve_model(src, cache_dir=tmp_path / "cache", progress=False)
    )
    assert named.manifest["predictor"] is None


def test_retraining_leaves_one_predictor_file_listed_and_present(layouts, tmp_path):
    layout_dir = Path(shutil.copytree(layouts["float16"], tmp_path / "l"))
    train_predictor(layout_dir, tokens=600, progress=False)
    train_predictor(layout_dir, tokens=600, kind="lowrank", rank=4, progress=False)
    # a section cleared by hand, its file still listed: the next run tidies both
    Layout.open(layout_dir).update_manifest({"predictor": None})
    train_predictor(layout_dir, tokens=600, progress=False)
    layout = Layout.open(layout_dir)
    listed = [f for f in layout.manifest["files"] if f.startswith("predictor-")]
    on_disk = [p.name for p in layout_dir.glob("predictor-*")]
    assert listed == on_disk == [layout.manifest["predictor"]["file"]]
    layout.verify()


# -- against the gate predictor (flash mode's without a trained one) -------------------


def test_a_predictor_the_gate_predictor_beats_on_both_counts_is_not_stored(
    layouts, tmp_path, capsys
):
    """A q4 layout's low-bit predictor copies its 4-bit gate and up rows: twice the
    gate predictor's DRAM, and it predicts more neurons than the gate's half: flash
    mode reads more with it at any budget. It is measured, refused (the layout
    left as it was), and stored only with --force."""
    layout = Path(shutil.copytree(layouts["q4"], tmp_path / "q4"))
    before = {p.name: p.read_bytes() for p in layout.iterdir()}
    forced = Path(shutil.copytree(layouts["q4"], tmp_path / "forced"))
    section = train_predictor(forced, tokens=600, progress=False, force=True)
    gate, predicted = section["gate"], 1 - skipped_share(section)
    assert gate["nbytes"] == predictor_nbytes("gate", Layout.open(forced))
    assert section["nbytes"] > gate["nbytes"] and predicted > gate["predicted_fraction"]
    assert gate_dominates(section)
    with pytest.raises(ValueError, match="is not stored"):
        train_predictor(layout, tokens=600, progress=False)
    assert {p.name: p.read_bytes() for p in layout.iterdir()} == before
    assert main(["train-predictor", str(layout), "--tokens", "600"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force stores it" in err
    assert f"predicts {predicted:.1%} of neurons per token" in err
    assert f"the gate predictor {gate['predicted_fraction']:.1%}" in err
    assert {p.name: p.read_bytes() for p in layout.iterdir()} == before
    assert main(["train-predictor", str(layout), "--tokens", "600", "--force"]) == 0
    assert Layout.open(layout).manifest["predictor"]["kind"] == "lowbit"


def test_the_gate_predictor_is_measured_on_the_same_tokens(trained, capsys):
    """The float16 layout's low-bit predictor holds less than the gate rows: stored,
    with the comparison printed. The gate predictor's share is its calibrated cut
    (half the neurons); its loss is measured over the same tokens."""
    section = Layout.open(trained).manifest["predictor"]
    gate = section["gate"]
    assert not gate_dominates(section) and section["nbytes"] < gate["nbytes"]
    neurons = Layout.open(trained).args.intermediate_size
    assert abs(gate["predicted_fraction"] - 0.5) <= 1 / neurons
    # measured on the same domains' tokens (which loses more varies with the
    # random model at 120 calibration tokens per domain: not asserted)
    assert gate["worst"] in section["quality"]["domains"]
    assert np.isfinite([gate["loss"], gate["pooled_loss"]]).all()
    line = gate_comparison(section)
    assert f"(gate {gate['predicted_fraction']:.1%})" in line
    assert f"(gate {format_bytes(gate['nbytes'])})" in line


def test_a_relu_models_gate_predictor_is_exact(tmp_path):
    config = tiny_config("llama", "relu", hidden_size=64, intermediate_size=96)
    src = write_hf_checkpoint(tmp_path / "src", config, random_weights(config))
    layout = convert(src, tmp_path / "relu", dtype="float32", progress=False)
    section = train_predictor(layout, tokens=600, rank=8, progress=False)
    true_fraction = np.mean([r["true_fraction"] for r in section["report"]])
    assert section["gate"]["loss"] == 0.0
    assert section["gate"]["predicted_fraction"] == pytest.approx(true_fraction)
    assert "(gate exact)" in gate_comparison(section)
