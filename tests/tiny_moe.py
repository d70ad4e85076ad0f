"""Tiny mixture-of-experts checkpoints, in the Hugging Face hub's naming (one tensor
per expert, as Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE are published).

Nothing downloads: weights are random (`tiny_models.write_hf_checkpoint` writes them
with a WordLevel tokenizer). `tools/make_moe_golden.py` runs the same checkpoints
through transformers for the fixtures in tests/golden/moe/.
"""

from __future__ import annotations

import numpy as np

BASE = {
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 40,
    "max_position_embeddings": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def moe_config(family: str, experts: int = 6, top_k: int = 2, **overrides) -> dict:
    """A config.json dict of a tiny MoE model of `family` ("mixtral", "qwen3_moe",
    "qwen2_moe", "olmoe", "granitemoe", "granitemoeshared")."""
    config = dict(BASE, model_type=family)
    if family == "mixtral":
        config |= {
            "intermediate_size": 24,
            "num_local_experts": experts,
            "num_experts_per_tok": top_k,
        }
    elif family in ("qwen3_moe", "qwen2_moe"):
        config |= {
            "intermediate_size": 40,  # dense layers' (none here)
            "moe_intermediate_size": 24,
            "num_experts": experts,
            "num_experts_per_tok": top_k,
            "norm_topk_prob": family == "qwen3_moe",
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
        if family == "qwen3_moe":
            config |= {"head_dim": 8, "attention_bias": False}
        else:
            config |= {"shared_expert_intermediate_size": 32, "qkv_bias": True}
    elif family in ("granitemoe", "granitemoeshared"):  # granite-3.0-1b-a400m's
        config |= {
            "intermediate_size": 24,
            "num_local_experts": experts,
            "num_experts_per_tok": top_k,
            "embedding_multiplier": 12.0,
            "attention_multiplier": 0.015625 * 16,  # its 1/64, for head_dim 4
            "residual_multiplier": 0.22,
            "logits_scaling": 6.0,
            "tie_word_embeddings": True,
        }
        if family == "granitemoeshared":
            config["shared_intermediate_size"] = 32
    elif family == "olmoe":
        config |= {
            "intermediate_size": 24,
            "num_experts": experts,
            "num_experts_per_tok": top_k,
            "norm_topk_prob": False,
            "clip_qkv": None,
        }
    else:
        raise ValueError(f"no tiny MoE config for {family!r}")
    config.update(overrides)
    return config


def tiny_moe_configs() -> dict[str, dict]:
    """One tiny model per family (and Qwen3-MoE without renormalisation)."""
    return {
        "mixtral": moe_config("mixtral"),
        "qwen3-moe": moe_config("qwen3_moe"),
        "qwen3-moe-unnormed": moe_config("qwen3_moe", experts=5, norm_topk_prob=False),
        "qwen2-moe": moe_config("qwen2_moe"),
        "olmoe": moe_config("olmoe", experts=8, top_k=3),
        "granitemoe": moe_config("granitemoe", experts=5),
    }


def hf_only_moe_configs() -> dict[str, dict]:
    """Families tested apart from the others (test_granite_shared.py): Granite-MoE
    with a shared expert (no mlx-community form; its GGUF is llama.cpp's granitemoe
    with *_shexp tensors)."""
    return {"granitemoeshared": moe_config("granitemoeshared", experts=5)}


def moe_weights(config: dict, seed: int = 0) -> dict:
    """Random float32 weights under the hub's tensor names."""
    rng = np.random.default_rng(seed)
    family = config["model_type"]
    d, v = config["hidden_size"], config["vocab_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    f = config.get("moe_intermediate_size") or config["intermediate_size"]
    experts = config.get("num_local_experts") or config["num_experts"]

    def w(*shape, scale=None):
        scale = scale or 1 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    out = {
        "model.embed_tokens.weight": w(v, d, scale=0.5),
        "model.norm.weight": norm(d),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = norm(d)
        out[p + "post_attention_layernorm.weight"] = norm(d)
        for name, shape in (("q", (q, d)), ("k", (kv, d)), ("v", (kv, d))):
            out[p + f"self_attn.{name}_proj.weight"] = w(*shape)
            if config.get("qkv_bias"):
                out[p + f"self_attn.{name}_proj.bias"] = w(shape[0], scale=0.1)
        out[p + "self_attn.o_proj.weight"] = w(d, q)
        if family == "qwen3_moe":
            out[p + "self_attn.q_norm.weight"] = norm(hd)
            out[p + "self_attn.k_norm.weight"] = norm(hd)
        if family == "olmoe":
            out[p + "self_attn.q_norm.weight"] = norm(q)
            out[p + "self_attn.k_norm.weight"] = norm(kv)
        # a router scaled up so that its choices are clear, not near-ties
        if family.startswith("granitemoe"):  # experts stacked, gate and up rows fused
            m = p + "block_sparse_moe."
            out[m + "router.layer.weight"] = w(experts, d, scale=1.0)
            out[m + "input_linear.weight"] = w(experts, 2 * f, d)
            out[m + "output_linear.weight"] = w(experts, d, f)
            if fs := config.get("shared_intermediate_size"):  # granitemoeshared
                out[p + "shared_mlp.input_linear.weight"] = w(2 * fs, d)
                out[p + "shared_mlp.output_linear.weight"] = w(d, fs)
            continue
        if family == "mixtral":
            m = p + "block_sparse_moe."
            out[m + "gate.weight"] = w(experts, d, scale=1.0)
            for e in range(experts):
                out[m + f"experts.{e}.w1.weight"] = w(f, d)
                out[m + f"experts.{e}.w3.weight"] = w(f, d)
                out[m + f"experts.{e}.w2.weight"] = w(d, f)
            continue
        m = p + "mlp."
        out[m + "gate.weight"] = w(experts, d, scale=1.0)
        for e in range(experts):
            out[m + f"experts.{e}.gate_proj.weight"] = w(f, d)
            out[m + f"experts.{e}.up_proj.weight"] = w(f, d)
            out[m + f"experts.{e}.down_proj.weight"] = w(d, f)
        if family == "qwen2_moe":
            fs = config["shared_expert_intermediate_size"]
            out[m + "shared_expert.gate_proj.weight"] = w(fs, d)
            out[m + "shared_expert.up_proj.weight"] = w(fs, d)
            out[m + "shared_expert.down_proj.weight"] = w(d, fs)
            out[m + "shared_expert_gate.weight"] = w(1, d)
    if not config.get("tie_word_embeddings", False):
        out["lm_head.weight"] = w(v, d)
    return out
