"""Activation predictors: which FFN neurons will fire for a token, before the FFN runs.

One interface: `predict(layer, h) -> bool mask (T, neurons)` from the FFN input `h`
(the normed attention output, paper section 3.1), plus `nbytes` held in DRAM (counted in
the memory budget) and `exact` (full recall guaranteed for ReLU-family models).

- `all`: every neuron (the naive and hybrid baselines).
- `gate`: the gate (OPT: fc1) matrix resident; exact for ReLU-family models. For SiLU
  models it thresholds |silu(gate . h)| per layer at a calibrated value (CATS):
  approximate.
- `oracle`: the true active set (tests and upper bounds).
- `lowrank`: the trained predictor of the paper (`lowrank.py`, trained by `train.py`).
- `lowbit`: 4-bit copies of gate and up scoring each neuron's contribution
  (`lowbit.py`): for SiLU models, where the low-rank one ranks too poorly.
`train-predictor` stores one of the last two (the manifest's "predictor" section
names its kind).
"""

from __future__ import annotations

import numpy as np

from ..formats.args import ModelArgs
from ..formats.layout import Layout
from ..formats.safetensors_stream import STORAGE, read_header
from ..model.nonfinite import check_weights
from ..model.transformer import gate_magnitude
from .lowbit import GROUP_SIZES

PREDICTORS = ("lowrank", "lowbit", "gate", "oracle", "all", "router")
TRAINED = ("lowrank", "lowbit")  # kinds train-predictor stores
DEFAULT_SILU_SPARSITY = 0.5  # CATS-style: half the neurons of a SiLU model skipped


def activation_mask(args: ModelArgs, gate, up=None, silu_thresholds=None, layer=0):
    """Neurons whose activation is non-zero (ReLU family) or above threshold (SiLU).

    `gate` is the gate (OPT: fc1 + bias) pre-activation (T, n) as NumPy; `up` is needed
    only for drelu, where ReLU on the up branch can zero a neuron too.
    """
    act = args.hidden_act
    if not args.is_relu_family:  # silu, gelu_tanh
        return gate_magnitude(act, gate) > silu_thresholds[layer]
    if act == "fatrelu":
        return gate > args.activation_threshold
    mask = gate > 0
    if act == "drelu" and up is not None:
        mask &= up > 0
    return mask


class AllPredictor:
    """Every neuron, every token: the naive baseline (reads the whole FFN)."""

    name = "all"
    exact = True
    nbytes = 0

    def __init__(self, args: ModelArgs):
        self.neurons = args.intermediate_size

    def predict(self, layer: int, h) -> np.ndarray:
        return np.ones((h.shape[0], self.neurons), dtype=bool)


class GatePredictor:
    """The gate (OPT: fc1) rows of every layer kept in DRAM, thresholded.

    Exact (full recall) for ReLU-family models: a neuron whose gate pre-activation is
    not positive (fatrelu: not above its threshold) contributes exactly zero. For
    SiLU models it thresholds |silu(gate . h)| per layer at the values calibrated when
    the low-rank predictor was trained (many tokens), else at values calibrated on the
    first prompt, to skip `silu_sparsity` of the neurons (CATS): approximate, and
    labelled so.
    """

    name = "gate"

    def __init__(self, backend, layout: Layout, resident: dict, silu_sparsity: float):
        self.backend = backend
        self.args = layout.args
        self.exact = self.args.is_relu_family
        self.silu_sparsity = silu_sparsity
        trained = layout.manifest.get("predictor") or {}
        self.silu_thresholds = (
            trained.get("silu_thresholds") or [None] * self.args.num_hidden_layers
        )
        self.gates = [  # held as stored, like every weight
            backend.weight(_finite(layout.read_parts(i)[0], layout, i, "gate"))
            for i in range(self.args.num_hidden_layers)
        ]
        self.bias = [
            resident.get(f"layers.{i}.fc1.bias")
            for i in range(self.args.num_hidden_layers)
        ]
        self.nbytes = sum(int(g.nbytes) for g in self.gates)

    def pre_activation(self, layer: int, h) -> np.ndarray:
        B = self.backend
        return B.to_numpy(B.linear(h, self.gates[layer], self.bias[layer]))

    def predict(self, layer: int, h) -> np.ndarray:
        gate = self.pre_activation(layer, h)
        if not self.args.is_relu_family and self.silu_thresholds[layer] is None:
            self.silu_thresholds[layer] = float(
                np.quantile(
                    gate_magnitude(self.args.hidden_act, gate), self.silu_sparsity
                )
            )
        return activation_mask(self.args, gate, None, self.silu_thresholds, layer)


def _finite(rows, layout: Layout, layer: int, part: str):
    check_weights(rows, f"{layout.ffn_path}: layer {layer}'s {part} rows")
    return rows


class OraclePredictor:
    """The true active set, for tests and upper bounds.

    To know it, the oracle evaluates the gate (and, for drelu, the up) rows of every
    neuron for each token: it holds those matrices of all layers in memory, which is
    NOT counted in the memory budget (nbytes = 0). SiLU models: the calibrated-
    threshold set, as `gate`.
    """

    name = "oracle"
    exact = True
    nbytes = 0

    def __init__(self, backend, layout: Layout, resident: dict, silu_sparsity: float):
        self.gate = GatePredictor(backend, layout, resident, silu_sparsity)
        self.args = layout.args
        self.exact = self.args.is_relu_family
        self.ups = None
        if self.args.hidden_act == "drelu":
            self.ups = [
                backend.weight(_finite(layout.read_parts(i)[1], layout, i, "up"))
                for i in range(self.args.num_hidden_layers)
            ]

    def predict(self, layer: int, h) -> np.ndarray:
        if not self.args.is_relu_family:
            return self.gate.predict(layer, h)
        gate = self.gate.pre_activation(layer, h)
        up = None
        if self.ups is not None:
            B = self.gate.backend
            up = B.to_numpy(B.linear(h, self.ups[layer]))
        return activation_mask(self.args, gate, up)


def default_kind(args: ModelArgs) -> str:
    """The kind `train-predictor` makes by default: lowbit for SiLU models (it keeps
    their quality: `lowbit.py`) whose rows it can group (d_model a multiple of 32);
    lowrank (the paper's, small) otherwise, and for the ReLU family, whose sparsity
    it predicts well."""
    if args.is_relu_family or args.hidden_size % min(GROUP_SIZES):
        return "lowrank"
    return "lowbit"


def predictor_nbytes(name: str, layout: Layout) -> int:
    """DRAM bytes the named predictor holds (counted in the memory budget), at the
    layout's dtype like every weight."""
    itemsize = np.dtype(STORAGE[layout.float_dtype]).itemsize
    if name == "gate":  # OPT's fc1 bias is a resident weight, counted there
        args = layout.args
        return args.num_hidden_layers * args.intermediate_size * layout.part_bytes[0]
    if name in ("oracle", "all", "router"):  # a router is a resident weight
        return 0
    if name == "lowrank":
        header, _ = read_header(layout.path / trained_predictor(layout, name)["file"])
        return sum(int(np.prod(t["shape"])) for t in header.values()) * itemsize
    if name == "lowbit":  # held as stored: packed rows, float16 scales, float32 norms
        header, _ = read_header(layout.path / trained_predictor(layout, name)["file"])
        return sum(t["data_offsets"][1] - t["data_offsets"][0] for t in header.values())
    raise ValueError(
        f"unknown predictor {name!r}: expected one of {', '.join(PREDICTORS)}"
    )


def trained_kind(layout: Layout) -> str | None:
    """The kind of the layout's trained predictor ("lowrank", "lowbit"), None
    without one."""
    section = layout.manifest.get("predictor")
    return section.get("kind", "lowrank") if section else None


def trained_predictor(layout: Layout, kind: str = "lowrank") -> dict:
    """The manifest's predictor section, which must be of `kind`.

    Raises:
        ValueError: the layout has none, or one of another kind (the message says
            how to train one).
    """
    section = layout.manifest.get("predictor")
    if not section:
        raise ValueError(
            f"{layout.path} has no trained predictor: train one with "
            f"`flashinfer train-predictor {layout.path}`, or pick --predictor gate/all"
        )
    if trained_kind(layout) != kind:
        raise ValueError(
            f"{layout.path}'s trained predictor is {trained_kind(layout)}, not {kind}: "
            f"use --predictor {trained_kind(layout)}, or train one with "
            f"`flashinfer train-predictor {layout.path} --kind {kind}`"
        )
    return section


def make_predictor(
    name: str,
    backend,
    layout: Layout,
    resident: dict,
    silu_sparsity: float = DEFAULT_SILU_SPARSITY,
    threshold: float | None = None,
):
    """Build a predictor by name ("lowrank", "lowbit", "gate", "oracle", "all").

    `threshold` (lowrank only) overrides the trained cuts with one probability cut
    for every layer: higher reads fewer neurons, lower misses fewer.

    Raises:
        ValueError: an unknown name, or a trained kind the layout does not have.
    """
    if threshold is not None and name != "lowrank":
        raise ValueError("a predictor threshold applies to the lowrank predictor only")
    if name == "lowrank":
        from .lowrank import LowRankPredictor

        section = trained_predictor(layout, name)
        return LowRankPredictor.from_file(
            backend,
            layout.path / section["file"],
            threshold=threshold,
            trained_threshold=section["threshold"],
            dtype=layout.float_dtype,
            cuts=section.get("cuts"),
        )
    if name == "lowbit":
        from .lowbit import LowBitPredictor, load_predictor_arrays

        section = trained_predictor(layout, name)
        rows, norms = load_predictor_arrays(
            layout.path / section["file"], section["group_size"]
        )
        return LowBitPredictor(
            backend, rows, norms, section["cuts"], act=layout.args.hidden_act
        )
    if name == "router":  # a mixture of experts' own: exact
        from .router import RouterPredictor

        return RouterPredictor(backend, layout.args, resident)
    if layout.args.is_moe:
        raise ValueError(
            f"a mixture of experts is predicted by its router: --predictor router, "
            f"not {name}"
        )
    if name == "all":
        return AllPredictor(layout.args)
    if name == "gate":
        return GatePredictor(backend, layout, resident, silu_sparsity)
    if name == "oracle":
        return OraclePredictor(backend, layout, resident, silu_sparsity)
    raise ValueError(
        f"unknown predictor {name!r}: expected one of {', '.join(PREDICTORS)}"
    )
