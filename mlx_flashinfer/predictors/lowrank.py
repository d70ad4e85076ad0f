"""The trained low-rank activation predictor of the paper (section 3.1, "Predictor").

Per layer, two bias-free linear maps d_model -> rank -> n_ffn and a sigmoid:
p = sigmoid(B (A h)), neuron i predicted active when p_i > threshold, or, once
training has tuned a cut per layer on tokens it did not train on, when
(B (A h))_i > cut (`lowrank_fit.py` trains A and B and tunes the cuts). A and B
stay in DRAM: a rank-r predictor costs r * (d_model + n_ffn) floats per layer
instead of the gate's n_ffn * d_model.

- `LowRankPredictor`: the predictor interface of `kinds.py` over trained A, B.
- `predictor_tensors`, `save_predictor` / `load_predictor_arrays`: the file
  (`layers.{i}.A` (rank, d_model), `layers.{i}.B` (n_ffn, rank), float32).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ..formats.safetensors_stream import STORAGE, encode
from ..model.nonfinite import check_weights

_TENSOR_NAME = re.compile(r"layers\.(\d+)\.(A|B)")


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def check_probability(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {value}")


class LowRankPredictor:
    """The trained low-rank predictor of every layer, held in DRAM as backend arrays.

    A neuron is predicted active when B (A h) > cut, the layer's logit cut: the
    same set as sigmoid(B (A h)) > threshold for cut = logit(threshold), without
    computing the sigmoid. Cuts are per layer when training tuned them (to a recall
    target or a quality target), else one threshold for all.
    """

    name = "lowrank"
    exact = False

    def __init__(
        self,
        backend,
        A_list: list[np.ndarray],
        B_list: list[np.ndarray],
        threshold: float | None = None,
        trained_threshold: float = 0.5,
        dtype: str = "float32",
        cuts: list[float | None] | None = None,
    ):
        """Args:
            backend: a Backend API module (`fallback_numpy.backend`, `mlx_backend`).
            A_list, B_list: per layer A (rank, d_model) and B (n_ffn, rank).
            threshold: one probability cut for every layer, overriding `cuts`; None
                means `cuts` when given, else `trained_threshold`.
            trained_threshold: the cut used in training (from the manifest's report).
            dtype: held as this layout dtype, like the model's weights (trained and
                stored as float32).
            cuts: per layer logit cut as tuned in training (None in the list: that
                layer reads every neuron).

        Raises:
            ValueError: a threshold outside (0, 1), cuts not one per layer, or A/B
                shapes that do not chain.
        """
        _check_shapes(A_list, B_list, "predictor")
        if threshold is not None or cuts is None:
            threshold = trained_threshold if threshold is None else threshold
            check_probability("threshold", threshold)
            cuts = [logit(threshold)] * len(A_list)
        elif len(cuts) != len(A_list):
            raise ValueError(f"predictor: {len(cuts)} cuts for {len(A_list)} layers")
        self.backend = backend
        self.threshold = threshold  # None: per-layer cuts
        self.cuts = [-math.inf if c is None else float(c) for c in cuts]
        self.A = [backend.weight(_stored(a, dtype)) for a in A_list]
        self.B = [backend.weight(_stored(b, dtype)) for b in B_list]
        self.nbytes = sum(int(m.nbytes) for m in self.A + self.B)

    @classmethod
    def from_file(
        cls,
        backend,
        path: Path,
        threshold: float | None = None,
        trained_threshold: float = 0.5,
        dtype: str = "float32",
        cuts: list[float | None] | None = None,
    ) -> LowRankPredictor:
        """Load `predictor.safetensors` (see `load_predictor_arrays`)."""
        A_list, B_list = load_predictor_arrays(path, dtype)
        return cls(backend, A_list, B_list, threshold, trained_threshold, dtype, cuts)

    def logits(self, layer: int, h) -> np.ndarray:
        """B (A h) as float32 NumPy (T, n_ffn) for h (T, d_model)."""
        be = self.backend
        return be.to_numpy(be.linear(be.linear(h, self.A[layer]), self.B[layer]))

    def predict(self, layer: int, h) -> np.ndarray:
        """Bool (T, n_ffn) mask of the neurons predicted to fire for h (T, d_model)."""
        return self.logits(layer, h) > self.cuts[layer]


def _stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in `dtype`'s storage form; values already in it as they are."""
    return values if values.dtype == STORAGE[dtype] else encode(values, dtype)


def _check_shapes(A_list, B_list, where) -> None:
    if len(A_list) != len(B_list):
        raise ValueError(f"{where}: {len(A_list)} A matrices but {len(B_list)} B")
    for i, (a, b) in enumerate(zip(A_list, B_list, strict=True)):
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"{where}: layer {i} has A {a.shape} and B {b.shape}; "
                "expected A (rank, d_model) and B (n_ffn, rank)"
            )


def predictor_tensors(
    A_list: list[np.ndarray], B_list: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """The tensors of a predictor file: `layers.{i}.A` and `layers.{i}.B` (float32).

    Raises:
        ValueError: lists of different lengths or shapes that do not chain.
    """
    _check_shapes(A_list, B_list, "predictor")
    tensors = {}
    for i, (a, b) in enumerate(zip(A_list, B_list, strict=True)):
        tensors[f"layers.{i}.A"] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[f"layers.{i}.B"] = np.ascontiguousarray(b, dtype=np.float32)
    return tensors


def held_bytes(A_list, B_list, dtype: str) -> int:
    """DRAM a predictor of these matrices holds at layout dtype `dtype` (it is held
    as the model's weights are)."""
    values = sum(a.size + b.size for a, b in zip(A_list, B_list, strict=True))
    return values * np.dtype(STORAGE[dtype]).itemsize


def save_predictor(
    path: Path, A_list: list[np.ndarray], B_list: list[np.ndarray]
) -> None:
    """Write `predictor_tensors` as safetensors, atomically.

    Raises:
        ValueError: lists of different lengths or shapes that do not chain.
    """
    path = Path(path)
    tensors = predictor_tensors(A_list, B_list)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_predictor_arrays(
    path: Path, dtype: str = "float32"
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Read a file written by `save_predictor`, one tensor at a time.

    Args:
        path: the predictor file.
        dtype: return the tensors in the storage form of this layout dtype (each is
            converted as it is read, so the float32 file is never in memory whole:
            OPT-6.7B's is 422 MB).

    Returns:
        (A_list, B_list), one per layer: float32 NumPy, or `dtype`'s storage form.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing or unexpected tensor, a non-float32 or non-finite
            tensor, or shapes that do not chain; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictor file")
    tensors = {}
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            match = _TENSOR_NAME.fullmatch(key)
            if match is None:
                raise ValueError(
                    f"{path}: unexpected tensor {key!r} in a predictor file"
                )
            value = f.get_tensor(key)
            if value.dtype != np.float32:
                raise ValueError(f"{path}: {key} is {value.dtype}, expected float32")
            check_weights(value, f"{path}: {key}")
            tensors[key] = encode(value, dtype)
    layers = {int(_TENSOR_NAME.fullmatch(key).group(1)) for key in tensors}
    if not layers:
        raise ValueError(f"{path}: no predictor tensors (layers.0.A missing)")
    for i in range(max(layers) + 1):
        for part in ("A", "B"):
            if f"layers.{i}.{part}" not in tensors:
                raise ValueError(f"{path}: missing tensor layers.{i}.{part}")
    count = max(layers) + 1
    A_list = [tensors[f"layers.{i}.A"] for i in range(count)]
    B_list = [tensors[f"layers.{i}.B"] for i in range(count)]
    _check_shapes(A_list, B_list, str(path))
    return A_list, B_list
