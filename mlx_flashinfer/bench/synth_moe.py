"""Synthetic mixtures of experts written straight to a layout (Mixtral's form: softmax
top-k routing, renormalised, no shared expert), for speed checks of the experts
placement on shapes too large to download here.

Every weight is random (seeded by its name) except what makes routing skewed, as real
routers are: every embedding row shares one direction u (norm `SHARED` beside its
random part), and expert e's router row is `bias_e * u` plus a random row orthogonal
to u, with bias_e falling with e's popularity rank as the log of a Zipf law, its
spread `skew` times that of the random part of the logits, so popular experts win
more tokens in every layer. Every other matrix reading the residual stream is made
blind to u, so that no fixed direction but u reaches a router (skew 0: uniform
popularity). Token-to-token reuse is only what that skew and the residual stream's
drift give: no temporal structure is built in, so the window's hits here are a
floor, not a measurement of a real model's. On moe-tiny, 48 random tokens: skew 0.5
(the default) gives the two most popular of 8 experts 26 and 23 of 96 routings in
layer 0, and a token shares 34% of its experts with the one before (uniform: 25%).
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..formats.args import ModelArgs
from ..formats.experts import router_name
from ..formats.shapes import expected_shapes

MOE_SHAPES = {
    "moe-tiny": dict(
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=512,
    ),
    # OLMoE-1B-7B's experts (64, top-8, 1024 neurons of d 2048) in 8 of its 16
    # layers, with a smaller vocabulary: 6.4 GB of experts at float16
    "olmoe-half": dict(
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_local_experts=64,
        num_experts_per_tok=8,
        vocab_size=8192,
    ),
    # OLMoE-1B-7B (allenai/OLMoE-1B-7B-0924): 16 layers of 64 experts of 1024
    # neurons at d 2048, top-8; 12.9 GB of experts at float16, 4.7 GB at q4
    "olmoe": dict(
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_local_experts=64,
        num_experts_per_tok=8,
        vocab_size=50304,
    ),
    # Qwen3-30B-A3B's sizes (48 layers of 128 experts of 768 neurons at d 2048, top-8,
    # 32 query and 4 key-value heads of 128); routed as Mixtral routes (Qwen3-MoE's
    # is the same softmax, top-k, renormalised), without its q/k norms. 21 GB of
    # experts at q4: `--layers` takes fewer
    "qwen3-30b-a3b": dict(
        hidden_size=2048,
        intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_local_experts=128,
        num_experts_per_tok=8,
        vocab_size=151936,
    ),
    # a small one for a quick check: 32 experts of 256 neurons, top-4, d 1024
    "moe-small": dict(
        hidden_size=1024,
        intermediate_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_local_experts=32,
        num_experts_per_tok=4,
        vocab_size=8192,
    ),
}
SHARED = 1.0  # norm of the embeddings' shared direction (their random part: ~1)


class SyntheticMoE:
    """A checkpoint-like source of a synthetic MoE (`write_layout` writes it)."""

    kind = "synthetic"

    def __init__(self, shape: str | dict, seed: int = 0, skew: float = 0.5):
        if isinstance(shape, str) and shape not in MOE_SHAPES:
            raise ValueError(
                f"unknown MoE shape {shape!r}: expected one of {', '.join(MOE_SHAPES)}"
            )
        sizes = MOE_SHAPES[shape] if isinstance(shape, str) else dict(shape)
        self.shape_name = shape if isinstance(shape, str) else "custom"
        self.sizes = sizes
        self.args = ModelArgs.from_hf_config(
            {
                "model_type": "mixtral",
                "max_position_embeddings": 4096,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "bos_token_id": 1,
                "eos_token_id": 2,
                **sizes,
            }
        )
        self.seed, self.skew = seed, skew
        self.shapes = expected_shapes(self.args)
        d = self.args.hidden_size
        self.u = self._rng("u").standard_normal(d).astype(np.float32)
        self.u /= np.linalg.norm(self.u)
        self.routers = {router_name(self.args, i) for i in range(len(self._layers))}

    @property
    def _layers(self) -> range:
        return range(self.args.num_hidden_layers)

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "shape": self.shape_name,
            **({} if self.shape_name in MOE_SHAPES else {"sizes": self.sizes}),
            "seed": self.seed,
            "skew": self.skew,
        }

    def _rng(self, *key) -> np.random.Generator:
        digest = hashlib.sha256(repr((self.seed, *key)).encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def tensor(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        rng = self._rng(name)
        if len(shape) == 1:  # norms
            return (1 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
        values = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[1])
        if name == "embed_tokens.weight":
            return values + SHARED * self.u
        if name in self.routers:  # popular experts first, in a per-layer order
            experts, d = shape
            bias = -np.log(np.arange(1, experts + 1))
            bias = (bias - bias.mean()) / max(bias.std(), 1e-9)
            # the normed input's u-part is about sqrt(d / 2): scaled so that the
            # bias's spread is `skew` times that of the random part's logits (4)
            bias *= self.skew * 4 * np.sqrt(2 / d)
            order = rng.permutation(experts)
            values -= np.outer(values @ self.u, self.u)  # only the bias sees u
            return values * 4 + np.outer(bias[order], self.u).astype(np.float32)
        if shape[1] == self.args.hidden_size and name != "lm_head.weight":
            # blind to u (attention, experts' gate and up rows): no layer turns the
            # shared direction into another fixed one, whose random router rows
            # would skew popularity at random
            values -= np.outer(values @ self.u, self.u)
        if ".self_attn." in name:
            return values * 0.5
        return values

    def tokenizer(self) -> tuple[dict[str, bytes], dict]:
        """A byte-level tokenizer padded to the vocabulary size (as synth_opt's)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        names = specials + sorted(pre_tokenizers.ByteLevel.alphabet())
        names += [f"<extra_{i}>" for i in range(self.args.vocab_size - len(names))]
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(names)}, []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        info = {
            "file": "tokenizer.json",
            "bos_token_id": 0,
            "eos_token_ids": [2],
            "prepend_bos": True,
            "chat_template": None,
        }
        return {"tokenizer.json": tok.to_str().encode()}, info


def write_synthetic_moe(
    dst,
    shape: str | dict = "moe-small",
    dtype: str = "float16",
    seed: int = 0,
    skew: float = 0.5,
    force: bool = False,
    progress: bool = True,
):
    """Write a synthetic MoE (module doc) as a layout at `dst`.

    Raises:
        ValueError: an unknown shape or dtype; FileExistsError: `dst` exists.
    """
    from ..formats.convert import _check_destination, write_layout

    _check_destination(dst, dtype, "bundled", force)
    source = SyntheticMoE(shape, seed, skew)
    return write_layout(source, dst, dtype, progress, "bundled", force)
