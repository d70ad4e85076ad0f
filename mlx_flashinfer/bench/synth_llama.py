"""Synthetic sparse Llama-family models with FATReLU (ProSparse-like, about 90% sparse).

The same construction as synth.py's OPT models (read its docstring first), changed where
Llama differs:
- No learned positions: the slow block S is filled by layer 0's attention. Its q/k
  weights are zero and its q/k biases sit on three RoPE frequency pairs (theta about
  0.05, 0.08, 0.13), so the attention score between positions t and s is
  A * sum_j cos((t - s) theta_j): a kernel peaked at s = t whose width falls as the
  sharpness A grows (three incommensurate periods keep it from repeating). Its values
  carry the token block T, and o_proj writes the kernel-weighted average of the last
  tokens' T into S. So S drifts as the context window moves; the drift knob is A. Other
  layers' attention is tiny.
- No FFN biases: a neuron fires when its gate pre-activation exceeds the FATReLU
  threshold t, so neuron i's gate row is scaled by t / (its analytic firing point),
  which sets its rate p_i exactly as the OPT biases do. Up rows are random, down rows
  tiny.
- No constant feature: the predictor (rank slow_dims + token_dims) compares B(A h) with
  logit(0.75) > 0, B's rows being scaled so that the cut falls at the firing point.
Defaults: about 10% of neurons active (7% first layer to 13% last), the predictor
predicts 2x, and the window is k = 2 as the paper uses for Llama 2; its load target
(5% of the FFN per token) is our choice: the paper gives none for Llama.
"""

from __future__ import annotations

import math

import numpy as np

from ..formats.args import ModelArgs
from ..formats.shapes import expected_shapes
from .synth_opt import Structure, SyntheticOPT, calibrate_drift, simulate

LLAMA_SHAPES = {
    "llama-tiny": dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
    ),
    "llama2-7b-relu": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}
FATRELU_THRESHOLD = 0.01
PREDICTOR_THRESHOLD = 0.75
KERNEL_THETAS = (0.05, 0.081, 0.131)


def llama_structure() -> Structure:
    return Structure(
        active_first=0.07,
        active_last=0.13,
        predicted_ratio=2.0,
        window=2,
        window_load=0.05,
    )


class SyntheticLlama(SyntheticOPT):
    """Llama-family counterpart of SyntheticOPT (same interface)."""

    drift_range = (0.05, 200.0)
    # below one half, so firing and predicting points stay positive (bias-free gates)
    max_rate, max_predicted = 0.45, 0.45
    predictor_threshold = PREDICTOR_THRESHOLD

    def __init__(
        self, shape: str | dict, structure: Structure | None = None, seed: int = 0
    ):
        if isinstance(shape, str) and shape not in LLAMA_SHAPES:
            raise ValueError(
                f"unknown shape {shape!r}: expected one of "
                f"{', '.join(LLAMA_SHAPES)} or custom sizes"
            )
        sizes = LLAMA_SHAPES[shape] if isinstance(shape, str) else dict(shape)
        self.shape_name = shape if isinstance(shape, str) else "custom"
        self.args = ModelArgs.from_hf_config(
            {
                "model_type": "llama",
                "hidden_act": "fatrelu",
                "hidden_act_param": FATRELU_THRESHOLD,
                "attention_bias": True,
                "rope_theta": 10000.0,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
                **sizes,
            }
        )
        s = self.s = structure or llama_structure()
        d = self.args.hidden_size
        s.slow_dims = s.slow_dims or min(128, d // 4) // 2 * 2
        s.token_dims = s.token_dims or max(1, min(32, d // 16))
        self.seed = seed
        self.shapes = expected_shapes(self.args)
        ds, dt = s.slow_dims, s.token_dims
        self.slow, self.token = slice(0, ds), slice(ds, ds + dt)
        self.j0 = ds + dt - 1  # predictor rank j0 + 1 = ds + dt: no constant feature
        self.fast = slice(ds + dt, d)
        self.ln_std = np.sqrt((d - ds + ds * s.slow_scale**2) / d)  # RMS of e + slow
        hd = self.args.head_dim
        inv_freq = self.args.rope_theta ** (-np.arange(0, hd, 2) / hd)
        self.pairs = [int(np.argmin(np.abs(inv_freq - t))) for t in KERNEL_THETAS]
        self.thetas = inv_freq[self.pairs]
        self.mixing = self._rng("mixing").standard_normal((ds, dt)) / np.sqrt(dt)
        if s.drift is None:
            s.drift = calibrate_drift(self)
        self.set_drift(s.drift)

    # -- the structure --------------------------------------------------------------
    def set_drift(self, value: float) -> None:
        self.sharpness = value
        # scale so that the averaged slow block has per-dim std slow_scale
        self.out_scale = self.s.slow_scale / math.sqrt(self._kernel_energy(512))

    def _weights(self, t: int) -> np.ndarray:
        """Layer 0's attention weights of position t over positions 0..t."""
        delta = t - np.arange(t + 1)
        scores = self.sharpness * np.cos(np.outer(delta, self.thetas)).sum(axis=1)
        w = np.exp(scores - scores.max())
        return w / w.sum()

    def _kernel_energy(self, t: int) -> float:
        return float(np.sum(self._weights(t) ** 2))

    def sim_inputs(self, start: int, tokens: int, rng) -> tuple:
        total = start + tokens
        history = rng.standard_normal((total, self.s.token_dims))  # e_T of each token
        mixed = history @ self.mixing.T  # what layer 0's values carry into S
        slow = np.stack(
            [self._weights(t) @ mixed[: t + 1] for t in range(start, total)]
        )
        slow *= self.out_scale / self.ln_std
        token = history[start:] / self.ln_std
        width = self.fast.stop - self.fast.start
        return slow, token, rng.standard_normal((tokens, width)) / self.ln_std

    # -- tensors ----------------------------------------------------------------------
    def tensor(self, name: str) -> np.ndarray:
        shape, d = self.shapes[name], self.args.hidden_size
        if name == "embed_tokens.weight":
            out = np.zeros(shape, np.float32)
            out[:, self.s.slow_dims :] = self._rng("embed").standard_normal(
                (shape[0], d - self.s.slow_dims), dtype=np.float32
            )
            return out
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        if name == "lm_head.weight":
            return self._rng(name).standard_normal(
                shape, dtype=np.float32
            ) / np.float32(np.sqrt(d))
        layer = int(name.split(".")[1])
        hd, heads = self.args.head_dim, self.args.num_attention_heads
        if layer == 0 and name.endswith(("q_proj.bias", "k_proj.bias")):
            out = np.zeros(shape, np.float32)
            amplitude = math.sqrt(self.sharpness * math.sqrt(hd))
            for h in range(heads):
                out[h * hd + np.array(self.pairs)] = amplitude
            return out
        if layer == 0 and name.endswith("v_proj.weight"):  # token block -> each head
            out = np.zeros(shape, np.float32)
            out[:, self.token] = self._rng("v").standard_normal(
                (shape[0], self.s.token_dims)
            ) / np.sqrt(self.s.token_dims)
            return out
        if layer == 0 and name.endswith("o_proj.weight"):  # heads -> slow block
            out = np.zeros(shape, np.float32)
            out[self.slow] = self._o_rows()
            return out
        if name.endswith(".bias") or (
            layer == 0 and name.endswith(("q_proj.weight", "k_proj.weight"))
        ):
            return np.zeros(shape, np.float32)
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            return self._ffn_rows(layer, up=name.endswith("up_proj.weight"))
        # other attention weights and down_proj: tiny, the residual stays e + slow
        scale = 1e-3 / np.sqrt(shape[-1])
        return (scale * self._rng(name).standard_normal(shape)).astype(np.float32)

    def _o_rows(self) -> np.ndarray:
        """o_proj rows of S such that o_proj @ v_proj restricted to T is `mixing`
        (scaled), so layer 0 writes out_scale * kernel-average of mixing @ h_T."""
        v = self.tensor("layers.0.self_attn.v_proj.weight")[:, self.token]  # (d, dt)
        # least-squares right inverse: o @ v = mixing  ->  o = mixing @ pinv(v)
        embed_rms = np.sqrt(
            (self.args.hidden_size - self.s.slow_dims) / self.args.hidden_size
        )
        target = self.out_scale * embed_rms * self.mixing
        return (target @ np.linalg.pinv(v)).astype(np.float32)

    def _ffn_rows(self, layer: int, up: bool) -> np.ndarray:
        n, d = self.args.intermediate_size, self.args.hidden_size
        if up:
            rows = self._rng("up", layer).standard_normal((n, d), dtype=np.float32)
            return rows / np.float32(np.sqrt(d))
        info = self.neurons(layer)
        rows = np.zeros((n, d), np.float32)
        rows[:, self.slow] = info["u"]
        rows[:, self.token] = self.s.token_weight * info["v"]
        rows[:, self.fast] = self.s.fast_weight * info["r"]
        # fires when rows.h > -bias: scale so that happens exactly at the threshold
        rows *= (FATRELU_THRESHOLD / -info["bias"])[:, None].astype(np.float32)
        return rows

    def predictor(self) -> tuple[list, list, list]:
        """Per layer A (selects S and T), B (n, ds + dt) and a simulated report."""
        rank, d = self.j0 + 1, self.args.hidden_size
        A = np.zeros((rank, d), np.float32)
        A[np.arange(rank), np.arange(rank)] = 1.0
        cut = math.log(PREDICTOR_THRESHOLD / (1 - PREDICTOR_THRESHOLD))
        A_list, B_list, reports = [], [], []
        for layer in range(self.args.num_hidden_layers):
            info = self.neurons(layer)
            B = np.hstack([info["u"], self.s.token_weight * info["v"]])
            B *= (cut / -info["predictor_bias"])[:, None]  # cut at the firing point
            A_list.append(A)
            B_list.append(B.astype(np.float32))
            reports.append(simulate(self, layer, tokens=256, info=info)["report"])
        return A_list, B_list, reports

    def tokenizer(self) -> tuple[dict[str, bytes], dict]:
        files, info = super().tokenizer()
        return files, {**info, "bos_token_id": 1}
