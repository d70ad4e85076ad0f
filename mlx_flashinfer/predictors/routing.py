"""A mixture of experts' routing, recorded on calibration text: what the cost model
(`plan/expert_costs.py`) predicts the experts cache from.

For a mixture of experts the router is the predictor (exact: nothing to train), so
the calibration to record is the routing itself. Calibration text (the shipped
corpus of five domains, or the texts given: `texts.py`) runs through the dense model
in prompts of up to SEQUENCE_TOKENS, one layer at a time as `calibrate.py` runs it
(each layer's experts read once, never the whole model in memory), and each token's
routed experts are kept. Per layer the manifest's "routing" section records
  rates      each expert's routings per token (they sum to experts_per_token);
  hit_rates  at each of `capacities` (k, 1.5k, 2k, ... experts, up to all), the
             share of routings a cache of that many experts finds cached, decoded
             one token at a time as the experts placement decodes: its window
             (`flash/experts.py` `expert_window`) stepped with each token's routed
             experts, fresh for each sequence, counted past its first `warmup`
             tokens (the cache filling).
"""

from __future__ import annotations

import math
import time

import numpy as np
from tqdm import tqdm

from ..flash.experts import expert_window
from ..formats.layout import Layout
from ..formats.tokenizer import load_tokenizer
from ..model.backends import get_backend
from ..model.moe import DenseExperts
from ..model.transformer import Model, prepare_weights
from .calibrate import MIN_TOKENS, domain_shares, through_layer
from .store import check_writable
from .texts import named_domains

# prompts of at most this many tokens (the model's context when shorter): routing
# needs no longer ones, and attention's cost grows with the prompt
SEQUENCE_TOKENS = 1024


def warmup_tokens(args) -> int:
    """Tokens of each sequence whose routings the hit rates do not count: twice
    what one token brings per expert (2 x experts / top-k), for the cache to fill."""
    return math.ceil(2 * args.num_experts / args.experts_per_token)


def capacity_grid(experts: int, k: int) -> list[int]:
    """The cache capacities hit rates are recorded at: k, 1.5k, 2k, ... and every
    expert."""
    steps = np.round(np.arange(k, experts, k / 2)).astype(int)
    return sorted({*steps.tolist(), experts})


class _RecordingExperts(DenseExperts):
    """`DenseExperts` holding one layer's experts at a time (`load`), keeping the
    experts each call routes to."""

    def __init__(self, backend, layout: Layout, resident: dict):
        self.backend, self.layout = backend, layout
        self.args, self.weights = layout.args, resident
        self.layers: list = [None] * layout.args.num_hidden_layers
        self.routed: list[np.ndarray] = []

    def load(self, layer: int) -> None:
        self.layers = [None] * len(self.layers)  # the layer before goes first
        parts = self.layout.read_parts(layer)
        self.layers[layer] = [self.backend.weight(p) for p in parts]

    def route(self, layer: int, h):
        ids, weights = super().route(layer, h)
        self.routed.append(ids)
        return ids, weights


def routed_experts(
    layout: Layout, sequences: list[list[int]], backend=None, progress=False
) -> list[list[np.ndarray]]:
    """Each layer's routed experts of each sequence (each a prompt from position 0),
    the dense model run one layer at a time: [layer][sequence] -> (T, k) ids."""
    args = layout.args
    B = get_backend(backend)
    resident = prepare_weights(B, layout.iter_resident(stored=True))
    ffn = _RecordingExperts(B, layout, resident)
    longest = max(len(s) for s in sequences)
    model = Model(args, B, resident, ffn, longest)
    streams = [model.embed(s, 0) for s in sequences]
    routed = []
    for layer in tqdm(
        range(args.num_hidden_layers), desc="routing", disable=not progress
    ):
        ffn.load(layer)
        ffn.routed = []
        streams = through_layer(model, layer, streams)
        routed.append(ffn.routed)
    ffn.load(0)  # drop the last layer's experts
    return routed


def window_hits(
    sequences: list[np.ndarray], experts: int, capacities: list[int], warmup: int
) -> tuple[list[int], int]:
    """What the experts cache would hit at each capacity: `expert_window` (the
    runtime's: loads in freed slots, evictions by decayed routing counts) stepped
    with each token's routed experts, fresh for each sequence.

    Args:
        sequences: each sequence's routed experts, (T, k) ids, in token order.
        experts: experts in the layer.
        capacities: the cache sizes.
        warmup: tokens at the start of each sequence that are not counted.

    Returns:
        the counted routings found cached at each capacity, and the routings
        counted.
    """
    hits = [0] * len(capacities)
    routings = 0
    for routed in sequences:
        unique = [np.unique(row) for row in routed]
        routings += sum(len(ids) for ids in unique[warmup:])
        for i, capacity in enumerate(capacities):
            window = expert_window(experts, capacity, 1)
            for t, ids in enumerate(unique):
                step = window.step(ids)
                if t >= warmup:
                    hits[i] += step.hits
    return hits, routings


def routing_sequences(
    tokenizer, domains: dict[str, str], tokens: int, seq_len: int
) -> list[list[int]]:
    """Each domain's equal share of `tokens` from its start (all its tokens when it
    has fewer), cut into prompts of at most `seq_len`, of nearly equal lengths.

    Raises:
        ValueError: no domain, a domain below MIN_DOMAIN_TOKENS tokens.
    """
    sequences = []
    for _, ids, take in domain_shares(tokenizer, domains, tokens, "to route"):
        count = -(-take // seq_len)
        bounds = np.linspace(0, take, count + 1).round().astype(int)
        sequences += [ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return sequences


def record_routing(
    layout: Layout | str,
    *,
    texts: list[str] | dict[str, str] | None = None,
    tokens: int = 4096,
    token_ids: list[list[int]] | None = None,
    backend: str | None = None,
    progress: bool = True,
) -> dict:
    """Record a mixture of experts' routing on calibration text into its manifest
    (the "routing" section; see the module docstring).

    Args:
        layout: a mixture-of-experts layout or its directory.
        texts: calibration texts (a dict names them); None: the shipped corpus
            (`texts.calibration_domains`), an equal share of tokens each.
        tokens: calibration tokens, at least MIN_TOKENS.
        token_ids: instead of texts, the prompts themselves as token ids (each at
            most the model's context): a benchmark's token stream, say.
        backend: "numpy", "mlx" or None (as `load`).
        progress: show a progress bar.

    Returns:
        The manifest's new "routing" section.

    Raises:
        ValueError: a dense model; too few tokens; a text too short; both texts
            and token_ids.
        OSError: the layout cannot be written.
    """
    started = time.perf_counter()
    layout = layout if isinstance(layout, Layout) else Layout.open(layout)
    args = layout.args
    if not args.is_moe:
        raise ValueError(
            f"{layout.path} is a dense model: routing is recorded for mixtures of "
            "experts (train-predictor trains a dense model's neuron predictor)"
        )
    if tokens < MIN_TOKENS:
        raise ValueError(f"tokens must be >= {MIN_TOKENS}, got {tokens}")
    if texts is not None and token_ids is not None:
        raise ValueError("give texts or token_ids, not both")
    check_writable(layout)
    seq_len = min(SEQUENCE_TOKENS, args.max_position_embeddings)
    if token_ids is not None:
        sequences, domains = [list(map(int, s)) for s in token_ids], ["token ids"]
        if not sequences or max(map(len, sequences)) > args.max_position_embeddings:
            raise ValueError(
                "token_ids: give prompts of 1 to "
                f"{args.max_position_embeddings} tokens (the model's context)"
            )
    else:
        tokenizer = load_tokenizer(layout)
        domains = named_domains(tokenizer, texts)
        sequences = routing_sequences(tokenizer, domains, tokens, seq_len)
    routed = routed_experts(layout, sequences, backend, progress)
    experts, k = args.num_experts, args.experts_per_token
    warmup = warmup_tokens(args)
    capacities = capacity_grid(experts, k)
    total = sum(len(s) for s in sequences)
    rates, hit_rates, counted = [], [], 0
    for layer in routed:
        counts = np.bincount(np.concatenate(layer).ravel(), minlength=experts)
        rates.append([round(float(r), 6) for r in counts / total])
        hits, counted = window_hits(layer, experts, capacities, warmup)
        if not counted:
            raise ValueError(
                f"no prompt is longer than the {warmup} tokens a cache takes to "
                "fill: give longer texts or more tokens"
            )
        hit_rates.append([round(h / counted, 6) for h in hits])
    section = {
        "tokens": total,
        "counted": counted // k,  # tokens whose routings the hit rates count
        "texts": list(domains),
        "source": "shipped corpus" if texts is None and token_ids is None else "texts",
        "sequences": len(sequences),
        "warmup": warmup,
        "capacities": capacities,
        "rates": rates,
        "hit_rates": hit_rates,
        "seconds": round(time.perf_counter() - started, 1),
    }
    layout.update_manifest({"routing": section})
    return section


def recorded_hit_rate(section: dict, layer: int, capacity: float) -> float:
    """A layer's recorded hit rate at `capacity` experts: linear between the
    recorded capacities (from 0 at none), 1.0 at every expert and beyond (a cache
    of every expert reads nothing once filled)."""
    grid = section["capacities"]
    if capacity >= grid[-1]:
        return 1.0
    rates = [0.0, *section["hit_rates"][layer]]
    return float(np.interp(max(capacity, 0.0), [0, *grid], rates))


def routing_source(section: dict) -> str:
    """Where the rates come from, for the cost model's note."""
    texts = (
        "the shipped corpus"
        if section["source"] == "shipped corpus"
        else ", ".join(section["texts"])
    )
    return f"measured on {section['tokens']} tokens of {texts}"


def routing_lines(section: dict, num_experts: int) -> list[str]:
    """A table: per layer the most routed expert, its share of the routings, and
    the hit rate of a cache of half the experts; then uniform routing's."""
    half = num_experts / 2
    head = ("layer", "most routed", "its share", f"hit rate, {half:g} of {num_experts}")
    lines = ["  ".join(head)]
    widths = [len(h) for h in head]
    for layer, rates in enumerate(section["rates"]):
        top = int(np.argmax(rates))
        hit = recorded_hit_rate(section, layer, half)
        row = (layer, top, f"{rates[top] / sum(rates):.1%}", f"{hit:.1%}")
        lines.append("  ".join(f"{v:>{w}}" for v, w in zip(row, widths, strict=True)))
    lines.append(
        f"uniform routing: each expert {1 / num_experts:.1%} of the routings, hit "
        "rate 50% at half"
    )
    return lines


def routing_summary(section: dict, num_experts: int) -> str:
    """One line: what was measured, and the mean hit rate at half the experts."""
    layers = range(len(section["rates"]))
    half = num_experts / 2
    hit = np.mean([recorded_hit_rate(section, i, half) for i in layers])
    return (
        f"{routing_source(section)}: a cache of half the experts hits {hit:.0%} "
        "(uniform: 50%)"
    )
