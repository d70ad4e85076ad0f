"""The low-bit predictor: 4-bit copies of every layer's gate and up rows in DRAM.

For SiLU-gated models (Llama family; GeGLU ones, Gemma, alike with gelu_tanh in
place of silu). Neuron i of a layer adds silu(gate_i . h) x (up_i . h) x down_i to
the FFN output; the predictor estimates that contribution's size from 4-bit gate
and up rows,

    score_i = |silu(g_i) x u_i| x |down_i|,   (g; u) = Q h,

and keeps the neurons whose score is above the layer's cut (tuned by
`train-predictor` on calibration text, as for the low-rank predictor). The rows come
from the model itself: nothing is trained, and a layout whose gate and up are
stored at 4 bits lends them unchanged (its scores are exact).

Why not the low-rank predictor for these models: measured on the default model
(SmolLM2-135M), 2040 held-out tokens, each layer keeping per token the half of its
neurons with the highest score, perplexity against dense
(`benchmarks/predictor_ranking.py`): this predictor +2.0% (+2.8% with one cut per
layer); 3-bit copies +5.7%, 2-bit +25%; the trained rank-64 low-rank predictor
+153%, reduced-rank regressions of gate and up (rank 64 / 128) +92% / +36%; the gate
alone (|silu(g)|, CATS) +32%; the oracle (exact scores) +2.4%. Skipping neurons of a
SiLU model costs quality in proportion to what is skipped, so the ranking must see up
as well as gate, and a rank of 64 out of 576 does not. The price is memory: 4.5 bits
per gate and up weight (groups of 64), about 19% of a float16 FFN.

- `layer_rows`: one layer's stacked 4-bit gate and up rows and down column lengths;
  `predictor_bytes`: what all layers' hold.
- `LowBitPredictor`: the predictor interface of `kinds.py`.
- `predictor_tensors` / `load_predictor_arrays`: its `predictor-*.safetensors` file
  (`layers.{i}.weight` uint32, `.scales`, `.biases` float16, `.down_norms` float32).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from safetensors import safe_open

from ..formats.quantize import Quantized, quantize, row_bytes, row_norms, rows_float32
from ..model.nonfinite import check_weights
from ..model.transformer import gate_magnitude

BITS = 4
GROUP_SIZES = (64, 32)  # the first dividing d_model
_TENSOR_NAME = re.compile(r"layers\.(\d+)\.(weight|scales|biases|down_norms)")
_FIELDS = ("weight", "scales", "biases")


def group_size_for(d_model: int) -> int:
    """The group size of the copies for rows of length d_model.

    Raises:
        ValueError: d_model is not a multiple of 32.
    """
    for size in GROUP_SIZES:
        if d_model % size == 0:
            return size
    raise ValueError(
        f"the low-bit predictor needs d_model divisible by 32, got {d_model}: "
        "train a low-rank one (--kind lowrank)"
    )


def predictor_bytes(layout) -> int:
    """The bytes a low-bit predictor of `layout` holds (as `layer_rows` makes it)."""
    args = layout.args
    n, d = args.intermediate_size, args.hidden_size
    if (layout.part_bits or [])[:2] == [BITS, BITS]:  # taken as stored
        group = layout.quantization["group_size"]
    else:
        group = group_size_for(d)
    row = row_bytes(d, BITS, group)
    return args.num_hidden_layers * n * (2 * row + 4)  # gate, up; a float32 norm


def layer_rows(parts: list, dtype: str) -> tuple[Quantized, np.ndarray]:
    """A layer's gate rows stacked over its up rows at 4 bits, (2 n, d) as a NumPy
    `Quantized`, and its down columns' lengths (n,) float32, from its FFN parts as
    stored (`Layout.read_parts`; `dtype`: the layout's). Rows stored at 4 bits are
    taken as they are; others are quantized from their float32 values.

    Raises:
        ValueError: an OPT-family layer (no up branch to score), or a d_model no
            group size divides.
    """
    if len(parts) < 3:
        raise ValueError(
            "the low-bit predictor scores gate and up; this model has no up branch: "
            "train a low-rank one (--kind lowrank)"
        )
    gate, up, down = parts
    if (
        all(isinstance(p, Quantized) and p.bits == BITS for p in (gate, up))
        and gate.group_size == up.group_size
    ):
        fields = [np.concatenate([a, b]) for a, b in zip(_q(gate), _q(up), strict=True)]
        rows = Quantized(*fields, BITS, gate.group_size)
    else:
        n, d = gate.shape
        group = group_size_for(d)
        blocks = [  # quantized 1024 rows at a time: no float32 copy of a whole part
            quantize(rows_float32(p, dtype, lo, lo + 1024), BITS, group)
            for p in (gate, up)
            for lo in range(0, n, 1024)
        ]
        fields = [np.concatenate([b[i] for b in blocks]) for i in range(3)]
        rows = Quantized(*fields, BITS, group)
    return rows, row_norms(down, dtype)


def _q(part: Quantized) -> tuple:
    return part.packed, part.scales, part.biases


def contribution_scores(
    y: np.ndarray, down_norms: np.ndarray, act: str = "silu"
) -> np.ndarray:
    """|act(g) x u| x |down| from y = (g | u), (T, 2 n) -> (T, n) float32; `act` the
    model's gate activation (silu, or Gemma's gelu_tanh)."""
    n = down_norms.shape[0]
    return gate_magnitude(act, y[:, :n]) * np.abs(y[:, n:]) * down_norms


class LowBitPredictor:
    """The low-bit predictor of every layer, held in DRAM as backend arrays (packed
    as stored) and the down columns' lengths. A neuron is predicted active when its
    score (module docstring) is above the layer's cut."""

    name = "lowbit"
    exact = False
    threshold = None  # cuts are per layer, as tuned (no probability threshold)

    def __init__(self, backend, rows: list[Quantized], down_norms, cuts, act="silu"):
        """Args:
            backend: a Backend API module.
            rows: per layer, the stacked gate and up rows (`layer_rows`).
            down_norms: per layer (n,) float32.
            cuts: per layer score cut (None: that layer reads every neuron).
            act: the gate's activation, silu or gelu_tanh (GeGLU, Gemma).

        Raises:
            ValueError: lists of different lengths or shapes that do not match.
        """
        if not len(rows) == len(down_norms) == len(cuts):
            raise ValueError(
                f"low-bit predictor: {len(rows)} layers of rows, {len(down_norms)} of "
                f"down norms, {len(cuts)} cuts"
            )
        for i, (q, norms) in enumerate(zip(rows, down_norms, strict=True)):
            if q.shape[0] != 2 * norms.shape[0]:
                raise ValueError(
                    f"low-bit predictor: layer {i} has {q.shape[0]} rows for "
                    f"{norms.shape[0]} neurons (expected gate and up: twice as many)"
                )
        self.backend = backend
        self.act = act
        self.rows = [backend.weight(q) for q in rows]
        self.down_norms = [np.asarray(v, dtype=np.float32) for v in down_norms]
        self.cuts = [-np.inf if c is None else float(c) for c in cuts]
        self.nbytes = sum(q.nbytes for q in rows) + sum(
            v.nbytes for v in self.down_norms
        )

    def scores(self, layer: int, h) -> np.ndarray:
        """Each neuron's estimated contribution, float32 NumPy (T, n)."""
        be = self.backend
        y = be.to_numpy(be.linear(h, self.rows[layer]))
        return contribution_scores(y, self.down_norms[layer], self.act)

    def predict(self, layer: int, h) -> np.ndarray:
        """Bool (T, n) mask of the neurons predicted to matter for h (T, d_model)."""
        return self.scores(layer, h) > self.cuts[layer]


def predictor_tensors(rows: list[Quantized], down_norms) -> dict[str, np.ndarray]:
    """The tensors of a low-bit predictor file."""
    tensors = {}
    for i, (q, norms) in enumerate(zip(rows, down_norms, strict=True)):
        for field, value in zip(_FIELDS, _q(q), strict=True):
            tensors[f"layers.{i}.{field}"] = np.ascontiguousarray(value)
        tensors[f"layers.{i}.down_norms"] = np.asarray(norms, dtype=np.float32)
    return tensors


def load_predictor_arrays(
    path: Path, group_size: int
) -> tuple[list[Quantized], list[np.ndarray]]:
    """Read a file of `predictor_tensors`.

    Returns:
        (rows, down_norms), one per layer.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing or unexpected tensor, a wrong dtype, non-finite scales
            or norms; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such predictor file")
    expected = {
        "weight": np.uint32,
        "scales": np.float16,
        "biases": np.float16,
        "down_norms": np.float32,
    }
    tensors = {}
    with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            match = _TENSOR_NAME.fullmatch(key)
            if match is None:
                raise ValueError(f"{path}: unexpected tensor {key!r}")
            value = f.get_tensor(key)
            if value.dtype != expected[match.group(2)]:
                raise ValueError(
                    f"{path}: {key} is {value.dtype}, expected "
                    f"{np.dtype(expected[match.group(2)])}"
                )
            if match.group(2) != "weight":
                check_weights(value, f"{path}: {key}")
            tensors[key] = value
    layers = [int(_TENSOR_NAME.fullmatch(key).group(1)) for key in tensors]
    count = 1 + max(layers, default=-1)
    if count == 0:
        raise ValueError(f"{path}: no predictor tensors (layers.0.weight missing)")
    rows, norms = [], []
    for i in range(count):
        for field in (*_FIELDS, "down_norms"):
            if f"layers.{i}.{field}" not in tensors:
                raise ValueError(f"{path}: missing tensor layers.{i}.{field}")
        fields = [tensors[f"layers.{i}.{field}"] for field in _FIELDS]
        rows.append(Quantized(*fields, BITS, group_size))
        norms.append(tensors[f"layers.{i}.down_norms"])
    return rows, norms
