"""Training the low-rank predictor of a layout, end to end, and using it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import WORDS, has_mlx, random_weights, tiny_config, write_hf_checkpoint

from mlx_flashinfer import Layout, convert, load
from mlx_flashinfer.cli import main
from mlx_flashinfer.model.transformer import silu_magnitude
from mlx_flashinfer.predictors import texts
from mlx_flashinfer.predictors import train as training
from mlx_flashinfer.predictors.streams import Calibration
from mlx_flashinfer.predictors.train import train_predictor


def predictable_opt(folder: Path) -> Path:
    """A ReLU (OPT) model whose FFN activations are a low-rank function of the FFN
    input: fc1 = U V of rank 3 plus a bias, and a constant LayerNorm bias that gives
    the (bias-free) predictor a constant feature. About 12-26% of neurons fire."""
    config = tiny_config("opt", hidden_size=32, ffn_dim=128, word_embed_proj_dim=32)
    weights = random_weights(config, seed=1)
    rng = np.random.default_rng(5)
    for i in range(config["num_hidden_layers"]):
        p = f"model.decoder.layers.{i}."
        low_rank = rng.standard_normal((128, 3)) @ rng.standard_normal((3, 32))
        weights[p + "fc1.weight"] = (low_rank / np.sqrt(3)).astype(np.float32)
        weights[p + "fc1.bias"] = np.full(128, -4.5, np.float32)
        weights[p + "final_layer_norm.bias"] = np.full(32, 0.3, np.float32)
    src = write_hf_checkpoint(folder / "src", config, weights)
    return convert(src, folder / "layout", dtype="float32", progress=False)


def calibration_text(words: int, seed: int = 0) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, words))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    layout = predictable_opt(tmp_path_factory.mktemp("lowrank"))
    train_predictor(
        layout, texts=[calibration_text(4000)], tokens=4000, rank=8, progress=False
    )
    return layout


def test_trained_predictor_reaches_recall_099_within_3x(trained):
    section = Layout.open(trained).manifest["predictor"]
    assert section["kind"] == "lowrank" and section["tokens"] == 4000
    for layer in section["report"]:
        assert layer["recall"] >= 0.99
        assert layer["predicted_fraction"] <= 3 * layer["true_fraction"]
        assert 0.05 < layer["true_fraction"] < 0.5  # sparse, not trivially so
    Layout.open(trained).verify()  # the predictor file is in the checksums


def test_same_predictions_on_both_backends_and_threshold_trades_bytes(trained):
    if not has_mlx():
        pytest.skip("mlx is not installed")
    h = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    masks = {}
    for backend in ("numpy", "mlx"):
        model, _ = load(
            trained, backend=backend, memory_budget=10**8, predictor="lowrank"
        )
        B = model.backend
        masks[backend] = [model.ffn.predictor.predict(i, B.array(h)) for i in range(2)]
    for a, b in zip(masks["numpy"], masks["mlx"], strict=True):
        np.testing.assert_array_equal(a, b)
    strict, _ = load(trained, memory_budget=10**8, predictor_threshold=0.9)
    loose, _ = load(trained, memory_budget=10**8, predictor_threshold=0.1)
    hb = strict.backend.array(h)
    fewer = strict.ffn.predictor.predict(0, hb)
    more = loose.ffn.predictor.predict(0, hb)
    assert np.all(more[fewer]) and more.sum() > fewer.sum()


def test_lowrank_is_the_default_once_trained_and_runs(trained):
    model, tok = load(trained, memory_budget=10**8)
    assert model.ffn.predictor.name == "lowrank"
    logits = model.logits([1, 5, 9, 3, 22, 17], prefill=2)
    dense, _ = load(trained)
    # approximate (recall 0.99), but close to dense on this predictable model
    assert np.abs(logits - dense.logits([1, 5, 9, 3, 22, 17], prefill=2)).max() < 0.5


def test_lowrank_without_a_trained_predictor_says_how_to_train_one(tmp_path):
    layout = predictable_opt(tmp_path)
    with pytest.raises(ValueError, match="flashinfer train-predictor"):
        load(layout, memory_budget="100%", predictor="lowrank")


def test_bad_training_input(tmp_path):
    layout = predictable_opt(tmp_path)
    with pytest.raises(ValueError, match="too short to train on"):
        train_predictor(layout, texts=["the cat"], rank=8, progress=False)
    with pytest.raises(ValueError, match="rank 33 out of range: 1..32"):
        train_predictor(layout, texts=[calibration_text(500)], rank=33, progress=False)
    with pytest.raises(SystemExit) as refused:  # argparse's refusal, one line
        main(["train-predictor", str(layout), "--rank", "0"])
    assert refused.value.code == 2
    # calibration holds the resident weights, one FFN layer and the activations
    with pytest.raises(ValueError, match=r"holds .* more than the budget of 1.0 KB"):
        train_predictor(layout, memory_budget="1KB", rank=8, progress=False)
    assert main(["train-predictor", str(layout), "--memory-budget", "1KB"]) == 2


@pytest.mark.parametrize("where", ["training", "manifest"])
def test_interrupted_training_leaves_the_layout_as_it_was(tmp_path, monkeypatch, where):
    layout = predictable_opt(tmp_path)
    before = {p.name: p.read_bytes() for p in layout.iterdir()}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "training":
        monkeypatch.setattr(training, "train_layer", interrupt)
    else:
        monkeypatch.setattr(Layout, "update_manifest", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_predictor(
            layout, texts=[calibration_text(500)], tokens=500, rank=8, progress=False
        )
    after = {p.name: p.read_bytes() for p in layout.iterdir()}
    assert after == before
    assert json.loads(after["manifest.json"])["predictor"] is None


@pytest.fixture(scope="module")
def silu_layout(tmp_path_factory) -> Path:
    config = tiny_config("llama", "silu", hidden_size=32, intermediate_size=64)
    folder = tmp_path_factory.mktemp("silu")
    src = write_hf_checkpoint(folder / "src", config, random_weights(config, seed=3))
    return convert(src, folder / "layout", dtype="float32", progress=False)


def test_default_calibration_is_the_shipped_text_and_cuts_keep_the_recall(
    silu_layout, tmp_path
):
    layout = Path(shutil.copytree(silu_layout, tmp_path / "layout"))
    section = train_predictor(
        layout, tokens=600, kind="lowrank", rank=8, recall=0.9, progress=False
    )
    assert section["source"] == "shipped corpus"
    assert section["tokens"] == 600 and 0 < section["tune_tokens"] < 600
    assert len(section["cuts"]) == 2 and section["recall_target"] == 0.9
    for layer in section["report"]:  # on the tune split, which chose the cut
        assert layer["recall"] >= 0.9 and 0 < layer["predicted_fraction"] <= 1
    measured = section["quality"]
    assert measured["dense_perplexity"] > 1 and measured["tokens"] > 0
    assert measured["pooled_loss"] == pytest.approx(
        measured["perplexity"] / measured["dense_perplexity"] - 1
    )
    # each shipped domain measured on its own; the promise is the worst one's
    domains = measured["domains"]
    assert list(domains) == list(texts.DOMAINS)
    for d in domains.values():
        assert d["loss"] == pytest.approx(d["perplexity"] / d["dense_perplexity"] - 1)
    assert measured["loss"] == max(d["loss"] for d in domains.values())
    assert measured["loss"] == domains[measured["worst"]]["loss"]
    assert sum(d["tokens"] for d in domains.values()) == measured["tokens"]
    # the flash model predicts with the stored cuts
    model, _ = load(layout, memory_budget="100%", predictor="lowrank")
    assert model.ffn.predictor.cuts == section["cuts"]


def test_a_loss_target_is_met_on_calibration_text(silu_layout, tmp_path):
    layout = Path(shutil.copytree(silu_layout, tmp_path / "layout"))
    section = train_predictor(
        layout, tokens=600, kind="lowrank", rank=8, max_loss=0.05, progress=False
    )
    measured = section["quality"]
    assert measured["met"] and measured["loss"] <= 0.05
    assert measured["max_loss"] == 0.05 and section["recall_target"] is None
    skipped = [1 - r["predicted_fraction"] for r in section["report"]]
    assert any(s > 0 for s in skipped)  # it did skip something
    looser = train_predictor(
        layout, tokens=600, kind="lowrank", rank=8, max_loss=0.5, progress=False
    )
    assert sum(1 - r["predicted_fraction"] for r in looser["report"]) >= sum(skipped)


def test_a_loss_target_that_cannot_be_met_says_so(
    silu_layout, tmp_path, capsys, monkeypatch
):
    """On this random model skipping neurons can even lower perplexity; here each
    layer that skips anything costs 0.1 nats per token more than measured, so
    a 0.5% target cannot be met: the best reached is stored and said to be short."""
    layout = Path(shutil.copytree(silu_layout, tmp_path / "layout"))
    measured_pass = Calibration._sparse_pass

    def costlier(self, weights, cuts):
        skipping = sum(cut is not None for cut in cuts)
        nll = measured_pass(self, weights, cuts)
        return {d: v + 0.1 * self.scored[d] * skipping for d, v in nll.items()}

    monkeypatch.setattr(Calibration, "_sparse_pass", costlier)
    argv = ["train-predictor", str(layout), "--tokens", "600", "--rank", "8"]
    assert main([*argv, "--max-loss", "0.5%"]) == 0
    assert "--max-loss 0.50%: NOT met" in capsys.readouterr().out
    section = Layout.open(layout).manifest["predictor"]
    measured = section["quality"]
    assert not measured["met"] and measured["loss"] > 0.005
    assert sum(cut is not None for cut in section["cuts"]) == 1  # the first step


@pytest.mark.parametrize("value", ["0", "0%", "-3%", "abc", "3%%", "nan", "inf"])
def test_bad_max_loss_values_exit_2_with_one_line(silu_layout, value, capsys):
    assert main(["train-predictor", str(silu_layout), f"--max-loss={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--max-loss" in err and len(err.splitlines()) == 1


@settings(max_examples=50, deadline=None)
@given(
    tokens=st.integers(1, 6),
    neurons=st.integers(2, 64),
    sparsity=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**32 - 1),
)
def test_silu_targets_are_the_neurons_that_add_most(tokens, neurons, sparsity, seed):
    """SiLU training targets: per token, the neurons with the largest
    |silu(gate) x up|, about 1 - sparsity of them; a neuron with a large gate but
    a zero up never is one (the gate-only CATS score would keep it)."""
    rng = np.random.default_rng(seed)
    gate = rng.normal(size=(tokens, neurons)).astype(np.float32) * 3
    up = rng.normal(size=(tokens, neurons)).astype(np.float32)
    up[:, 0], gate[:, 0] = 0.0, 10.0
    mask = training.contribution_mask(gate, up, sparsity)
    score = silu_magnitude(gate) * np.abs(up)
    assert not mask[:, 0].any()
    for t in range(tokens):
        kept, dropped = score[t, mask[t]], score[t, ~mask[t]]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()
        assert abs(mask[t].sum() - (1 - sparsity) * neurons) <= 1.5
