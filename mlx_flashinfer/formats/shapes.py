"""What tensors a model needs: every tensor's canonical name and shape, the FFN's
parts per layer, RoPE's frequency divisors; a checkpoint checked against them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .args import ModelArgs
from .experts import moe_expected_shapes
from .families import LONGROPE, attention_shapes, variant_shapes


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of `args` needs, canonical name -> shape (out, in)."""
    d, f, v = args.hidden_size, args.intermediate_size, args.vocab_size
    if args.is_moe:
        return moe_expected_shapes(args)
    if args.family == "llama":
        shapes = {"embed_tokens.weight": (v, d), "norm.weight": (d,)}
        if not args.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, d)
        for i in range(args.num_hidden_layers):
            p = f"layers.{i}."
            attention = attention_shapes(
                args,
                p,
                qkv_bias=args.attention_bias or args.qkv_bias,
                o_bias=args.attention_bias,
                qk_norm="head" if args.qk_norm else None,
            )
            shapes |= {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                **attention,
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            }
            shapes |= variant_shapes(args, p)
        return shapes
    e = args.word_embed_proj_dim or d
    shapes = {
        "embed_tokens.weight": (v, e),
        "embed_positions.weight": (args.max_position_embeddings + 2, d),
    }
    if args.word_embed_proj_dim:
        shapes |= {"project_in.weight": (d, e), "project_out.weight": (e, d)}
    if args.do_layer_norm_before:
        shapes |= {"final_layer_norm.weight": (d,), "final_layer_norm.bias": (d,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, e)
    for i in range(args.num_hidden_layers):
        p = f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {
                p + f"self_attn.{proj}.weight": (d, d),
                p + f"self_attn.{proj}.bias": (d,),
            }
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes |= {p + f"{norm}.weight": (d,), p + f"{norm}.bias": (d,)}
        shapes |= {
            p + "fc1.weight": (f, d),
            p + "fc1.bias": (f,),
            p + "fc2.weight": (d, f),
            p + "fc2.bias": (d,),
        }
    return shapes


def ffn_parts(args: ModelArgs, layer: int) -> list[tuple[str, bool]]:
    """(tensor name, transposed?) per bundle part: rows of up/gate/fc1, columns of
    down/fc2."""
    p = f"layers.{layer}."
    if args.family == "llama":
        return [
            (p + "mlp.gate_proj.weight", False),
            (p + "mlp.up_proj.weight", False),
            (p + "mlp.down_proj.weight", True),
        ]
    return [(p + "fc1.weight", False), (p + "fc2.weight", True)]


def rope_divisors(args: ModelArgs) -> np.ndarray | None:
    """Per-frequency divisors of the RoPE inverse frequencies for `rope_scaling`.

    Linear scaling divides every frequency by `factor`; Llama 3 scaling divides only the
    low frequencies, smoothly. Stored in the layout as `rope_freqs` (GGUF's name for the
    same).
    """
    scaling = args.rope_scaling
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in LONGROPE:  # picked by the context at load (families.longrope)
        return None
    half = args.head_dim // 2
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return np.full(half, factor, dtype=np.float32)
    if kind != "llama3":
        raise ValueError(
            f"unsupported rope_scaling type {kind!r}: linear and llama3 are"
        )
    inv_freq = args.rope_theta ** (
        -np.arange(0, half, dtype=np.float64) * 2 / args.head_dim
    )
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return (inv_freq / scaled).astype(np.float32)


def check_complete(shapes: dict, args: ModelArgs, where: Path) -> None:
    for name, shape in expected_shapes(args).items():
        if name not in shapes:
            raise ValueError(f"{where}: checkpoint lacks tensor {name}")
        if tuple(shapes[name]) != shape:
            raise ValueError(
                f"{where}: tensor {name} has shape {tuple(shapes[name])}, "
                f"expected {shape}"
            )
