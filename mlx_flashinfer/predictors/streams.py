"""The calibration's streams through the model, layer by layer (`calibrate.
LayerByLayer`): every sequence dense, what the predictor learns from; the quality
sequences (a few tune sequences of each domain) computed over the neurons the cuts
keep, and over those the gate predictor keeps, what they cost in perplexity.

The loss is measured per domain (each domain's own perplexity, dense against
sparse) and the worst domain's is the one a loss target guards: a cut that costs
+3% on the mean and +17% on code would break the promise on code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..model.transformer import gate_magnitude
from . import quality
from .calibrate import LayerByLayer
from .lowbit import LowBitPredictor
from .lowrank import LowRankPredictor

QUALITY_SEQUENCES = 2  # tune sequences per domain the loss is measured on, at most


def _exp(x: float) -> float:
    """exp, inf past float range (a random synthetic model's perplexity can be)."""
    return math.exp(x) if x < 709 else math.inf


@dataclass
class LayerData:
    """One layer's calibration data: FFN inputs and target sets of the sequences
    trained on (fit) and of those tuned on, with the tune tokens' gate (OPT: fc1)
    pre-activations and activations (all NumPy, one row per token)."""

    fit_h: np.ndarray | None
    fit_target: np.ndarray | None
    tune_h: np.ndarray
    tune_target: np.ndarray
    tune_gate: np.ndarray
    tune_act: np.ndarray


class Calibration:
    """The calibration's streams through `LayerByLayer`: every sequence dense (what
    the predictor learns from) and a few tune sequences computed over the neurons
    the cuts keep (what they cost); with `grids`, each layer's options for
    `quality.allocate`."""

    def __init__(self, layout, kind, sequences, names, tune, backend, grids: bool):
        self.args = layout.args
        self.kind = kind
        self.dtype = layout.float_dtype  # what the predictor is held as
        self.sequences = sequences
        self.tune = tune
        longest = max(len(s) for s in sequences)
        self.runner = LayerByLayer(layout, backend, max_context=longest)
        self.streams = self.runner.embed(sequences)
        self.domains = list(dict.fromkeys(names))
        self.quality = [  # sequence indices: tune sequences spread over each domain
            j for d in self.domains for j in quality_sequences(tune, names, d)
        ]
        self.quality_domains = [names[j] for j in self.quality]
        # each domain's rows among the tune tokens (concatenated in `tune` order)
        ends = np.cumsum([len(sequences[j]) for j in tune])
        self.tune_groups = [
            np.concatenate(
                [
                    np.arange(e - len(sequences[j]), e)
                    for j, e in zip(tune, ends, strict=True)
                    if names[j] == d
                ]
            )
            for d in self.domains
        ]
        self.sparse = [self.streams[j] for j in self.quality]
        self.gate_sparse = list(self.sparse)  # the same tokens, the gate's cuts
        self.grids: list[quality.LayerGrid] | None = [] if grids else None

    def forward(self, layer: int, target) -> LayerData:
        """Every sequence through `layer`, dense, recording its data; `target`:
        (gate, up) -> bool (T, n) target set."""
        self.runner.load(layer)
        tune = set(self.tune)
        index = iter(range(len(self.streams)))

        def record(h, gate, up, act):
            tuned = next(index) in tune
            return tuned, h, target(gate, up), *((gate, act) if tuned else (None,) * 2)

        self.streams, records = self.runner.run(layer, self.streams, record=record)
        fit = [r for r in records if not r[0]]
        tuned = [r for r in records if r[0]]
        return LayerData(  # fit: None when nothing is fitted (low-bit)
            *(np.concatenate([r[i] for r in fit]) if fit else None for i in (1, 2)),
            *(np.concatenate([r[i] for r in tuned]) for i in (1, 2, 3, 4)),
        )

    def predictor(self, weights):
        """One layer's predictor from its weights ((A, B) or (rows, down norms)),
        held and computed as at run time (at the layout's dtype)."""
        first, second = weights
        if self.kind == "lowrank":
            return LowRankPredictor(
                self.runner.B, [first], [second], dtype=self.dtype, cuts=[None]
            )
        return LowBitPredictor(
            self.runner.B, [first], [second], [None], act=self.args.hidden_act
        )

    def scores(self, predictor, h) -> np.ndarray:
        """The predictor's scores (low-rank: logits) of FFN inputs h (backend array),
        NumPy (T, n): a neuron is kept when its score is above the layer's cut."""
        if self.kind == "lowrank":
            return predictor.logits(0, h)
        return predictor.scores(0, h)

    def keep(self, predictor, cut):
        """h -> the neurons the cut keeps (None: every one), as `predict` decides."""
        bound = -math.inf if cut is None else cut
        return lambda h: self.scores(predictor, h) > bound

    def sparse_forward(self, layer, predictor, cut, z, data: LayerData) -> None:
        """The quality streams through `layer` over the neurons the cut keeps; with
        grids, the layer's options too."""
        keep = self.keep(predictor, cut)
        self.sparse = self.runner.run(layer, self.sparse, keep=keep)
        if self.grids is not None:
            B_ = self.runner.B
            out_norms = np.concatenate(
                [
                    np.linalg.norm(B_.to_numpy(self.streams[j]), axis=1)
                    for j in self.tune
                ]
            )
            self.grids.append(
                quality.layer_grid(
                    z,
                    data.tune_target,
                    data.tune_act,
                    self.runner.down_norms,
                    out_norms,
                    self.tune_groups,
                )
            )

    def gate_sparse_forward(self, layer: int, cut: float) -> None:
        """The quality streams through `layer` over the neurons the gate predictor
        keeps (SiLU: |silu(gate)| above `cut`): what running without a trained
        predictor would cost, on the same tokens."""
        ffn = self.runner.ffn

        def keep(h):
            return gate_magnitude(self.args.hidden_act, ffn.gate(layer, h)) > cut

        self.gate_sparse = self.runner.run(layer, self.gate_sparse, keep=keep)

    def gate_loss(self) -> dict:
        """The gate predictor's perplexity loss on the quality sequences (after
        `measured`, which scores them dense): "loss" the worst domain's, with
        "worst" and "pooled_loss"."""
        measured = self._quality(self.nll(self.gate_sparse))
        return {k: measured[k] for k in ("loss", "worst", "pooled_loss")}

    def nll(self, streams) -> dict[str, float]:
        """Summed NLL (nats) per domain of the quality sequences from their final
        streams."""
        nll = dict.fromkeys(self.domains, 0.0)
        for x, j, d in zip(streams, self.quality, self.quality_domains, strict=True):
            nll[d] += quality.sequence_nll(self.runner.head(x), self.sequences[j])
        return nll

    def measured(self) -> dict:
        """Dense and sparse perplexity of the quality sequences, and the loss."""
        self.scored = dict.fromkeys(self.domains, 0)
        for j, d in zip(self.quality, self.quality_domains, strict=True):
            self.scored[d] += len(self.sequences[j]) - 1
        self.dense_nll = self.nll([self.streams[j] for j in self.quality])
        return self._quality(self.nll(self.sparse))

    def _quality(self, nll: dict[str, float]) -> dict:
        """Pooled perplexities and, per domain, its own; "loss" is the worst
        domain's (what a loss target guards), "pooled_loss" that of all tokens."""
        domains = {
            d: _perplexities(nll[d], self.dense_nll[d], self.scored[d])
            for d in self.domains
        }
        worst = max(self.domains, key=lambda d: domains[d]["loss"])
        pooled = _perplexities(
            sum(nll.values()), sum(self.dense_nll.values()), sum(self.scored.values())
        )
        return {
            **pooled,
            "pooled_loss": pooled["loss"],
            "loss": domains[worst]["loss"],
            "worst": worst,
            "domains": domains,
        }

    def allocate(self, weights: list, max_loss: float, progress: bool):
        """Per-layer cuts for `max_loss` (`quality.allocate`); returns (cuts, GRID
        index per layer, measured quality with "max_loss", "met", "passes")."""
        layers = self.args.num_hidden_layers
        path = quality.greedy_path(self.grids)
        bar = tqdm(desc="measuring loss (passes)", disable=not progress)
        results = {}  # per-layer GRID indices -> measured quality

        def measure(steps: list[int]) -> float:
            nll = self._sparse_pass(weights, self._cuts(steps))
            results[tuple(steps)] = self._quality(nll)
            bar.update()
            return results[tuple(steps)]["loss"]

        result = quality.allocate(path, layers, max_loss, measure)
        bar.close()
        measured = results.get(tuple(result.steps)) or self._quality(self.dense_nll)
        measured.update(max_loss=max_loss, met=result.met, passes=len(results))
        return self._cuts(result.steps), result.steps, measured

    def _cuts(self, steps: list[int]) -> list:
        return [g.cuts[i] for g, i in zip(self.grids, steps, strict=True)]

    def _sparse_pass(self, weights: list, cuts) -> dict[str, float]:
        """NLL of the quality sequences with every layer sparse at `cuts`."""
        streams = self.runner.embed([self.sequences[j] for j in self.quality])
        for layer, (w, cut) in enumerate(zip(weights, cuts, strict=True)):
            self.runner.load(layer)
            keep = self.keep(self.predictor(w), cut)
            streams = self.runner.run(layer, streams, keep=keep)
        return self.nll(streams)


def quality_sequences(tune: list[int], names: list[str], domain: str) -> list[int]:
    """The tune sequences of `domain` the loss is measured on: QUALITY_SEQUENCES of
    them (all when fewer), spread evenly over its text."""
    own = [j for j in tune if names[j] == domain]
    picks = np.linspace(0, len(own) - 1, min(QUALITY_SEQUENCES, len(own)))
    return [own[i] for i in sorted(set(picks.round().astype(int)))]


def _perplexities(nll: float, dense_nll: float, tokens: int) -> dict:
    return {
        "tokens": tokens,
        "dense_perplexity": _exp(dense_nll / tokens),
        "perplexity": _exp(nll / tokens),
        "loss": _exp((nll - dense_nll) / tokens) - 1.0,
    }
