"""The low-rank predictor: training on a layer that a rank-4 map predicts exactly,
NumPy/MLX parity, the predictor file, thresholds and input errors."""

import importlib.util

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from fallback_numpy import backend as numpy_backend
from mlx_flashinfer.predictors.lowrank import (
    LowRankPredictor,
    load_predictor_arrays,
    save_predictor,
)
from mlx_flashinfer.predictors.lowrank_fit import train_layer

HAS_MLX = importlib.util.find_spec("mlx") is not None
needs_mlx = pytest.mark.skipif(
    not HAS_MLX, reason="mlx is not installed (pip install 'mlx-flashinfer[mlx]')"
)


def low_rank_layer(n_tokens=4000, d=32, n=96, seed=0):
    """Y = X @ G.T > 0 with G = U @ V of rank 4.

    X[:, 0] = 1 and V[0, 0] is a negative bias, so that about 10% of the neurons fire,
    as in a sparse FFN; with zero-mean X half of them would, and the "at most 3x the
    active neurons" bound below would hold for any predictor.
    """
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_tokens, d)).astype(np.float32)
    X[:, 0] = 1.0
    U = rng.standard_normal((n, 4))
    U[:, 0] = 1.0  # every neuron gets the bias of V[0, 0]
    V = rng.standard_normal((4, d))
    V[1:, 0] = 0.0
    spread = np.std(X[:, 1:] @ (U @ V)[:, 1:].T)
    V[0, 0] = -1.2816 * spread  # the normal distribution's 90% quantile
    return X, X @ (U @ V).T > 0


@pytest.fixture(scope="module")
def layer():
    return low_rank_layer()


@pytest.mark.parametrize(
    "use_mlx", [False, pytest.param(True, marks=needs_mlx)], ids=["numpy", "mlx"]
)
def test_training_reaches_the_recall_target_without_overpredicting(layer, use_mlx):
    X, Y = layer
    A, B, report = train_layer(X, Y, rank=8, use_mlx=use_mlx)
    assert A.shape == (8, 32) and B.shape == (96, 8)
    assert A.dtype == B.dtype == np.float32
    assert report["backend"] == ("mlx" if use_mlx else "numpy")
    assert report["recall"] >= 0.99
    assert 0.05 < report["true_fraction"] < 0.2
    assert report["predicted_fraction"] <= 3 * report["true_fraction"]
    assert 1 <= report["kept_epoch"] <= report["epochs"]


@needs_mlx
def test_numpy_and_mlx_training_agree(layer):
    X, Y = layer
    A, B, ours = train_layer(X[:1000], Y[:1000], rank=8, epochs=3, use_mlx=False)
    A2, B2, theirs = train_layer(X[:1000], Y[:1000], rank=8, epochs=3, use_mlx=True)
    # same initialisation, split, batches and AdamW arithmetic: float rounding only
    np.testing.assert_allclose(A2, A, atol=1e-3)
    np.testing.assert_allclose(B2, B, atol=1e-3)
    assert ours["epochs"] == theirs["epochs"]


def test_training_is_deterministic_given_the_seed(layer):
    X, Y = layer
    A, B, _ = train_layer(X[:800], Y[:800], rank=4, epochs=2, use_mlx=False)
    A2, B2, _ = train_layer(X[:800], Y[:800], rank=4, epochs=2, use_mlx=False)
    np.testing.assert_array_equal(A, A2)
    np.testing.assert_array_equal(B, B2)


def random_predictor_arrays(layers=2, d=24, n=40, rank=6, seed=0):
    rng = np.random.default_rng(seed)
    A_list = [rng.standard_normal((rank, d)).astype(np.float32) for _ in range(layers)]
    B_list = [rng.standard_normal((n, rank)).astype(np.float32) for _ in range(layers)]
    return A_list, B_list


@needs_mlx
def test_numpy_and_mlx_predict_the_same_set():
    from mlx_flashinfer.model import mlx_backend

    A_list, B_list = random_predictor_arrays()
    h = np.random.default_rng(1).standard_normal((7, 24)).astype(np.float32)
    for layer in range(2):
        ours = LowRankPredictor(numpy_backend, A_list, B_list, threshold=0.6)
        theirs = LowRankPredictor(mlx_backend, A_list, B_list, threshold=0.6)
        expected = ours.predict(layer, numpy_backend.array(h))
        got = theirs.predict(layer, mlx_backend.array(h))
        assert got.dtype == bool and got.shape == (7, 40)
        np.testing.assert_array_equal(got, expected)


def test_predictor_interface_and_sigmoid_equivalence():
    A_list, B_list = random_predictor_arrays()
    predictor = LowRankPredictor(numpy_backend, A_list, B_list, trained_threshold=0.7)
    assert predictor.name == "lowrank" and not predictor.exact
    assert predictor.threshold == 0.7  # None means the trained threshold
    assert predictor.nbytes == 2 * 4 * (6 * 24 + 40 * 6)
    h = np.random.default_rng(2).standard_normal((5, 24)).astype(np.float32)
    probabilities = 1 / (1 + np.exp(-(h @ A_list[1].T @ B_list[1].T)))
    np.testing.assert_array_equal(predictor.predict(1, h), probabilities > 0.7)


@settings(max_examples=50, deadline=None)
@given(
    low=st.floats(0.01, 0.99),
    high=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**16),
)
def test_a_higher_threshold_predicts_a_subset(low, high, seed):
    low, high = sorted((low, high))
    A_list, B_list = random_predictor_arrays(layers=1)
    h = np.random.default_rng(seed).standard_normal((4, 24)).astype(np.float32)
    loose = LowRankPredictor(numpy_backend, A_list, B_list, threshold=low)
    strict = LowRankPredictor(numpy_backend, A_list, B_list, threshold=high)
    assert not np.any(strict.predict(0, h) & ~loose.predict(0, h))


def test_save_load_round_trip(tmp_path):
    A_list, B_list = random_predictor_arrays(layers=3)
    path = tmp_path / "predictor.safetensors"
    save_predictor(path, A_list, B_list)
    assert not (tmp_path / "predictor.safetensors.tmp").exists()
    A_read, B_read = load_predictor_arrays(path)
    assert len(A_read) == len(B_read) == 3
    for ours, theirs in zip(A_list + B_list, A_read + B_read, strict=True):
        assert theirs.dtype == np.float32
        np.testing.assert_array_equal(theirs, ours)
    h = np.ones((1, 24), dtype=np.float32)
    loaded = LowRankPredictor.from_file(numpy_backend, path)
    direct = LowRankPredictor(numpy_backend, A_list, B_list)
    np.testing.assert_array_equal(loaded.predict(2, h), direct.predict(2, h))


def test_missing_or_foreign_tensors_name_the_file(tmp_path):
    A_list, B_list = random_predictor_arrays(layers=2)
    path = tmp_path / "predictor.safetensors"
    save_file(
        {"layers.0.A": A_list[0], "layers.0.B": B_list[0], "layers.1.A": A_list[1]},
        str(path),
    )
    with pytest.raises(
        ValueError, match=r"predictor\.safetensors: missing tensor layers\.1\.B"
    ):
        load_predictor_arrays(path)
    save_file(
        {"layers.0.A": A_list[0], "layers.0.B": B_list[0], "head": A_list[1]}, str(path)
    )
    with pytest.raises(ValueError, match="unexpected tensor 'head'"):
        load_predictor_arrays(path)
    with pytest.raises(FileNotFoundError):
        load_predictor_arrays(tmp_path / "absent.safetensors")


def test_bad_inputs_are_rejected(layer):
    X, Y = layer
    with pytest.raises(ValueError, match="rank 33 larger than d_model 32"):
        train_layer(X, Y, rank=33)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        train_layer(X, Y, rank=0)
    with pytest.raises(ValueError, match=r"need at least 80"):
        train_layer(X[:50], Y[:50], rank=4)
    with pytest.raises(ValueError, match=r"got \(4000, 32\) and \(3999, 96\)"):
        train_layer(X, Y[:-1], rank=4)
    A_list, B_list = random_predictor_arrays()
    with pytest.raises(ValueError, match="threshold must be between 0 and 1"):
        LowRankPredictor(numpy_backend, A_list, B_list, threshold=1.0)
    with pytest.raises(ValueError, match="layer 1 has A"):
        LowRankPredictor(numpy_backend, A_list, [B_list[0], B_list[1][:, :3]])
