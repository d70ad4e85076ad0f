"""GGUF files of the tiny mixtures of experts (tiny_moe.py), written as llama.cpp's
convert_hf_to_gguf.py writes them: a layer's experts stacked into
ffn_{gate,up,down}_exps once all of them are read (Granite's input_linear split
into gate and up), the router ffn_gate_inp (kept float32, as llama.cpp's quantizer
keeps it), Qwen2-MoE's shared expert *_shexp, q/k rows permuted for the "llama"
(Mixtral) and "granitemoe" architectures only, the routing and Granite's
multipliers as metadata (Granite-MoE with a shared MLP: llama.cpp's granitemoe, its
shared input_linear split into ffn_{gate,up}_shexp). Layers named in `per_expert`
are written as the first Mixtral GGUFs were, each expert's matrices a tensor of its
own (`blk.N.ffn_gate.E.weight`). The tokenizer is a SentencePiece one over
tiny_models' words, so token ids are the Hugging Face checkpoint's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tiny_models import GGUF_LAYER_NAMES, WORDS, llama_cpp_permute, write_gguf_sizes

ARCH = {
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "olmoe": "olmoe",
    "granitemoe": "granitemoe",
    "granitemoeshared": "granitemoe",  # its shared MLP as *_shexp tensors
}
# a dense layer's names (but its FFN), and what a mixture of experts adds
_LAYER = {k: v for k, v in GGUF_LAYER_NAMES.items() if not k.startswith("mlp.")} | {
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    "block_sparse_moe.router.layer.weight": "ffn_gate_inp.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
# an expert's Hugging Face part -> its stack
_STACK = {
    "w1": "ffn_gate_exps",
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
}
_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_tensors(
    config: dict, weights: dict, per_expert: tuple[int, ...] = ()
) -> dict[str, np.ndarray]:
    """The GGUF tensors of a tiny MoE checkpoint, name -> float32 array, in the
    order llama.cpp's converter writes them (a stack once its last expert is read;
    in the layers of `per_expert`, each expert's tensors as read)."""
    arch = ARCH[config["model_type"]]
    experts = config.get("num_local_experts") or config["num_experts"]
    heads = {"q": config["num_attention_heads"], "k": config["num_key_value_heads"]}
    out, pending = {}, {}
    for name, array in weights.items():
        if name in _TOP:
            out[_TOP[name]] = array
            continue
        _, _, layer, rest = name.split(".", 3)
        blk = f"blk.{layer}."
        if arch in ("llama", "granitemoe") and rest in (
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
        ):
            array = llama_cpp_permute(array, heads[rest[10]])
        if rest == "shared_mlp.input_linear.weight":  # Granite's shared: gate, up
            f = array.shape[0] // 2
            out[blk + "ffn_gate_shexp.weight"] = array[:f]
            out[blk + "ffn_up_shexp.weight"] = array[f:]
        elif rest == "shared_mlp.output_linear.weight":
            out[blk + "ffn_down_shexp.weight"] = array
        elif rest.endswith("input_linear.weight"):  # Granite: gate rows, then up rows
            f = array.shape[1] // 2
            out[blk + "ffn_gate_exps.weight"] = array[:, :f]
            out[blk + "ffn_up_exps.weight"] = array[:, f:]
        elif rest.endswith("output_linear.weight"):
            out[blk + "ffn_down_exps.weight"] = array
        elif ".experts." in rest and int(layer) in per_expert:
            e, part = rest.split(".")[-3:-1]
            out[f"{blk}{_STACK[part].removesuffix('_exps')}.{e}.weight"] = array
        elif ".experts." in rest:
            part = rest.split(".")[-2]
            stack = pending.setdefault(blk + _STACK[part] + ".weight", [])
            stack.append(array)
            if len(stack) == experts:
                out[blk + _STACK[part] + ".weight"] = np.stack(stack)
        else:
            out[blk + _LAYER[rest]] = array
    return out


def write_moe_gguf(
    path: Path,
    config: dict,
    weights: dict,
    qtype=None,
    *,
    arch: str | None = None,
    extra: dict | None = None,
    per_expert: tuple[int, ...] = (),
    without: tuple[str, ...] = (),
) -> Path:
    """A GGUF of a tiny MoE checkpoint: float32, or its matrices as `qtype` (a
    gguf.GGMLQuantizationType: F16, or blocks where the rows hold whole ones; the
    routers stay float32). `arch` overrides the architecture's name, `extra` adds
    metadata ({key without the arch prefix: value}), `per_expert` names the layers
    written old-style (see `gguf_tensors`), `without` the tensors left out."""
    import gguf

    family = config["model_type"]
    arch = arch or ARCH[family]
    writer = gguf.GGUFWriter(str(path), arch)
    experts = config.get("num_local_experts") or config["num_experts"]
    write_gguf_sizes(writer, config)
    extra = extra or {}
    if "expert_count" not in extra:
        writer.add_expert_count(experts)
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if "moe_intermediate_size" in config:  # Qwen's: the dense size stands apart
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    for key in ("shared_expert_intermediate_size", "shared_intermediate_size"):
        if key in config:  # Qwen2-MoE's, Granite's
            writer.add_expert_shared_feed_forward_length(config[key])
    if family in ("granitemoe", "granitemoeshared"):
        writer.add_embedding_scale(config["embedding_multiplier"])
        writer.add_attention_scale(config["attention_multiplier"])
        writer.add_residual_scale(config["residual_multiplier"])
        writer.add_logit_scale(config["logits_scaling"])
    for key, value in extra.items():
        if isinstance(value, bool):
            writer.add_bool(f"{arch}.{key}", value)
        elif isinstance(value, str):
            writer.add_string(f"{arch}.{key}", value)
        elif isinstance(value, int):
            writer.add_uint32(f"{arch}.{key}", value)
        else:
            writer.add_float32(f"{arch}.{key}", value)
    tokens = ["<unk>", "<s>", "</s>", *WORDS]
    tokens += [f"<extra_{i}>" for i in range(config["vocab_size"] - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, array in gguf_tensors(config, weights, per_expert).items():
        if name in without:
            continue
        array = np.ascontiguousarray(array, dtype=np.float32)
        if qtype is None or array.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            writer.add_tensor(name, array)
        elif qtype == gguf.GGMLQuantizationType.F16 or array.shape[-1] % 32:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            quant = gguf.quants.quantize(array, qtype)
            writer.add_tensor(name, quant, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
