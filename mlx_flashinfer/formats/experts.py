"""Mixture-of-experts families: what differs between them, declared in one table.

An MoE layer replaces the FFN by `num_experts` small gated FFNs ("experts") and a
router (a (num_experts, d_model) matrix) that sends each token to `experts_per_token`
of them, weighting their outputs. On disk (`convert.py`) each expert is one bundle:
[its gate rows, its up rows, its down columns], each (moe_intermediate, d_model), so
one read brings a whole expert; the router, attention, norms and a shared expert stay
resident. Routing (softmax, top-k, renormalisation) is `model/moe.py`'s.

Families differ in config keys, tensor names, the attention around the experts (Qwen3:
RMSNorm of each head's queries and keys; OLMoE: of all queries and keys; Qwen2:
biases on q, k, v), whether a shared expert runs beside the routed ones, whether the
experts are stored one tensor each or stacked (Granite), and Granite's multipliers,
which conversion folds into the weights (`fold_factor`), so that the transformer and
the flash path stay one for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .families import attention_shapes
from .safetensors_stream import encode


@dataclass(frozen=True)
class MoEFamily:
    block: str  # the layer's MoE module: "mlp" or "block_sparse_moe"
    parts: tuple[str, str, str]  # an expert's gate, up, down tensor names
    experts_key: str  # config key of the expert count
    size_key: str  # config key of an expert's neurons
    qk_norm: str | None = None  # "head": per head (Qwen3); "full": q and k whole
    qkv_bias: bool = False  # biases on q, k, v (not o)
    shared_expert: bool = False  # an always-on expert, sigmoid-gated (Qwen2-MoE)
    shared_key: str = "shared_expert_intermediate_size"  # config key of its neurons
    # Granite's shared expert: ungated, `shared_mlp.input_linear` its gate and up
    # rows in one matrix, `shared_mlp.output_linear` its down matrix
    shared_fused: bool = False
    normed_key: str | None = None  # config key of renormalising the top-k weights
    normed_default: bool = True
    router: str = "gate"  # the router's module in the block
    # the experts stacked in two tensors: gate and up rows (experts, 2 * n, d_model),
    # down (experts, d_model, n) (Granite-MoE's input_linear, output_linear)
    fused: bool = False
    # Granite's scalars (embeddings, attention scores, residual branches, logits),
    # folded into weights at conversion (`fold_factor`): the runtime stays Llama's
    multipliers: bool = False


FAMILIES = {
    "mixtral": MoEFamily(
        "block_sparse_moe", ("w1", "w3", "w2"), "num_local_experts", "intermediate_size"
    ),
    "qwen3_moe": MoEFamily(
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "num_experts",
        "moe_intermediate_size",
        qk_norm="head",
        normed_key="norm_topk_prob",
        normed_default=False,
    ),
    "qwen2_moe": MoEFamily(
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "num_experts",
        "moe_intermediate_size",
        qkv_bias=True,
        shared_expert=True,
        normed_key="norm_topk_prob",
        normed_default=False,
    ),
    "granitemoe": MoEFamily(
        "block_sparse_moe",
        ("input_linear", "input_linear", "output_linear"),
        "num_local_experts",
        "intermediate_size",
        router="router.layer",
        fused=True,
        multipliers=True,
    ),
    "olmoe": MoEFamily(
        "mlp",
        ("gate_proj", "up_proj", "down_proj"),
        "num_experts",
        "intermediate_size",
        qk_norm="full",
        normed_key="norm_topk_prob",
        normed_default=False,
    ),
}
# Granite-MoE with an always-on shared MLP beside the experts (ungated, fused too)
FAMILIES["granitemoeshared"] = replace(
    FAMILIES["granitemoe"],
    shared_expert=True,
    shared_key="shared_intermediate_size",
    shared_fused=True,
)
MOE_TYPES = tuple(FAMILIES)


def moe_hf_fields(config: dict) -> dict:
    """The ModelArgs fields an MoE config.json sets beyond a Llama one's.

    Raises:
        KeyError: a required key is missing (ModelArgs says which).
        ValueError: a variant this runtime does not compute (it is named).
    """
    model_type = config["model_type"]
    family = FAMILIES[model_type]
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise ValueError(
            f"{model_type}: dense MLP layers among the MoE layers (mlp_only_layers, "
            "decoder_sparse_step) are not supported"
        )
    if config.get("clip_qkv") is not None:
        raise ValueError(f"{model_type}: clip_qkv is not supported")
    if model_type == "qwen2_moe" and not config.get("qkv_bias", True):
        raise ValueError("qwen2_moe without qkv_bias is not supported")
    normed = family.normed_default
    if family.normed_key:
        normed = config.get(family.normed_key, normed)
    return {
        "intermediate_size": config[family.size_key],
        "num_experts": config[family.experts_key],
        "experts_per_token": config["num_experts_per_tok"],
        "norm_topk_prob": bool(normed),
        "shared_expert_size": config.get(family.shared_key, 0)
        if family.shared_expert
        else 0,
        "moe_type": model_type,
    }


def check_moe_args(args) -> None:
    """ModelArgs' MoE fields, consistent (called by ModelArgs itself).

    Raises:
        ValueError: naming the bad field.
    """
    if args.moe_type not in FAMILIES:
        raise ValueError(
            f"unknown mixture-of-experts type {args.moe_type!r}: expected one of "
            f"{MOE_TYPES}"
        )
    for name in ("num_experts", "experts_per_token"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if args.experts_per_token > args.num_experts:
        raise ValueError(
            f"experts_per_token {args.experts_per_token} exceeds num_experts "
            f"{args.num_experts}"
        )
    if args.hidden_act != "silu":
        raise ValueError(f"unsupported expert activation {args.hidden_act!r}: silu")


def moe_layer_shapes(args, layer: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of an MoE layer but the norms: attention (with its family's
    extras), router, experts, shared expert; canonical name -> shape."""
    family = FAMILIES[args.moe_type]
    d, f = args.hidden_size, args.intermediate_size
    p = f"layers.{layer}."
    shapes = attention_shapes(args, p, qkv_bias=family.qkv_bias, qk_norm=family.qk_norm)
    shapes[router_name(args, layer)] = (args.num_experts, d)
    if family.fused:
        gate_up, down = expert_tensor_names(args, layer)
        shapes |= {
            gate_up: (args.num_experts, 2 * f, d),
            down: (args.num_experts, d, f),
        }
    for e in range(0 if family.fused else args.num_experts):
        for name, transposed in expert_parts(args, layer, e):
            shapes[name] = (d, f) if transposed else (f, d)
    fs = args.shared_expert_size
    if fs and FAMILIES[args.moe_type].shared_fused:
        s = f"{p}shared_mlp."
        shapes |= {s + "input_linear.weight": (2 * fs, d)}
        shapes |= {s + "output_linear.weight": (d, fs)}
    elif fs:
        s = f"{p}mlp.shared_expert."
        shapes |= {
            s + "gate_proj.weight": (fs, d),
            s + "up_proj.weight": (fs, d),
            s + "down_proj.weight": (d, fs),
            f"{p}mlp.shared_expert_gate.weight": (1, d),
        }
    return shapes


def router_name(args, layer: int) -> str:
    family = FAMILIES[args.moe_type]
    return f"layers.{layer}.{family.block}.{family.router}.weight"


def expert_parts(args, layer: int, expert: int) -> list[tuple[str, bool]]:
    """(tensor name, transposed?) of each part of an expert's bundle: the gate and
    up rows, the down columns (its down matrix transposed)."""
    family = FAMILIES[args.moe_type]
    p = f"layers.{layer}.{family.block}.experts.{expert}."
    gate, up, down = family.parts
    return [
        (p + f"{gate}.weight", False),
        (p + f"{up}.weight", False),
        (p + f"{down}.weight", True),
    ]


def moe_expected_shapes(args) -> dict[str, tuple[int, ...]]:
    """Every tensor an MoE model of `args` needs, canonical name -> shape."""
    d, v = args.hidden_size, args.vocab_size
    shapes = {"embed_tokens.weight": (v, d), "norm.weight": (d,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(args.num_hidden_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
        shapes |= moe_layer_shapes(args, i)
    return shapes


def router_tensor_names(args) -> set[str]:
    """The routers and shared-expert gates: resident matrices a quantized layout
    keeps in float16 (they pick the experts)."""
    names = {router_name(args, i) for i in range(args.num_hidden_layers)}
    if args.shared_expert_size and not FAMILIES[args.moe_type].shared_fused:
        names |= {
            f"layers.{i}.mlp.shared_expert_gate.weight"
            for i in range(args.num_hidden_layers)
        }
    return names


def expert_tensor_names(args, layer: int) -> list[str]:
    """The tensors of every expert of `layer` (what goes into bundles)."""
    family = FAMILIES[args.moe_type]
    if family.fused:
        p = f"layers.{layer}.{family.block}."
        return [p + f"{family.parts[0]}.weight", p + f"{family.parts[2]}.weight"]
    return [
        name
        for e in range(args.num_experts)
        for name, _ in expert_parts(args, layer, e)
    ]


def manifest_section(args, expert_bytes: int, layers: list[dict]) -> dict:
    """The manifest's expert index: experts per layer and token, the bytes of one
    expert's bundle, and where each layer's expert 0 starts (expert e of a layer
    lies at its offset + e * expert_bytes)."""
    return {
        "moe_type": args.moe_type,
        "num_experts": args.num_experts,
        "experts_per_token": args.experts_per_token,
        "expert_bytes": expert_bytes,
        "offsets": [layer["offset"] for layer in layers],
    }


def expert_values(source, args, layer: int) -> list[list]:
    """Each bundle part of `layer`'s experts as float32 values, [part][expert] of
    (intermediate, d_model): gate rows, up rows, down columns."""
    f = args.intermediate_size
    if FAMILIES[args.moe_type].fused:
        gate_up, down = (source.tensor(n) for n in expert_tensor_names(args, layer))
        return [
            [gate_up[e, :f] for e in range(args.num_experts)],
            [gate_up[e, f:] for e in range(args.num_experts)],
            [down[e].T for e in range(args.num_experts)],
        ]
    parts = [[], [], []]
    for p in range(3):  # part after part: a GGUF source reads one stack at a time
        for e in range(args.num_experts):
            name, transposed = expert_parts(args, layer, e)[p]
            values = source.tensor(name)
            parts[p].append(values.T if transposed else values)
    return parts


def expert_part_bytes(source, args, layer: int, dtype: str, q) -> list[np.ndarray]:
    """Each bundle part of an MoE layer as bytes, (experts, part bytes) uint8: an
    expert's gate rows, up rows, down columns, each (intermediate, d_model)
    (quantized by `q`, convert.py's `Quantization`: its packed rows, then their
    scales, then their biases; a source's own groups where they are the layout's,
    as `Quantization.matrix` and `stack` take them)."""
    if q is not None and not FAMILIES[args.moe_type].fused:
        experts = [expert_parts(args, layer, e) for e in range(args.num_experts)]
        out = []
        for p, bits in enumerate(q.part_bits):  # part after part: a stack at a time
            rows = [q.matrix(e[p][0], bits, e[p][1]) for e in experts]
            out.append(np.stack([_joined(fields) for fields in rows]))
        return out
    if q is not None:  # stacked (Granite): row ranges of its two stacks
        gate_up, down = expert_tensor_names(args, layer)
        f = args.intermediate_size
        stacks = [(gate_up, slice(0, f)), (gate_up, slice(f, 2 * f))]
        stacks.append((down, slice(None)))  # its columns: transposed
        return [
            np.stack([_joined(fields) for fields in q.stack(name, bits, rows, p == 2)])
            for p, ((name, rows), bits) in enumerate(
                zip(stacks, q.part_bits, strict=True)
            )
        ]
    parts = []
    for experts in expert_values(source, args, layer):
        rows = [_joined([encode(np.ascontiguousarray(v), dtype)]) for v in experts]
        parts.append(np.stack(rows))
    return parts


def _joined(fields) -> np.ndarray:
    return np.concatenate([f.view(np.uint8).reshape(-1) for f in fields])


def fold_factor(config: dict, args, name: str) -> float:
    """What a tensor is multiplied by at conversion, so that Granite's scalars need
    no runtime of their own: embeddings by embedding_multiplier, the head by
    1 / logits_scaling, queries by attention_multiplier * sqrt(head_dim) (the
    runtime scales scores by 1 / sqrt(head_dim)), the outputs of attention and
    experts by residual_multiplier. 1 for every other family and tensor."""
    family = FAMILIES.get(config.get("model_type"))
    if family is None or not family.multipliers:
        return 1.0
    if name == "embed_tokens.weight":
        return float(config.get("embedding_multiplier", 1.0))
    if name == "lm_head.weight":
        return 1.0 / float(config.get("logits_scaling", 1.0))
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return float(config.get("attention_multiplier", 1.0)) * args.head_dim**0.5
    if name.endswith(("self_attn.o_proj.weight", f"{family.parts[2]}.weight")):
        return float(config.get("residual_multiplier", 1.0))
    return 1.0
