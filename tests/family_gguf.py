"""GGUF files of the Llama family's variants (tiny_models.family_configs), written as
llama.cpp's convert_hf_to_gguf.py writes them: q/k rows not permuted (only its Llama
models are), Gemma's norms with their 1 added, Phi-3's qkv and gate/up kept fused,
Gemma's and Phi-3's settings as metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tiny_models import GGUF_LAYER_NAMES, write_gguf_sizes

ARCH = {"gemma3_text": "gemma3"}
_VARIANT_NAMES = {  # Hugging Face layer tensor -> GGUF, where not Llama's
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
}
_GEMMA_NAMES = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_TOP = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_tensor_name(arch: str, hf_name: str) -> str:
    name = hf_name.removeprefix("model.")
    if name in _TOP:
        return _TOP[name]
    _, layer, rest = name.split(".", 2)
    names = GGUF_LAYER_NAMES | _VARIANT_NAMES
    if arch.startswith("gemma"):
        names |= _GEMMA_NAMES
    return f"blk.{layer}.{names[rest]}"


def write_family_gguf(path: Path, config: dict, weights: dict, qtype=None) -> Path:
    """A GGUF of a variant's tiny checkpoint (config and weights as tiny_models
    makes them; vocab_size at least 259, the byte-level vocabulary): float32, or
    its matrices quantized to `qtype` (a gguf.GGMLQuantizationType)."""
    import gguf
    from tokenizers import pre_tokenizers

    arch = ARCH.get(config["model_type"], config["model_type"])
    writer = gguf.GGUFWriter(str(path), arch)
    d, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    write_gguf_sizes(writer, {**config, "head_dim": head_dim})
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    if arch == "phi3":
        rotary = int(head_dim * config.get("partial_rotary_factor", 1.0))
        writer.add_rope_dimension_count(rotary)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("type") == "longrope":  # as llama.cpp's Phi-3 converter
        original = config["original_max_position_embeddings"]
        factor = config["max_position_embeddings"] / original
        writer.add_rope_scaling_attn_factors(
            float(np.sqrt(1 + np.log(factor) / np.log(original)))
        )
        writer.add_rope_scaling_orig_ctx_len(original)
        for kind in ("long", "short"):
            factors = np.array(scaling[f"{kind}_factor"], dtype=np.float32)
            writer.add_tensor(f"rope_factors_{kind}.weight", factors)
    elif scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [f"<extra_{i}>" for i in range(config["vocab_size"] - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * (len(tokens) - 256))
    writer.add_token_merges([])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(258)
    for name, array in weights.items():
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            array = array + 1  # llama.cpp stores Gemma's norms as 1 + weight
        name, array = gguf_tensor_name(arch, name), array.astype(np.float32)
        if qtype is None or array.ndim == 1:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
