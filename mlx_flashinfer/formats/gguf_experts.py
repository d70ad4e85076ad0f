"""Mixtures of experts in GGUF files, read as their Hugging Face checkpoints.

llama.cpp's converter (convert_hf_to_gguf.py) stacks a layer's experts into three
3-D tensors, `ffn_{gate,up,down}_exps` ([experts, rows, cols] outermost first; GGUF
lists the dims reversed), names the router `ffn_gate_inp` and Qwen2-MoE's shared
expert `ffn_{gate,up,down}_shexp` with its gate `ffn_gate_inp_shexp`, and writes
the routing as metadata: `{arch}.expert_count`, `expert_used_count`,
`expert_feed_forward_length`, `expert_shared_feed_forward_length`. Mixtral is its
"llama" architecture with an expert count; Granite's multipliers are
`embedding_scale`, `attention.scale`, `residual_scale`, `logit_scale`.

Here those become what the Hugging Face route has: a config.json (`gguf_moe_config`,
read by the same `ModelArgs.from_hf_config`, so the same refusals), the canonical
tensor names (`gguf_moe_layer_names`), and each expert's matrix as a slice of its
stack (`StackedExperts`): expert e's rows are the stack's [e], and so are its
quantized blocks (Q4_0, Q4_1, Q8_0: taken unchanged, as a dense tensor's). Granite's
gate and up stacks are joined as its `input_linear`, and so are the gate and up rows
of its shared MLP (llama.cpp's granitemoe with `expert_shared_feed_forward_length`:
`ffn_{gate,up}_shexp` -> `shared_mlp.input_linear`, `ffn_down_shexp` ->
`shared_mlp.output_linear`).

The first Mixtral GGUFs (llama.cpp before it stacked experts, spring 2024) store
each expert's matrices as tensors of their own, `blk.N.ffn_{gate,up,down}.E.weight`;
llama.cpp's loader still reads them (its "llama" architecture only) as views of a
stack. Here they are read as they are, each under its expert's canonical name: the
same values and blocks as expert E's slice of the stack would hold.

What llama.cpp fixes rather than stores, it fixes here too: whether the top-k
weights are renormalised (`RENORMALISED`, unless `{arch}.expert_weights_norm` says).
"""

from __future__ import annotations

import numpy as np

from .experts import FAMILIES, expert_parts, expert_tensor_names
from .families import metadata_key

# GGUF architecture -> the MoE family (model_type) it is; "llama" only with experts
MOE_ARCHS = {
    "llama": "mixtral",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "olmoe": "olmoe",
    "granitemoe": "granitemoe",
}
# llama.cpp's build of each architecture: renormalises the top-k weights or not
# (Qwen3-MoE always, whatever the config said; Qwen2-MoE and OLMoE never)
RENORMALISED = {
    "llama": True,
    "qwen2moe": False,
    "qwen3moe": True,
    "olmoe": False,
    "granitemoe": True,
}
# llama.cpp permutes q/k rows for its interleaved RoPE in its Llama models (Mixtral
# and Granite-MoE among them), not in these (NeoX RoPE: rows as Hugging Face's)
NOT_PERMUTED = ("qwen2moe", "qwen3moe", "olmoe")
STACKS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
# the old-style tensors of expert {e} (gate, up, down, as STACKS), where llama.cpp
# reads them
PER_EXPERT = ("ffn_gate.{e}.weight", "ffn_up.{e}.weight", "ffn_down.{e}.weight")
PER_EXPERT_ARCHS = ("llama",)
# Granite's shared gate and up rows as GGUF holds them apart (names of no layout:
# joined as `shared_mlp.input_linear.weight`, gate rows first, as its checkpoint)
SHARED_PARTS = ("shared_mlp.input_linear.gate", "shared_mlp.input_linear.up")
SHARED_JOINED = "shared_mlp.input_linear.weight"
# metadata of routing this runtime does not compute
_REFUSED_KEYS = (
    "expert_group_count",
    "leading_dense_block_count",
    "moe_every_n_layers",
)


def is_gguf_moe(meta: dict) -> bool:
    """Whether GGUF metadata describes a mixture of experts (an expert count)."""
    arch = meta.get("general.architecture")
    return bool(meta.get(f"{arch}.expert_count"))


def moe_type(meta: dict) -> str:
    """The MoE family (model_type) of a GGUF architecture: llama.cpp's granitemoe
    with a shared expert's size is Granite-MoE with its shared MLP
    (`granitemoeshared`, its gate and up rows written apart as ffn_{gate,up}_shexp)."""
    arch = meta.get("general.architecture")
    if arch == "granitemoe" and meta.get(f"{arch}.expert_shared_feed_forward_length"):
        return "granitemoeshared"
    return MOE_ARCHS.get(arch, "mixtral")


def gguf_moe_config(meta: dict) -> dict:
    """A config.json (the Hugging Face keys of `experts.FAMILIES`) of an MoE GGUF's
    metadata.

    Raises:
        ValueError: an architecture or routing this runtime does not compute, or a
            missing key (named).
    """
    arch = meta.get("general.architecture")
    if arch not in MOE_ARCHS:
        raise ValueError(
            f"unsupported GGUF mixture of experts {arch!r}: supported are "
            f"{tuple(MOE_ARCHS)}"
        )

    key = metadata_key(meta, arch)

    for name in _REFUSED_KEYS:
        if meta.get(f"{arch}.{name}"):
            raise ValueError(f"GGUF {arch}: {arch}.{name} is not supported")
    gating = meta.get(f"{arch}.expert_gating_func", 1)
    scale = meta.get(f"{arch}.expert_weights_scale", 1.0)
    if gating != 1 or scale not in (0.0, 1.0):  # 1: softmax (llama.cpp's enum)
        raise ValueError(
            f"GGUF {arch}: routing other than softmax (expert_gating_func "
            f"{gating}, expert_weights_scale {scale}) is not supported"
        )
    model_type = moe_type(meta)
    family = FAMILIES[model_type]
    heads = int(key("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    size = meta.get(f"{arch}.expert_feed_forward_length")
    size = int(size or key("feed_forward_length"))
    config = {
        "model_type": model_type,
        "hidden_size": int(key("embedding_length")),
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length", size)),
        family.size_key: size,
        family.experts_key: int(key("expert_count")),
        "num_experts_per_tok": int(key("expert_used_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(key("context_length", 4096)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if meta.get(f"{arch}.rope.scaling.type") == "linear":  # as a dense GGUF's
        factor = float(key("rope.scaling.factor"))
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    if meta.get(f"{arch}.attention.key_length"):
        config["head_dim"] = int(meta[f"{arch}.attention.key_length"])
    if family.normed_key:
        norm = meta.get(f"{arch}.expert_weights_norm", RENORMALISED[arch])
        config[family.normed_key] = bool(norm)
    shared = int(meta.get(f"{arch}.expert_shared_feed_forward_length") or 0)
    count = int(meta.get(f"{arch}.expert_shared_count") or 0)
    if (shared or count) and not family.shared_expert or count > 1:
        what = f"{count or 'a'} shared expert(s)"
        raise ValueError(f"GGUF {arch} with {what} is not supported")
    if family.shared_expert:
        config[family.shared_key] = int(key("expert_shared_feed_forward_length"))
    if family.multipliers:  # Granite's, folded into weights as from its config
        config |= {
            "embedding_multiplier": float(key("embedding_scale", 1.0)),
            "attention_multiplier": float(key("attention.scale", 1.0)),
            "residual_multiplier": float(key("residual_scale", 1.0)),
            "logits_scaling": float(key("logit_scale", 1.0)),
        }
    return config


def gguf_moe_layer_names(meta: dict) -> dict[str, str]:
    """A GGUF MoE layer's tensor names (after `blk.{i}.`) -> canonical names (after
    `layers.{i}.`): router, shared expert, the stacks (kept under their GGUF
    names: each expert is named by `StackedExperts`) and, where llama.cpp reads
    them, old-style per-expert tensors (under their experts' names). {} for a
    dense model."""
    if not is_gguf_moe(meta):
        return {}
    arch = meta["general.architecture"]
    family = FAMILIES[moe_type(meta)]
    names = {"ffn_gate_inp.weight": f"{family.block}.{family.router}.weight"}
    names |= {stack: stack for stack in STACKS}
    if arch in PER_EXPERT_ARCHS:  # old-style: expert e's matrices are its own
        for e in range(int(meta[f"{arch}.expert_count"])):
            for own, part in zip(PER_EXPERT, family.parts, strict=True):
                names[own.format(e=e)] = f"{family.block}.experts.{e}.{part}.weight"
    if family.shared_fused:  # Granite's: gate and up joined again (`_joined`)
        names |= {
            "ffn_gate_shexp.weight": SHARED_PARTS[0],
            "ffn_up_shexp.weight": SHARED_PARTS[1],
            "ffn_down_shexp.weight": "shared_mlp.output_linear.weight",
        }
    elif family.shared_expert:
        s = f"{family.block}.shared_expert"
        names |= {
            "ffn_gate_shexp.weight": f"{s}.gate_proj.weight",
            "ffn_up_shexp.weight": f"{s}.up_proj.weight",
            "ffn_down_shexp.weight": f"{s}.down_proj.weight",
            "ffn_gate_inp_shexp.weight": f"{s}_gate.weight",
        }
    if family.qk_norm:
        names |= {
            "attn_q_norm.weight": "self_attn.q_norm.weight",
            "attn_k_norm.weight": "self_attn.k_norm.weight",
        }
    return names


class StackedExperts:
    """A GGUF checkpoint's expert stacks named as the Hugging Face checkpoint's
    tensors: each expert's matrix the stack's [e] (its values or its quantized
    blocks), Granite's input_linear the gate and up stacks joined; old-style
    per-expert tensors are checked complete and read as they are. The checkpoint
    (formats/checkpoints.py) has `path`, `args`, `shapes`, `_tensors`, `tensor` and
    `native_quantized` of the stacks themselves."""

    def _name_experts(self) -> None:
        # canonical name -> (the stacks it is made of, its expert or None: whole)
        self._experts: dict[str, tuple[tuple[str, ...], int | None]] = {}
        self._stack: tuple[str, str, object] | None = None  # (name, kind, arrays)
        # canonical name -> the tensors whose rows it joins (Granite's shared MLP)
        self._joined: dict[str, tuple[str, ...]] = {}
        args = self.args
        if args.is_moe and FAMILIES[args.moe_type].shared_fused:
            for i in range(args.num_hidden_layers):
                parts = tuple(f"layers.{i}.{p}" for p in SHARED_PARTS)
                if not all(p in self.shapes for p in parts):
                    raise ValueError(
                        f"{self.path}: blk.{i}.ffn_gate_shexp or ffn_up_shexp is "
                        "missing: the metadata gives a shared expert's size"
                    )
                (a, d), (b, _) = (self.shapes[p] for p in parts)
                self._joined[f"layers.{i}.{SHARED_JOINED}"] = parts
                self.shapes[f"layers.{i}.{SHARED_JOINED}"] = (a + b, d)
        if not args.is_moe or self._per_expert():
            return
        for i in range(args.num_hidden_layers):
            stacks = [f"layers.{i}.{s}" for s in STACKS]
            for name, gguf in zip(stacks, STACKS, strict=True):
                shape = self.shapes.get(name)
                if shape is None or len(shape) != 3 or shape[0] != args.num_experts:
                    raise ValueError(
                        f"{self.path}: blk.{i}.{gguf} is {shape or 'missing'}: "
                        f"expected a stack of {args.num_experts} experts"
                    )
            if FAMILIES[args.moe_type].fused:  # Granite: input_linear, output_linear
                gate_up, down = expert_tensor_names(args, i)
                self._experts[gate_up] = (tuple(stacks[:2]), None)
                self._experts[down] = (stacks[2:], None)
                gate, up = (self.shapes[s] for s in stacks[:2])
                self.shapes[gate_up] = (gate[0], gate[1] + up[1], gate[2])
                self.shapes[down] = self.shapes[stacks[2]]
                continue
            for e in range(args.num_experts):
                parts = expert_parts(args, i, e)
                for stack, (name, _) in zip(stacks, parts, strict=True):
                    self._experts[name] = ((stack,), e)
                    self.shapes[name] = self.shapes[stack][1:]

    def _per_expert(self) -> bool:
        """Whether the experts are old-style tensors of their own (then every one
        is there), not stacks.

        Raises:
            ValueError: both forms in one file, or an expert's tensor missing
                (named).
        """
        args = self.args
        own = [n for n in self.shapes if ".experts." in n]
        if not own:
            return False
        stacks = [n for n in self.shapes if n.endswith(STACKS)]
        if stacks:  # no converter wrote both (llama.cpp picks per layer)
            a, b = (self._tensors[n[0]].name for n in (stacks, own))
            raise ValueError(
                f"{self.path}: {a} beside {b}: experts are either stacked "
                "(ffn_*_exps) or one tensor each (ffn_*.E), not both"
            )
        for i in range(args.num_hidden_layers):
            for e in range(args.num_experts):
                parts = expert_parts(args, i, e)
                for (name, _), gguf in zip(parts, PER_EXPERT, strict=True):
                    if name not in self.shapes:
                        raise ValueError(
                            f"{self.path}: blk.{i}.{gguf.format(e=e)} is missing: "
                            f"expected {args.num_experts} experts' gate, up and "
                            "down tensors"
                        )
        return True

    def _expert(self, name: str) -> np.ndarray:
        """The values of an expert's matrix (or of Granite's joined stacks)."""
        stacks, e = self._experts[name]
        if e is None:
            return np.concatenate([self.tensor(s) for s in stacks], axis=1)
        return self._cached(stacks[0], "values", self.tensor)[e]

    def _expert_native(self, name: str) -> tuple[np.ndarray, ...]:
        """(packed, scales, biases) of an expert's rows: the stack's blocks of [e]
        (whole rows, since d_model is a multiple of the block)."""
        (stack,), e = self._experts[name]
        fields = self._cached(stack, "native", self.native_quantized)
        rows = self.shapes[name][0]
        return tuple(f[e].reshape(rows, -1) for f in fields)

    def _cached(self, stack: str, kind: str, read):
        # a layer's experts are read stack after stack: one held at a time
        if self._stack is None or self._stack[:2] != (stack, kind):
            self._stack = (stack, kind, read(stack))
        return self._stack[2]
