"""ModelArgs: the shape and behaviour of a model, for both families.

Built from a Hugging Face ``config.json`` (unknown keys ignored, as mlx-lm does) or from
GGUF metadata, and stored in the layout's manifest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .experts import MOE_TYPES, check_moe_args, moe_hf_fields
from .families import (
    GGUF_LAYER_NAMES,
    LAYER_TYPES,
    VARIANTS,
    gguf_config,
    metadata_key,
    text_config,
)
from .gguf_experts import MOE_ARCHS, gguf_moe_config, is_gguf_moe

LLAMA_TYPES = ("llama", "mistral")
FAMILIES = ("llama", "opt")
# Gated-FFN activations of the Llama family. Every one but silu and gelu_tanh (Gemma's
# GeGLU) is "ReLU family": a neuron whose activation is exactly zero contributes
# exactly zero, which makes sparse loading exact.
LLAMA_ACTIVATIONS = ("silu", "relu", "fatrelu", "relu2", "drelu", "gelu_tanh")
# smooth activations: small, never exactly zero; skipping neurons is approximate
APPROXIMATE_ACTIVATIONS = ("silu", "gelu_tanh")
HF_ACTIVATION_NAMES = {"swish": "silu", "relu_squared": "relu2", "dreLU": "drelu"}


_POSITIVE_INTS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
)


@dataclass
class ModelArgs:
    family: str  # "llama" or "opt"
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int  # FFN neurons per layer (OPT: ffn_dim)
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    hidden_act: str = "silu"
    activation_threshold: float = 0.0  # fatrelu: gate values <= threshold are zeroed
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = (
        False  # Llama family: biases on q/k/v/o (OPT always has them)
    )
    # OPT only
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # the Llama family's variants (formats/families.py), off by default
    model_type: str | None = None  # config.json's, for the user's eyes
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2)
    qk_norm: bool = False  # RMSNorm per head on q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # RMSNorm by (offset + weight); folded in at conversion
    sandwich_norms: bool = False  # Gemma: norms after attention and FFN outputs too
    embed_scale: float = 1.0  # Gemma: embeddings times sqrt(hidden_size)
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # the same on the logits
    sliding_window: int | None = None  # keys a sliding_attention layer sees
    layer_types: list[str] | None = None  # per layer "full_attention" / "sliding_..."
    rope_local_theta: float | None = None  # Gemma 3: sliding layers' RoPE base
    partial_rotary_factor: float = 1.0  # Phi-4-mini: RoPE on the first 3/4 of a head
    # Mixture of experts (formats/experts.py; 0 experts: a dense FFN): each layer
    # routes a token to experts_per_token of num_experts experts, each a gated FFN
    # of intermediate_size neurons
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = True  # the top-k routing weights renormalised to sum 1
    shared_expert_size: int = 0  # Qwen2-MoE: an always-on expert, sigmoid-gated
    moe_type: str | None = None  # the family's model_type ("mixtral", "qwen3_moe")

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(
                f"unknown model family {self.family!r}: expected one of {FAMILIES}"
            )
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if value is None and name == "head_dim":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("norm_eps", "rope_theta", "activation_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.family == "llama" and self.hidden_act not in LLAMA_ACTIVATIONS:
            raise ValueError(
                f"unsupported activation {self.hidden_act!r}: expected one of "
                f"{LLAMA_ACTIVATIONS}"
            )
        if self.family == "opt" and self.hidden_act != "relu":
            raise ValueError(
                f"unsupported OPT activation {self.hidden_act!r}: only relu"
            )
        if self.head_dim < 1:
            raise ValueError(
                f"hidden_size {self.hidden_size} is smaller than the "
                f"{self.num_attention_heads} attention heads"
            )
        self._check_variant()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.moe_type is not None or self.num_experts:
            check_moe_args(self)

    @property
    def is_moe(self) -> bool:
        """True for a mixture of experts (each bundle is an expert, not a neuron)."""
        return self.num_experts > 0

    @property
    def part_values(self) -> int:
        """Values of each part of a bundle: d_model for a neuron's row, an expert's
        whole (intermediate_size, d_model) matrix for an expert."""
        if self.is_moe:
            return self.intermediate_size * self.hidden_size
        return self.hidden_size

    def _check_variant(self) -> None:
        rotary = self.head_dim * self.partial_rotary_factor
        if not 0 < self.partial_rotary_factor <= 1 or rotary % 2:
            raise ValueError(
                f"partial_rotary_factor {self.partial_rotary_factor} of head_dim "
                f"{self.head_dim} does not give an even number of rotated dims"
            )
        if self.layer_types is None:
            return
        if not isinstance(self.layer_types, list) or len(self.layer_types) != (
            self.num_hidden_layers
        ):
            raise ValueError(
                f"layer_types must list {self.num_hidden_layers} layers, got "
                f"{self.layer_types!r}"
            )
        odd = [t for t in self.layer_types if t not in LAYER_TYPES]
        if odd:
            raise ValueError(
                f"unknown layer type {odd[0]!r}: expected one of {LAYER_TYPES}"
            )
        window = self.sliding_window
        if "sliding_attention" in self.layer_types and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise ValueError(
                f"sliding_window must be a positive integer, got {window!r}"
            )

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends to its last `sliding_window` keys only."""
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    @property
    def is_relu_family(self) -> bool:
        """True when an inactive neuron contributes exactly zero (sparse loading is
        exact)."""
        return self.hidden_act not in APPROXIMATE_ACTIVATIONS

    @property
    def bundle_parts(self) -> tuple[str, ...]:
        """The rows stored together per neuron in the FFN file (row-column bundling)."""
        return ("gate", "up", "down") if self.family == "llama" else ("fc1", "fc2")

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelArgs:
        """Build from a Hugging Face ``config.json`` dict; unknown keys are ignored.

        Raises:
            ValueError: the architecture or activation is not supported, or a field
                is missing or of the wrong type.
        """
        if not isinstance(config, dict):
            raise ValueError(
                f"config.json is a JSON {type(config).__name__}, not an object"
            )
        try:
            return cls._from_hf_config(config)
        except KeyError as err:
            raise ValueError(f"the config lacks {err.args[0]}") from None

    @classmethod
    def _from_hf_config(cls, config: dict) -> ModelArgs:
        config = text_config(config)
        model_type = config.get("model_type", "")
        if model_type == "opt":
            return cls(
                family="opt",
                hidden_size=config["hidden_size"],
                num_hidden_layers=config["num_hidden_layers"],
                intermediate_size=config["ffn_dim"],
                num_attention_heads=config["num_attention_heads"],
                num_key_value_heads=config["num_attention_heads"],
                vocab_size=config["vocab_size"],
                max_position_embeddings=config["max_position_embeddings"],
                hidden_act=config.get("activation_function", "relu"),
                norm_eps=1e-5,
                tie_word_embeddings=config.get("tie_word_embeddings", True),
                attention_bias=config.get("enable_bias", True),
                do_layer_norm_before=config.get("do_layer_norm_before", True),
                word_embed_proj_dim=_projection_dim(config),
                bos_token_id=config.get("bos_token_id"),
                eos_token_id=config.get("eos_token_id"),
            )
        if model_type in LLAMA_TYPES or model_type in VARIANTS:
            act = config.get("hidden_act", "silu")
            act = HF_ACTIVATION_NAMES.get(act, act)
            threshold = config.get(
                "activation_threshold", config.get("hidden_act_param")
            )
            fields = dict(
                family="llama",
                hidden_size=config["hidden_size"],
                num_hidden_layers=config["num_hidden_layers"],
                intermediate_size=config["intermediate_size"],
                num_attention_heads=config["num_attention_heads"],
                num_key_value_heads=config.get(
                    "num_key_value_heads", config["num_attention_heads"]
                ),
                vocab_size=config["vocab_size"],
                max_position_embeddings=config.get("max_position_embeddings", 4096),
                hidden_act=act,
                activation_threshold=float(threshold or 0.0),
                head_dim=config.get("head_dim"),
                norm_eps=config.get("rms_norm_eps", 1e-6),
                rope_theta=config.get("rope_theta", 10000.0),
                rope_scaling=config.get("rope_scaling"),
                tie_word_embeddings=config.get("tie_word_embeddings", False),
                attention_bias=config.get("attention_bias", False),
                bos_token_id=config.get("bos_token_id"),
                eos_token_id=config.get("eos_token_id"),
            )
            return cls(**fields | _variant(model_type, config))
        if model_type in MOE_TYPES:
            return cls(
                **{
                    **cls._from_hf_config(config | {"model_type": "llama"}).to_dict(),
                    **moe_hf_fields(config),
                }
            )
        raise ValueError(
            f"unsupported architecture {model_type!r}: supported are 'opt', the "
            f"Llama family {LLAMA_TYPES + tuple(VARIANTS)} and the mixtures of "
            f"experts {MOE_TYPES}"
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> ModelArgs:
        """Build from GGUF key/values (``general.architecture`` must be a Llama type).

        Raises:
            ValueError: the architecture is not supported or a key is missing.
        """
        try:
            return cls._from_gguf_metadata(meta)
        except (TypeError, OverflowError) as err:  # int() of a list, say
            raise ValueError(f"GGUF metadata of the wrong type ({err})") from None

    @classmethod
    def _from_gguf_metadata(cls, meta: dict) -> ModelArgs:
        arch = meta.get("general.architecture")
        if is_gguf_moe(meta):  # the mixtures of experts (formats/gguf_experts.py)
            return cls._from_hf_config(gguf_moe_config(meta))
        if arch in GGUF_LAYER_NAMES:  # the variants (formats/families.py)
            return cls._from_hf_config(gguf_config(meta))
        if arch not in LLAMA_TYPES:
            raise ValueError(
                f"unsupported GGUF architecture {arch!r}: supported are "
                f"{LLAMA_TYPES + tuple(GGUF_LAYER_NAMES) + tuple(MOE_ARCHS)[1:]}"
            )

        key = metadata_key(meta, arch)

        n_heads = int(key("attention.head_count"))
        vocab = meta.get(f"{arch}.vocab_size") or len(
            meta.get("tokenizer.ggml.tokens", [])
        )
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
        return cls(
            family="llama",
            hidden_size=int(key("embedding_length")),
            num_hidden_layers=int(key("block_count")),
            intermediate_size=int(key("feed_forward_length")),
            num_attention_heads=n_heads,
            num_key_value_heads=int(key("attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            max_position_embeddings=int(key("context_length", 4096)),
            hidden_act="silu",
            head_dim=meta.get(f"{arch}.attention.key_length"),
            norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        )

    @classmethod
    def from_dict(cls, data: dict) -> ModelArgs:
        """Rebuild from ``to_dict`` output (the manifest); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _variant(model_type: str, config: dict) -> dict:
    """ModelArgs fields of a Llama-family variant (formats/families.py); they
    override the Llama reading of the same keys."""
    if model_type not in VARIANTS:
        return {}
    return {"model_type": model_type, **VARIANTS[model_type](config)}


def _projection_dim(config: dict) -> int | None:
    dim = config.get("word_embed_proj_dim")
    return dim if dim and dim != config["hidden_size"] else None
