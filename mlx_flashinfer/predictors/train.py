"""Train a layout's predictor: calibrate, fit, choose each layer's cut, store.

Two kinds: `lowrank` (the paper's, `lowrank.py`), trained per layer, and `lowbit`
(`lowbit.py`: 4-bit copies of gate and up, nothing to fit), the default for SiLU
models, where a low-rank map ranks neurons too poorly to skip many.

Calibration text (the corpus shipped with the package, five domains: narrative prose,
technical prose, source code, conversations in the model's chat template, other
languages; or the texts given, each a domain; no model sampling) runs through the
model one layer at a time (`streams.Calibration` over `calibrate.LayerByLayer`: each
layer's FFN is read once). Per layer:
  - each token's target set: the neurons that fire (ReLU family); for SiLU models
    the neurons outside the `silu_sparsity` fraction with the smallest
    |silu(gate) x up| (`contribution_mask`);
  - a low-rank predictor trains on 4 of every 5 sequences (`lowrank_fit.train_layer`);
    a low-bit one is the layer's gate and up rows at 4 bits;
  - its cut is chosen on the 5th, the tune split it never trained on: the highest
    cut that keeps `recall` of the target set (Deja Vu and the paper aim at 0.99);
  - a few tune sequences run on with the layer computed over the kept neurons only,
    which measures what the cuts cost in perplexity (`quality.py`).
With `max_loss`, the cuts are chosen instead for that loss, per layer
(`quality.allocate`, TEAL-like), in every domain: the worst domain's loss is the
one kept within the target.

The gate predictor (what flash mode uses without a trained one) is measured on the
same tune split: the neurons it predicts, the DRAM it holds and, for SiLU models, its
loss. A new predictor that predicts more neurons per token and holds more DRAM than it
reads more per token at any budget and fits fewer: it is not stored unless forced
(`report.gate_dominates`; a q4 layout's low-bit predictor is such a case).

The predictor file is written under a new name and the manifest is switched to it
last, atomically (`store.py`): an interrupted run leaves the layout as it was.
"""

from __future__ import annotations

import math
import time

import numpy as np
from tqdm import tqdm

from ..formats.layout import Layout
from ..formats.tokenizer import load_tokenizer
from . import lowbit, quality
from .calibrate import (
    MIN_TOKENS,
    check_calibration_budget,
    domain_sequences,
    split_domains,
)
from .kinds import (
    TRAINED,
    activation_mask,
    default_kind,
    gate_magnitude,
    predictor_nbytes,
)
from .lowrank import held_bytes, predictor_tensors
from .lowrank_fit import cut_for_recall, cut_report, train_layer
from .report import gate_dominates, not_stored_line
from .store import check_writable, store_predictor
from .streams import Calibration
from .texts import named_domains

DEFAULT_RECALL = 0.99
# Calibration costs tokens x (forward + epochs x training step); training is the
# larger part. Measured on the default model, tune-split recall of the target set
# when 50% / 70% of neurons are predicted: 4096 tokens x 10 epochs 0.637/0.819
# (layer 2), 0.654/0.822 (layer 15); 8192 x 5 (the same training work, twice the
# forward) 0.642/0.823, 0.661/0.828; 8192 x 10 0.649/0.829, 0.665/0.831.
DEFAULT_TOKENS = 4096
DEFAULT_EPOCHS = 8


def contribution_mask(
    gate: np.ndarray, up: np.ndarray, sparsity: float, act: str = "silu"
):
    """SiLU models: per token, the neurons outside the `sparsity` fraction with the
    smallest |silu(gate) x up|, the size of what each adds to the FFN output. The
    training target of the low-rank predictor: keeping the largest |silu(gate)|
    instead (CATS) loses far more (issue "Sparse SiLU models": +30.9% perplexity at
    50% against +3.1% for this set, on the default model)."""
    score = gate_magnitude(act, gate) * np.abs(up)
    k = int(round(sparsity * (score.shape[1] - 1)))  # np.quantile's rank, one partition
    cut = np.partition(score, k, axis=1)[:, k : k + 1]
    return score > cut


def target_mask(args, gate: np.ndarray, up, silu_sparsity: float) -> np.ndarray:
    """The set the predictor learns (see the module docstring), bool (T, n)."""
    if not args.is_relu_family:  # silu, gelu_tanh
        return contribution_mask(gate, up, silu_sparsity, args.hidden_act)
    return activation_mask(args, gate, up)


def layer_ranks(layers: int, rank: int, last_rank: int | None) -> list[int]:
    """`rank` for every layer, `last_rank` for the last eighth (paper: OPT 6.7B uses 128
    for the first 28 layers and 1024 for the last 4, which are the most active)."""
    last = max(1, layers // 8) if last_rank else 0
    return [rank] * (layers - last) + [last_rank] * last


def parse_max_loss(value: str | float) -> float:
    """A loss target as a fraction: "3%" or "3" -> 0.03 (a bare number is percent).

    Raises:
        ValueError: not a number, or not above 0.
    """
    text = str(value).strip()
    number = text[:-1].strip() if text.endswith("%") else text
    try:
        pct = float(number)
    except ValueError:
        raise ValueError(
            f"bad --max-loss {value!r}: give a perplexity increase in percent, like "
            "3% or 0.5"
        ) from None
    if not math.isfinite(pct) or pct <= 0:
        raise ValueError(
            f"--max-loss must be above 0%, got {value!r} (0% is the dense model: run "
            "without --memory-budget)"
        )
    return pct / 100


def train_predictor(
    path,
    *,
    texts: list[str] | dict[str, str] | None = None,
    tokens: int = DEFAULT_TOKENS,
    kind: str | None = None,
    rank: int = 64,
    last_rank: int | None = None,
    recall: float | None = None,
    max_loss: float | None = None,
    silu_sparsity: float = 0.5,
    threshold: float = 0.5,
    backend: str | None = None,
    memory_budget: str | int | None = None,
    seq_len: int = 256,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Train and store the predictor of the layout at `path`, unless it costs
    more than the gate predictor (the one used without training) on both counts.

    Args:
        path: layout directory.
        texts: calibration texts, each a domain whose loss is guarded on its own
            (a dict names them); None: the shipped corpus
            (`texts.calibration_domains`).
        tokens: calibration tokens, an equal share per domain, spread over each
            text.
        kind: "lowrank" or "lowbit"; None: `default_kind`.
        rank, last_rank: low-rank predictor's rank per layer; the last eighth of the
            layers gets `last_rank` when given.
        recall: each layer's cut keeps this share of its target set on the tune
            split (default DEFAULT_RECALL).
        max_loss: instead of `recall`, choose the cuts so that perplexity on
            calibration text rises by at most this fraction (0.03: 3%) in every
            domain.
        silu_sparsity: SiLU models only: fraction of neurons outside the target
            set per token (the smallest |silu(gate) x up|), in (0, 1); the gate
            predictor's cut on |silu(gate)| (it cannot see up) skips the same
            fraction.
        threshold: the probability cut training watches its held-out recall at
            (to stop); the cuts used are chosen afterwards.
        backend: "numpy", "mlx" or None (as `load`).
        memory_budget: refuse to start when calibration would hold more (bytes,
            "1.5GB", "50%"); None: no check.
        seq_len: tokens per calibration sequence.
        epochs: most epochs per layer (training may stop earlier: see
            `lowrank_fit.train_layer`).
        seed: initialisation and shuffling.
        progress: show progress bars.
        force: store the predictor even when it predicts more neurons per token
            and holds more DRAM than the gate predictor (`gate_dominates`).

    Returns:
        The manifest's new "predictor" section: per-layer cuts and report, the
        measured quality, the gate predictor's figures ("gate"), settings and
        timing.

    Raises:
        ValueError: an unknown kind; a rank, recall, max_loss, silu_sparsity or
            tokens out of range; recall and max_loss both given; too little text;
            a predictor the gate predictor dominates, without `force` (the layout
            is left as it was).
    """
    started = time.perf_counter()
    layout = Layout.open(path)
    args = layout.args
    if args.is_moe:
        raise ValueError(
            f"{path} is a mixture of experts: its router is its predictor (exact), "
            "there is nothing to train; `routing.record_routing` records its routing "
            "(flashinfer train-predictor does)"
        )
    kind = kind or default_kind(args)
    if kind not in TRAINED:
        raise ValueError(f"unknown predictor kind {kind!r}: {' or '.join(TRAINED)}")
    if kind == "lowbit":
        if args.is_relu_family:  # its score is |silu(gate) x up|
            raise ValueError(
                f"the low-bit predictor is for SiLU and GeGLU models, this one is "
                f"{args.hidden_act}: use --kind lowrank, or the exact --predictor gate"
            )
        lowbit.group_size_for(args.hidden_size)
    ranks = layer_ranks(args.num_hidden_layers, rank, last_rank)
    if not all(1 <= r <= args.hidden_size for r in ranks):
        raise ValueError(
            f"rank {max(ranks)} out of range: 1..{args.hidden_size} (d_model)"
        )
    if recall is not None and max_loss is not None:
        raise ValueError("give recall or max_loss, not both: each chooses the cuts")
    recall = DEFAULT_RECALL if recall is None else recall
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    if max_loss is not None and not max_loss > 0:
        raise ValueError(f"max_loss must be above 0, got {max_loss}")
    if not 0.0 < silu_sparsity < 1.0:  # also refuses nan
        raise ValueError(f"silu_sparsity must be in (0, 1), got {silu_sparsity}")
    if tokens < MIN_TOKENS:
        raise ValueError(f"tokens must be >= {MIN_TOKENS}, got {tokens}")
    check_writable(layout)
    tokenizer = load_tokenizer(layout)
    seq_len = min(seq_len, args.max_position_embeddings)
    domains = named_domains(tokenizer, texts)
    sequences, names = domain_sequences(tokenizer, domains, tokens, seq_len)
    total = sum(len(s) for s in sequences)
    train, tune = split_domains(names)
    tune_tokens = sum(len(sequences[j]) for j in tune)
    if memory_budget is not None:
        longest = max(len(s) for s in sequences)
        held = lowbit.predictor_bytes(layout) if kind == "lowbit" else 0
        check_calibration_budget(
            layout, total, tune_tokens, longest, memory_budget, held
        )
    run = Calibration(
        layout, kind, sequences, names, tune, backend, max_loss is not None
    )
    weights, reports, cuts, gate_cuts, gate_fractions = [], [], [], [], []
    for layer in tqdm(
        range(args.num_hidden_layers),
        desc="calibrating and training layers" if kind == "lowrank" else "calibrating",
        disable=not progress,
    ):
        data = run.forward(
            layer, lambda gate, up: target_mask(args, gate, up, silu_sparsity)
        )
        if kind == "lowrank":
            A, B, fit = train_layer(
                data.fit_h,
                data.fit_target,
                ranks[layer],
                epochs=epochs,
                threshold=threshold,
                seed=seed + layer,
            )
            layer_weights, about = (A, B), {"rank": ranks[layer], **_fit(fit)}
        else:
            layer_weights = lowbit.layer_rows(run.runner.stored, layout.dtype)
            about = {"bits": lowbit.BITS}
        predictor = run.predictor(layer_weights)  # as held at run time
        z = run.scores(predictor, run.runner.B.array(data.tune_h))
        cut = cut_for_recall(z, data.tune_target, recall)
        report = cut_report(z, data.tune_target, cut)
        window = quality.predicted_window(z, cut, caches=True)
        reports.append({**report, "window": window, **about})
        if not args.is_relu_family:  # the gate predictor's cut, on the tune split
            magnitude = gate_magnitude(args.hidden_act, data.tune_gate)
            gate_cuts.append(float(np.quantile(magnitude, silu_sparsity)))
            gate_fractions.append(float(np.mean(magnitude > gate_cuts[-1])))
            run.gate_sparse_forward(layer, gate_cuts[-1])
        else:  # exact: what fires (drelu: as the gate sees it, without up)
            gate_fractions.append(float(activation_mask(args, data.tune_gate).mean()))
        run.sparse_forward(layer, predictor, cut, z, data)
        weights.append(layer_weights)
        cuts.append(cut)
    measured = run.measured()
    if max_loss is not None:
        cuts, steps, measured = run.allocate(weights, max_loss, progress)
        for report, grid, g in zip(reports, run.grids, steps, strict=True):
            report.update(grid.kept[g])
    if kind == "lowrank":
        tensors = predictor_tensors(*zip(*weights, strict=True))
        held = held_bytes(*zip(*weights, strict=True), layout.float_dtype)
        about = {"threshold": threshold, "ranks": ranks, "epochs": epochs}
    else:
        tensors = lowbit.predictor_tensors(*zip(*weights, strict=True))
        held = sum(t.nbytes for t in tensors.values())
        group_size = weights[0][0].group_size
        about = {"bits": lowbit.BITS, "group_size": group_size, "threshold": None}
    gate = {
        "predicted_fraction": float(np.mean(gate_fractions)),
        "nbytes": predictor_nbytes("gate", layout),
        # the ReLU family's gate predictor is exact: it loses nothing
        **({"loss": 0.0} if args.is_relu_family else run.gate_loss()),
    }
    settings = {
        "kind": kind,
        "nbytes": held,
        **about,
        "recall_target": None if max_loss is not None else recall,
        "cuts": cuts,
        "quality": measured,
        "gate": gate,
        "tokens": total,
        "tune_tokens": tune_tokens,
        "source": "texts" if texts is not None else "shipped corpus",
        "silu_sparsity": None if args.is_relu_family else silu_sparsity,
        "silu_thresholds": gate_cuts or None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if not force and gate_dominates({**settings, "report": reports}):
        raise ValueError(not_stored_line({**settings, "report": reports}, layout.path))
    return store_predictor(layout, tensors, reports, settings)


def _fit(report: dict) -> dict:
    return {"epochs": report["epochs"], "fit_recall": report["recall"]}
