"""A mixture-of-experts layer, written once against the Backend API: routing, the
experts' sum, the shared expert; and `DenseExperts`, every expert in memory (the
reference the flash placement, `flash/experts.py`, is proved against).

Per layer and token (as transformers defines each family, formats/experts.py):
    logits  = router . h                       (T, experts), resident
    p       = softmax(logits)                  float32, on the host
    ids, w  = top-k of p                       renormalised to sum 1 if the family does
    out     = sum over k of w * expert_id(h)   each expert a SiLU-gated FFN
    out    += sigmoid(gate . h) * shared(h)    Qwen2-MoE's shared expert
    out    += shared(h)                        Granite's (gate and up rows one matrix)
The router's choice is read back to the host once per layer: the one host sync a
layer costs on MLX (the flash placement needs the ids there to read the experts, and
both paths route alike; reads ahead add a second, the next layer's router's).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..formats.experts import FAMILIES, router_name
from ..formats.quantize import Quantized
from .transformer import UncountedFFN, ffn_forward

# Tokens up to which a layer's experts run side by side (`expert_outputs`). OLMoE-
# shaped q4, every expert in DRAM, AMD EPYC 2 vCPU, alternating in one process:
# decode 48.0-48.6 -> 36.1-42.7 ms a token; prompts of 4 tokens 0.17 -> 0.12 s, of 8
# 0.32-0.36 -> 0.22-0.28 s, of 16 no faster (0.71-0.79 against 0.72-0.74), of 64
# slower (2.2-2.6 -> 3.4-3.5).
SIDE_BY_SIDE_TOKENS = 8


def route(args, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each token's experts and their weights from router logits (T, experts).

    Returns:
        ids (T, k) int64, the most probable first; weights (T, k) float32.
    """
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    # stable: equal probabilities go to the lower expert id
    ids = np.argsort(-p, axis=-1, kind="stable")[:, : args.experts_per_token]
    weights = np.take_along_axis(p, ids, axis=-1)
    if args.norm_topk_prob:
        weights /= weights.sum(axis=-1, keepdims=True)
    return ids.astype(np.int64), weights.astype(np.float32)


def router_logits(backend, args, weights: dict, layer: int, h) -> np.ndarray:
    """Router logits (T, experts) of the FFN input h, on the host."""
    return backend.to_numpy(backend.linear(h, weights[router_name(args, layer)]))


def experts_forward(backend, args, h, ids, weights, expert, out=None, only=None):
    """out + the routed experts' outputs, summed expert by expert in id order.

    Args:
        h: the FFN input (T, d_model).
        ids, weights: each token's experts and weights (`route`).
        expert: e -> its (gate rows, up rows, down columns) as `linear` weights.
        out: the sum so far, or None.
        only: experts to compute (sorted; default all that are routed to); the
            others are left for a later call (the flash placement's rounds).
    """
    wanted = np.unique(ids) if only is None else only
    for part in expert_outputs(backend, args, h, ids, weights, expert, wanted):
        if part is not None:
            out = part if out is None else out + part
    return out


def expert_outputs(backend, args, h, ids, weights, expert, wanted) -> list:
    """`expert_output` of each expert in `wanted`, in that order: for up to
    SIDE_BY_SIDE_TOKENS tokens side by side on the compute threads (`backend.each`),
    since each expert's products are then too small to be worth splitting
    (Qwen3-30B-A3B's: 0.8 MB in q4) and one at a time left a core idle; for more,
    one after another, each product split (BLAS's threads, past NumPy's loops)."""

    def output(e):
        return expert_output(backend, args, h, ids, weights, expert, int(e))

    if h.shape[0] <= SIDE_BY_SIDE_TOKENS:
        return backend.each(output, wanted)
    return [output(e) for e in wanted]


def expert_output(backend, args, h, ids, weights, expert, e: int):
    """Expert e's output, weighted, on the rows of the tokens routed to it (T,
    d_model; zero elsewhere), or None when no token is; `experts_forward` sums
    these in id order."""
    B = backend
    tokens, rank = np.nonzero(ids == e)
    if not len(tokens):
        return None
    x = h if len(tokens) == h.shape[0] else B.take_rows(h, tokens)
    y = ffn_forward(B, args, x, expert(e))  # (n, d_model)
    # scatter the weighted rows back to their tokens: (T, n) one-hot times y
    spread = np.zeros((h.shape[0], len(tokens)), np.float32)
    spread[tokens, np.arange(len(tokens))] = weights[tokens, rank]
    return B.linear(y.T, B.array(spread)).T


def shared_expert(backend, args, weights: dict, layer: int, h):
    """The shared expert's output: Qwen2-MoE's sigmoid(gate . h) * its FFN of h,
    Granite's FFN of h; None without."""
    B, fs = backend, args.shared_expert_size
    if not fs:
        return None
    if FAMILIES[args.moe_type].shared_fused:
        p = f"layers.{layer}.shared_mlp."
        a = B.linear(h, B.rows_weight(weights[p + "input_linear.weight"]))
        return B.linear(
            B.silu(a[:, :fs]) * a[:, fs:], weights[p + "output_linear.weight"]
        )
    p = f"layers.{layer}.mlp.shared_expert"
    parts = [
        B.rows_weight(weights[f"{p}.gate_proj.weight"]),
        B.rows_weight(weights[f"{p}.up_proj.weight"]),
        weights[f"{p}.down_proj.weight"],  # (d_model, n): a linear weight as it is
    ]
    gate = B.sigmoid(B.linear(h, weights[f"{p}_gate.weight"]))  # (T, 1)
    return ffn_forward(B, args, h, parts) * gate


def with_shared(backend, args, weights: dict, layer: int, h, out):
    shared = shared_expert(backend, args, weights, layer, h)
    if out is None:
        out = backend.zeros((h.shape[0], args.hidden_size))
    return out if shared is None else out + shared


def expert_weights(backend, args, parts: list, slot: int) -> list:
    """An expert's (gate rows, up rows, down columns) as `linear` weights, from the
    three (experts or slots, intermediate * d_model) matrices holding it at `slot`
    (each a `Quantized` of such matrices in a quantized layout)."""
    B, f = backend, args.intermediate_size
    gate, up, down = (_expert_rows(part, slot, f) for part in parts)
    return [B.rows_weight(gate), B.rows_weight(up), B.columns_weight(down)]


def _expert_rows(part, slot: int, rows: int):
    """Row `slot` of a part's matrix as the expert's (rows, d_model) matrix."""
    if isinstance(part, Quantized):
        fields = (part.packed, part.scales, part.biases)
        return replace(
            part,
            **{
                k: a[slot].reshape(rows, -1)
                for k, a in zip(("packed", "scales", "biases"), fields, strict=True)
            },
        )
    return part[slot].reshape(rows, -1)


class DenseExperts(UncountedFFN):
    """Every expert of every layer in memory, held as stored: three (experts,
    intermediate * d_model) matrices per layer, the bundles' parts."""

    def __init__(self, backend, layout, resident: dict):
        self.backend = backend
        self.args = layout.args
        self.weights = resident
        self.layers = [
            [backend.weight(p) for p in layout.read_parts(i)]
            for i in range(self.args.num_hidden_layers)
        ]

    def held_bytes(self) -> dict:
        return {"ffn": sum(int(w.nbytes) for parts in self.layers for w in parts)}

    def route(self, layer: int, h) -> tuple[np.ndarray, np.ndarray]:
        """Each token's experts (T, k) and weights (T, k), on the host (a hook:
        `predictors/routing.py` records them)."""
        return route(
            self.args, router_logits(self.backend, self.args, self.weights, layer, h)
        )

    def __call__(self, layer: int, h):
        B, args, parts = self.backend, self.args, self.layers[layer]
        ids, weights = self.route(layer, h)
        out = experts_forward(
            B, args, h, ids, weights, lambda e: expert_weights(B, args, parts, e)
        )
        return with_shared(B, args, self.weights, layer, h, out)
