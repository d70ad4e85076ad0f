"""Tiny checkpoints built in tests, in exact Hugging Face naming (and as GGUF files).

Nothing downloads: weights are random, tokenizers are small WordLevel vocabularies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# the q/k row permutation llama.cpp's converter applies (its interleaved RoPE)
from mlx_flashinfer.bench.synth_moe_gguf import llama_cpp_permute


def has_mlx() -> bool:
    """Whether the MLX backend can be used here (tests skip its cases otherwise)."""
    from mlx_flashinfer.model.backends import get_backend

    try:
        get_backend("mlx")
    except ImportError:
        return False
    return True


WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "it",
    "that",
    "alice",
    "rabbit",
    "queen",
    "king",
    "cat",
    "said",
    "she",
    "he",
]


def tiny_config(family: str = "llama", act: str = "relu", **overrides) -> dict:
    """A Hugging Face config.json dict of a tiny model."""
    if family == "opt":
        config = {
            "model_type": "opt",
            "hidden_size": 16,
            "ffn_dim": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 40,
            "max_position_embeddings": 64,
            "activation_function": "relu",
            "do_layer_norm_before": True,
            "word_embed_proj_dim": 16,
            "enable_bias": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "unknown_key_from_the_future": [1, 2, 3],
        }
    else:
        config = {
            "model_type": "llama",
            "hidden_size": 16,
            "intermediate_size": 40,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 40,
            "max_position_embeddings": 64,
            "hidden_act": act,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "unknown_key_from_the_future": {"x": 1},
        }
        if act == "fatrelu":
            config["hidden_act_param"] = 0.05
    config.update(overrides)
    return config


TOKENS = [
    1,
    5,
    9,
    3,
    22,
    17,
    4,
    30,
    2,
    11,
    39,
    0,
]  # a test sequence for every tiny model


def tiny_model_configs() -> dict[str, dict]:
    """Every family and activation, plus OPT post-LN with projections and tied GQA
    Llama."""
    configs = {
        f"llama-{a}": tiny_config("llama", a)
        for a in ("silu", "relu", "fatrelu", "relu2", "drelu")
    }
    configs["opt-relu"] = tiny_config("opt")
    configs["opt-350m-like"] = tiny_config(
        "opt", word_embed_proj_dim=8, do_layer_norm_before=False
    )
    configs["llama-tied-gqa1"] = tiny_config(
        "llama", "silu", num_key_value_heads=1, tie_word_embeddings=True
    )
    return configs | family_configs()


def family_configs() -> dict[str, dict]:
    """The Llama family's variants (formats/families.py) as Hub configs state them:
    Qwen2 (q/k/v biases, tied), Qwen3 (q/k norms, head_dim from the config), Phi-3
    (fused qkv and gate/up, every layer sliding), Gemma 2 (GeGLU, sandwich norms,
    soft caps, sliding and global layers), Gemma 3 (q/k norms, two RoPE bases)."""
    base = {k: v for k, v in tiny_config("llama", "silu").items() if "unknown" not in k}
    gemma = {
        "hidden_activation": "gelu_pytorch_tanh",
        "head_dim": 8,
        "query_pre_attn_scalar": 6,
        "sliding_window": 4,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
    }
    return {
        "qwen2": base
        | {"model_type": "qwen2", "tie_word_embeddings": True, "rope_theta": 1e6},
        "qwen3": base | {"model_type": "qwen3", "head_dim": 8},
        "phi3": base | {"model_type": "phi3", "sliding_window": 5, "pad_token_id": 0},
        "gemma2": base
        | gemma
        | {
            "model_type": "gemma2",
            "attn_logit_softcapping": 1.5,
            "final_logit_softcapping": 3.0,
        },
        "gemma3": base
        | gemma
        | {
            "model_type": "gemma3_text",
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_local_base_freq": 100.0,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        },
    }


def random_weights(config: dict, seed: int = 0, prefix: str = "model.") -> dict:
    """Random float32 weights named as the Hugging Face checkpoint names them."""
    rng = np.random.default_rng(seed)
    d, v = config["hidden_size"], config["vocab_size"]

    def w(*shape, scale=None):
        scale = scale or 1 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    out = {}
    if config["model_type"] == "opt":
        f, e = config["ffn_dim"], config.get("word_embed_proj_dim") or d
        base = prefix + "decoder."
        out[base + "embed_tokens.weight"] = w(v, e, scale=0.5)
        out[base + "embed_positions.weight"] = w(
            config["max_position_embeddings"] + 2, d, scale=0.1
        )
        if e != d:
            out[base + "project_in.weight"] = w(d, e)
            out[base + "project_out.weight"] = w(e, d)
        if config.get("do_layer_norm_before", True):
            out[base + "final_layer_norm.weight"] = norm(d)
            out[base + "final_layer_norm.bias"] = w(d, scale=0.1)
        for i in range(config["num_hidden_layers"]):
            p = f"{base}layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[p + f"self_attn.{proj}.weight"] = w(d, d)
                out[p + f"self_attn.{proj}.bias"] = w(d, scale=0.1)
            for ln in ("self_attn_layer_norm", "final_layer_norm"):
                out[p + f"{ln}.weight"] = norm(d)
                out[p + f"{ln}.bias"] = w(d, scale=0.1)
            out[p + "fc1.weight"] = w(f, d)
            out[p + "fc1.bias"] = w(f, scale=0.3)
            out[p + "fc2.weight"] = w(d, f)
            out[p + "fc2.bias"] = w(d, scale=0.1)
        if not config.get("tie_word_embeddings", True):
            out["lm_head.weight"] = w(v, e)
        return out
    f = config["intermediate_size"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q = config["num_attention_heads"] * hd
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * hd
    out[prefix + "embed_tokens.weight"] = w(v, d, scale=0.5)
    out[prefix + "norm.weight"] = norm(d)
    for i in range(config["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        out[p + "input_layernorm.weight"] = norm(d)
        out[p + "post_attention_layernorm.weight"] = norm(d)
        out[p + "self_attn.q_proj.weight"] = w(q, d)
        out[p + "self_attn.k_proj.weight"] = w(kv, d)
        out[p + "self_attn.v_proj.weight"] = w(kv, d)
        out[p + "self_attn.o_proj.weight"] = w(d, q)
        out[p + "mlp.gate_proj.weight"] = w(f, d)
        out[p + "mlp.up_proj.weight"] = w(f, d)
        out[p + "mlp.down_proj.weight"] = w(d, f)
    if not config.get("tie_word_embeddings", False):
        out["lm_head.weight"] = w(v, d)
    return _variant_weights(config, out, rng, prefix)


def longrope_configs() -> dict[str, dict]:
    """Phi-3.5 / Phi-4-mini shaped: LongRoPE (short factors within the pretraining
    context of 32, long ones past it) on half of each head (partial rotary). Their
    golden logits (tests/golden/longrope/) hold a run past that context too."""
    config = family_configs()["phi3"] | {
        "hidden_size": 32,
        "original_max_position_embeddings": 32,
        "partial_rotary_factor": 0.5,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": [1.1, 2.0],
            "long_factor": [1.5, 4.0],
        },
    }
    return {"phi3-longrope": config}


def _variant_weights(config: dict, out: dict, rng, prefix: str) -> dict:
    """Llama-named weights made into a variant's (family_configs): added biases and
    norms, fused projections."""
    kind = config["model_type"]
    if kind == "llama":
        return out
    hd = (
        config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    )
    gemma = kind.startswith("gemma")

    def norm(n):  # Gemma stores (weight - 1): RMSNorm multiplies by 1 + weight
        return (float(not gemma) + 0.2 * rng.standard_normal(n)).astype(np.float32)

    for i in range(config["num_hidden_layers"]):
        p = f"{prefix}layers.{i}."
        if kind == "qwen2":
            for proj in ("q_proj", "k_proj", "v_proj"):
                rows = out[p + f"self_attn.{proj}.weight"].shape[0]
                out[p + f"self_attn.{proj}.bias"] = (
                    0.3 * rng.standard_normal(rows)
                ).astype(np.float32)
        if kind in ("qwen3", "gemma3_text"):
            out[p + "self_attn.q_norm.weight"] = norm(hd)
            out[p + "self_attn.k_norm.weight"] = norm(hd)
        if gemma:
            names = ["input_layernorm", "post_attention_layernorm"]
            names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
            for name in names:
                out[p + name + ".weight"] = norm(config["hidden_size"])
        if kind == "phi3":
            qkv = [out.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
            out[p + "self_attn.qkv_proj.weight"] = np.concatenate(qkv)
            gate_up = [out.pop(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
            out[p + "mlp.gate_up_proj.weight"] = np.concatenate(gate_up)
    if gemma:
        out[prefix + "norm.weight"] = norm(config["hidden_size"])
    return out


def tiny_tokenizer_json() -> str:
    """A WordLevel tokenizer over WORDS with <unk>, <s>, </s> at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return tok.to_str()


def write_hf_checkpoint(
    path: Path,
    config: dict,
    weights: dict,
    shards: int = 1,
    chat_template: str | None = None,
) -> Path:
    """Write config.json, safetensors (sharded with an index when shards > 1),
    tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    names = list(weights)
    if shards == 1:
        save_file(weights, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = names[k::shards]
            save_file({n: weights[n] for n in part}, str(path / file))
            weight_map |= {n: file for n in part}
        index = {"metadata": {}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "tokenizer.json").write_text(tiny_tokenizer_json())
    tok_config = {"bos_token": "<s>", "eos_token": "</s>"}
    if chat_template:
        tok_config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return path


GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    name = hf_name.removeprefix("model.")
    top = {
        "embed_tokens.weight": "token_embd.weight",
        "norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if name in top:
        return top[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}"


def write_gguf_sizes(writer, config: dict) -> None:
    """The metadata every architecture's GGUF has: sizes, heads (and their size
    where config.json gives one), RoPE base, norm epsilon, vocabulary."""
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])


def write_gguf(
    path: Path, config: dict, weights: dict, qtype_of=None, block_scales=(0.01, 0.002)
) -> Path:
    """Write a Llama GGUF as llama.cpp's converter would (q/k permuted, byte-level
    vocab).

    `qtype_of(name, array)` picks a gguf.GGMLQuantizationType per tensor (default F32).
    K-quant types the gguf package cannot quantize get random blocks whose float16
    super-block scales are `block_scales` (d, dmin); the tests compare against
    gguf's own dequantization of whatever was written.
    """
    import gguf
    from tokenizers import pre_tokenizers

    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(str(path), "llama")
    write_gguf_sizes(writer, config)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += (
        [f"<extra_{i}>" for i in range(config["vocab_size"] - len(tokens))]
        if len(tokens) < config["vocab_size"]
        else []
    )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * (len(tokens) - 256))
    writer.add_token_merges([])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    q_heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for name, array in weights.items():
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, q_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, kv_heads)
        qtype = qtype_of(name, array) if qtype_of else gguf.GGMLQuantizationType.F32
        if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name(name), array.astype(np.float16))
        elif qtype.name in BLOCK_SCALES_AT:
            raw = random_blocks(rng, qtype, array.shape, *block_scales)
            writer.add_tensor(gguf_name(name), raw, raw_dtype=qtype)
        else:
            quant = gguf.quants.quantize(array, qtype)
            writer.add_tensor(gguf_name(name), quant, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


BLOCK_SCALES_AT = {  # random-block types: byte offsets of d and dmin in a block
    "Q2_K": (-4, -2),
    "Q3_K": (-2, None),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (-2, None),
    "IQ4_NL": (0, None),
    "IQ4_XS": (0, None),
}


def random_blocks(rng, qtype, shape, d: float, dmin: float = 0.0) -> np.ndarray:
    """Random K-quant (or IQ4) blocks of a (rows, cols) matrix, uint8 (rows, bytes):
    every field random but the float16 super-block scales, set to d and dmin."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for at, value in zip(BLOCK_SCALES_AT[qtype.name], (d, dmin), strict=True):
        if at is not None:
            end = at + 2 if at + 2 else None
            blocks[:, at:end] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return raw
