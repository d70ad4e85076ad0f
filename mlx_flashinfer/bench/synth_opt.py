"""Synthetic sparse models for benchmarks: OPT shapes with a built-in activation
structure.

Random weights give no sparsity and no token-to-token reuse, so this module builds the
structure in, and writes the layout tensor by tensor (never the whole model in memory).

How the structure is produced (OPT family, d_model = d, n FFN neurons per layer):
- The residual stream is split into a slow block S (`slow_dims` dims), a token block T
  (`token_dims` dims), one constant dim j0 and a fast block F (the rest). Token
  embeddings are N(0, 1) in T and F, zero elsewhere. The learned position embedding of
  position t is a smooth curve in S: slow(t) = a sum over slow_dims/2 orthogonal planes
  of rotations cos/sin(w_j t + phi_j), per-dim std `slow_scale`, frequencies
  w_j = w0 * U(0.5, 1.5).
- Attention and fc2 weights are tiny, so every layer's FFN input is h = LN(e_token +
  slow(t)): a slow, position-driven part (S) and token-driven parts (T, F). The FFN's
  LayerNorm maps j0 to the constant 1 (weight 0, bias 1): a constant feature.
- Neuron i reads S through a random unit vector u_i, T through `token_weight` v_i and F
  through `fast_weight` r_i: z_i = u_i.h_S + tw v_i.h_T + fw r_i.h_F + b_i. Over tokens
  z_i is close to Gaussian (many independent sinusoids plus token noise), so the bias
  b_i is set analytically to make the neuron fire with probability p_i. The p_i are
  log-normal around a per-layer mean rising linearly from `active_first` to
  `active_last` (paper: OPT 6.7B 1.6% -> 5.4%, about 3.3% on average, 97% sparsity).
- The predictor sees S, T and the constant (rank slow_dims + token_dims + 1) but not F:
  it is tuned to predict `predicted_ratio` times the active neurons (paper: about 3x,
  about 10% of the FFN per token) and misses the neurons that F alone pushes over
  (recall about 0.95-0.98, paper: about 95%). It is written into the layout, so
  `predictor="lowrank"` works at once: constructed, not trained; its report gives the
  simulated recall and precision.
- Consecutive tokens share most predicted neurons because slow(t) drifts slowly, while
  the token block makes neurons near their threshold flicker, which a window of several
  tokens absorbs. The drift speed w0 is found by simulation so that a window of `window`
  tokens loads `window_load` of the FFN per token (paper: 2.4% at k = 4-5). Measured on
  the real forward pass (opt-125m shape, 272 decoded tokens, lowrank predictor): 10.5%
  of the FFN predicted per token; loaded with window 0 / 1 / 4: 10.5% / 4.4% / 2.3%.
Token ids and text mean nothing here: generation repeats the prompt's last token, so
benchmarks should feed (teacher-force) random tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

from ..flash.window import window_reuse
from ..formats.args import ModelArgs
from ..formats.shapes import expected_shapes

SHAPES = {
    "opt-tiny": dict(
        hidden_size=64,
        ffn_dim=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=512,
        max_position_embeddings=512,
    ),
    "opt-125m": dict(
        hidden_size=768,
        ffn_dim=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        vocab_size=50272,
        max_position_embeddings=2048,
    ),
    "opt-1.3b": dict(
        hidden_size=2048,
        ffn_dim=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        vocab_size=50272,
        max_position_embeddings=2048,
    ),
    "opt-6.7b": dict(
        hidden_size=4096,
        ffn_dim=16384,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=50272,
        max_position_embeddings=2048,
    ),
}
_INV = np.vectorize(NormalDist().inv_cdf)


@dataclass
class Structure:
    """The knobs of the activation structure (module docstring: what each one does)."""

    slow_dims: int | None = None  # None: min(128, d_model / 4)
    slow_scale: float = 2.0
    token_dims: int | None = None  # None: min(32, d_model / 16)
    token_weight: float = 1.0
    fast_weight: float = 0.8
    active_first: float = 0.016
    active_last: float = 0.054
    predicted_ratio: float = 3.0
    window: int = 4
    window_load: float = 0.024
    drift: float | None = None  # OPT: w0; Llama: attention sharpness; None: simulated


def opt_config(shape: str | dict) -> dict:
    """A Hugging Face OPT config.json dict for a named shape or custom sizes."""
    sizes = SHAPES[shape] if isinstance(shape, str) else dict(shape)
    return {
        "model_type": "opt",
        "activation_function": "relu",
        "do_layer_norm_before": True,
        "enable_bias": True,
        "word_embed_proj_dim": sizes["hidden_size"],
        "bos_token_id": 2,
        "eos_token_id": 2,
        "tie_word_embeddings": True,
        **sizes,
    }


class SyntheticOPT:
    """A checkpoint-like source (args, shapes, tensor(name), tokenizer()) for
    convert.write_layout, generating every tensor from the seed on demand."""

    kind = "synthetic"

    def __init__(self, shape: str | dict, structure: Structure, seed: int = 0):
        if isinstance(shape, str) and shape not in SHAPES:
            raise ValueError(
                f"unknown shape {shape!r}: expected one of "
                f"{', '.join(SHAPES)} or custom sizes"
            )
        self.shape_name = shape if isinstance(shape, str) else "custom"
        self.args = ModelArgs.from_hf_config(opt_config(shape))
        d = self.args.hidden_size
        self.s = structure
        if structure.slow_dims is None:
            structure.slow_dims = min(128, d // 4) // 2 * 2
        if structure.token_dims is None:
            structure.token_dims = max(1, min(32, d // 16))
        if not 2 <= structure.slow_dims <= d // 4 or structure.slow_dims % 2:
            raise ValueError(f"slow_dims must be even and in 2..{d // 4} for d={d}")
        self.seed = seed
        self.shapes = expected_shapes(self.args)
        ds, dt = structure.slow_dims, structure.token_dims
        self.slow, self.token = slice(0, ds), slice(ds, ds + dt)
        self.j0, self.fast = ds + dt, slice(ds + dt + 1, d)
        # LayerNorm's scale: per-dim std of e + slow over all dims
        d_token_fast = d - ds - 1
        self.ln_std = np.sqrt((d_token_fast + ds * structure.slow_scale**2) / d)
        rng = self._rng("curve")
        planes = structure.slow_dims // 2
        self.phases = rng.uniform(0, 2 * np.pi, planes)
        self.spread = rng.uniform(0.5, 1.5, planes)
        if structure.drift is None:
            structure.drift = calibrate_drift(self)
        self.set_drift(structure.drift)

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "shape": self.shape_name,
            "seed": self.seed,
            "structure": asdict(self.s),
        }

    def _rng(self, *key) -> np.random.Generator:
        digest = hashlib.sha256(repr((self.seed, *key)).encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    # -- the structure --------------------------------------------------------------
    drift_range = (1e-5, 3.0)
    max_rate, max_predicted = 0.3, 0.9  # clips of per-neuron rates
    predictor_threshold = 0.5  # the constant feature carries the cut

    def set_drift(self, value: float) -> None:
        self.omegas = value * self.spread

    def sim_inputs(self, start: int, tokens: int, rng) -> tuple:
        """FFN inputs of `tokens` random tokens at positions start..: the slow, token
        and fast blocks of h, each (tokens, dims)."""
        slow = self.slow_curve(np.arange(start, start + tokens)) / self.ln_std
        token = rng.standard_normal((tokens, self.s.token_dims)) / self.ln_std
        width = self.fast.stop - self.fast.start
        return slow, token, rng.standard_normal((tokens, width)) / self.ln_std

    def slow_curve(self, positions: np.ndarray) -> np.ndarray:
        """slow(t) for positions t: (T, slow_dims), per-dim std `slow_scale`."""
        angles = np.outer(positions, self.omegas) + self.phases  # (T, planes)
        amplitude = self.s.slow_scale * np.sqrt(2.0)
        out = np.empty((len(positions), self.s.slow_dims))
        out[:, 0::2] = amplitude * np.cos(angles)
        out[:, 1::2] = amplitude * np.sin(angles)
        return out

    def layer_rate(self, layer: int) -> float:
        frac = layer / max(self.args.num_hidden_layers - 1, 1)
        return self.s.active_first + frac * (self.s.active_last - self.s.active_first)

    def neurons(self, layer: int) -> dict:
        """Per-neuron structure of a layer: slow/fast directions, rates, biases and the
        predictor's constant term."""
        n = self.args.intermediate_size
        rng = self._rng("neurons", layer)
        u = rng.standard_normal((n, self.s.slow_dims))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        v = rng.standard_normal((n, self.s.token_dims))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        r = rng.standard_normal((n, self.fast.stop - self.fast.start), dtype=np.float32)
        r /= np.linalg.norm(r, axis=1, keepdims=True)
        rate = self.layer_rate(layer) * np.exp(rng.normal(0, 0.5, n) - 0.125)
        rate = np.clip(rate, 1e-4, self.max_rate)
        # std of the part the predictor sees (slow + token) and of the whole
        seen = np.hypot(self.s.slow_scale, self.s.token_weight) / self.ln_std
        sigma = np.hypot(seen, self.s.fast_weight / self.ln_std)
        bias = -sigma * _INV(1 - rate)
        predicted = np.clip(self.s.predicted_ratio * rate, 1e-4, self.max_predicted)
        return {
            "u": u,
            "v": v,
            "r": r,
            "rate": rate,
            "bias": bias,
            "predictor_bias": seen * _INV(predicted),
        }

    # -- tensors ----------------------------------------------------------------------
    def tensor(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        if name == "embed_tokens.weight":
            out = np.zeros(shape, np.float32)
            rng = self._rng("embed")
            out[:, self.token] = rng.standard_normal(
                (shape[0], self.s.token_dims), dtype=np.float32
            )
            out[:, self.fast] = rng.standard_normal(
                (shape[0], self.fast.stop - self.fast.start), dtype=np.float32
            )
            return out
        if name == "embed_positions.weight":
            out = np.zeros(shape, np.float32)
            out[2:, self.slow] = self.slow_curve(np.arange(shape[0] - 2))
            return out
        if name.endswith("layer_norm.weight"):
            out = np.ones(shape, np.float32)
            if name.endswith(".final_layer_norm.weight"):  # the FFN's LayerNorm
                out[self.j0] = 0.0
            return out
        if name.endswith("layer_norm.bias"):
            out = np.zeros(shape, np.float32)
            if name.endswith(".final_layer_norm.bias"):
                out[self.j0] = 1.0  # the constant feature the predictor reads
            return out
        layer = int(name.split(".")[1])
        if name.endswith("fc1.weight") or name.endswith("fc1.bias"):
            neurons = self.neurons(layer)
            if name.endswith("bias"):
                return neurons["bias"].astype(np.float32)
            out = np.zeros(shape, np.float32)
            out[:, self.slow] = neurons["u"]
            out[:, self.token] = self.s.token_weight * neurons["v"]
            out[:, self.fast] = self.s.fast_weight * neurons["r"]
            return out
        if name.endswith(".bias"):
            return np.zeros(shape, np.float32)
        # attention and fc2: tiny, so the residual stream stays e + slow(t)
        scale = 1e-3 / np.sqrt(shape[-1])
        return (scale * self._rng(name).standard_normal(shape)).astype(np.float32)

    def predictor(self) -> tuple[list, list, list]:
        """Per layer A (rank, d) and B (n, rank) over the slow and token blocks and the
        constant feature (rank slow_dims + token_dims + 1), and a simulated report."""
        d, k = self.args.hidden_size, self.j0  # A selects dims [0, j0]
        A = np.zeros((k + 1, d), np.float32)
        A[np.arange(k + 1), np.arange(k + 1)] = 1.0
        A_list, B_list, reports = [], [], []
        for layer in range(self.args.num_hidden_layers):
            neurons = self.neurons(layer)
            B = np.hstack(
                [
                    neurons["u"],
                    self.s.token_weight * neurons["v"],
                    neurons["predictor_bias"][:, None],
                ]
            )
            A_list.append(A)
            B_list.append((4.0 * B).astype(np.float32))  # sharper sigmoid, same set
            reports.append(simulate(self, layer, tokens=256, info=neurons)["report"])
        return A_list, B_list, reports

    def tokenizer(self) -> tuple[dict[str, bytes], dict]:
        """A byte-level tokenizer (any text encodes) padded to the vocabulary size."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        names = specials + alphabet
        names += [f"<extra_{i}>" for i in range(self.args.vocab_size - len(names))]
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(names)}, []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        info = {
            "file": "tokenizer.json",
            "bos_token_id": 2,
            "eos_token_ids": [2],
            "prepend_bos": True,
            "chat_template": None,
        }
        return {"tokenizer.json": tok.to_str().encode()}, info


def simulate(
    model: SyntheticOPT,
    layer: int,
    tokens: int = 512,
    neurons: int = 2048,
    start: int = 512,
    info: dict | None = None,
) -> dict:
    """Active and predicted sets of `neurons` neurons of a layer over `tokens` random
    tokens at consecutive positions, from the construction (not the model's forward):
    fractions per token, what a window of k tokens loads, predictor recall/precision."""
    info = info or model.neurons(layer)
    neurons = min(neurons, len(info["u"]))
    pick = model._rng("simulate", layer).choice(len(info["u"]), neurons, replace=False)
    u, v, r = info["u"][pick], info["v"][pick], info["r"][pick]
    slow, token, fast = model.sim_inputs(start, tokens, model._rng("sim-tokens"))
    seen = slow @ u.T + model.s.token_weight * token @ v.T
    active = seen + model.s.fast_weight * fast @ r.T + info["bias"][pick] > 0
    predicted = seen + info["predictor_bias"][pick] > 0
    k = model.s.window
    loaded = [
        np.count_nonzero(predicted[t] & ~predicted[t - k : t].any(axis=0))
        for t in range(k, tokens)
    ]
    hits = np.count_nonzero(active & predicted)
    return {
        "active": float(active.mean()),
        "predicted": float(predicted.mean()),
        "window_load": float(np.mean(loaded)) / neurons,
        "report": {
            "recall": hits / max(np.count_nonzero(active), 1),
            "precision": hits / max(np.count_nonzero(predicted), 1),
            "predicted_fraction": float(predicted.mean()),
            "true_fraction": float(active.mean()),
            "window": window_reuse(predicted),
            "rank": model.j0 + 1,
            "epochs": 0,
        },
    }


def calibrate_drift(model: SyntheticOPT) -> float:
    """The drift at which the middle layer's window loads `window_load` of the FFN per
    token (bisection in log space; loads grow with the drift)."""
    layer = model.args.num_hidden_layers // 2
    info = model.neurons(layer)
    lo, hi = model.drift_range
    for _ in range(30):
        mid = np.sqrt(lo * hi)
        model.set_drift(mid)
        if simulate(model, layer, info=info)["window_load"] < model.s.window_load:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))
