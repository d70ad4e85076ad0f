"""What differs between the gated (Llama-shaped) families, declared in one place.

Qwen2/2.5, Qwen3, Phi-3 and Gemma 2/3 are the Llama family's decoder with a few
changes; each is a row of `VARIANTS`: the config keys that become `ModelArgs` fields.
Their checkpoints' tensors are the Llama names, with two exceptions handled at
conversion, so the layout and the model stay one family (bundles of gate, up, down):

- fused projections (Phi-3's `qkv_proj` and `gate_up_proj`) are split into the
  Llama names (`FUSED`);
- Gemma's RMSNorm multiplies by (1 + weight): the 1 is added to its norms as they are
  read (`norm_offset`), as llama.cpp's converter does for GGUF.

Their GGUF files (llama.cpp's names and metadata) are read through the same rows:
`gguf_config` makes a config of the metadata. The runtime reads only `ModelArgs`
fields (`qk_norm`, `sandwich_norms`, `embed_scale`, soft caps, `layer_types`,
`partial_rotary_factor`...) and `longrope`, never a family name.
"""

from __future__ import annotations

import math

import numpy as np

# Hugging Face activation names of the gated FFN's gate
GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
LONGROPE = ("longrope", "su")  # Phi-3's long-context RoPE (rope_scaling's type)


def _sliding_layers(config: dict) -> dict:
    """Qwen2/3: sliding-window attention on the layers from `max_window_layers` on,
    when `use_sliding_window` (off in every released checkpoint)."""
    if not config.get("use_sliding_window"):
        return {}
    first = config.get("max_window_layers", 0)
    n = config["num_hidden_layers"]
    return {
        "sliding_window": config.get("sliding_window"),
        "layer_types": [LAYER_TYPES[i >= first] for i in range(n)],
    }


def _rope_theta(config: dict, default: float = 10000.0) -> dict:
    """rope_theta where transformers 5 saves it (`rope_parameters`), if not at the
    top."""
    if "rope_theta" in config:
        return {}
    rope = config.get("rope_parameters") or {}
    return {"rope_theta": float(rope.get("rope_theta", default))}


def _qwen2(config: dict) -> dict:
    # biases on q, k, v (not o): always on in Qwen2, whatever the config says
    return {"qkv_bias": True, **_sliding_layers(config), **_rope_theta(config)}


def _qwen3(config: dict) -> dict:
    return {
        "qk_norm": True,
        "attention_bias": config.get("attention_bias", False),
        **_sliding_layers(config),
        **_rope_theta(config),
    }


def _phi3(config: dict) -> dict:
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    partial = config.get("partial_rotary_factor", rope.get("partial_rotary_factor"))
    out = _rope_theta(config) | {"partial_rotary_factor": float(partial or 1.0)}
    if rope.get("rope_type", rope.get("type")) in LONGROPE:  # Phi-3.5, -128k, Phi-4
        original = rope.get("original_max_position_embeddings")
        original = original or config.get("original_max_position_embeddings", 4096)
        out["rope_scaling"] = rope | {"original_max_position_embeddings": original}
    window = config.get("sliding_window")
    if window:  # Phi-3-mini: every layer sees its last 2047 keys
        out["sliding_window"] = window
        out["layer_types"] = ["sliding_attention"] * config["num_hidden_layers"]
    return out


def _gemma(config: dict, pattern: int) -> dict:
    n = config["num_hidden_layers"]
    types = config.get("layer_types") or [
        LAYER_TYPES[bool((i + 1) % pattern)] for i in range(n)
    ]
    act = config.get("hidden_activation") or config.get(
        "hidden_act", GELU_TANH_NAMES[0]
    )
    return {
        "hidden_act": "gelu_tanh" if act in GELU_TANH_NAMES else act,
        "norm_offset": 1.0,
        "sandwich_norms": True,
        "embed_scale": float(config["hidden_size"]) ** 0.5,
        "query_pre_attn_scalar": config.get("query_pre_attn_scalar", 256),
        "sliding_window": config.get("sliding_window", 4096),
        "layer_types": types,
        "tie_word_embeddings": config.get("tie_word_embeddings", True),
    }


def _gemma2(config: dict) -> dict:
    return {
        **_gemma(config, pattern=2),
        "attn_logit_softcapping": config.get("attn_logit_softcapping", 50.0),
        "final_logit_softcapping": config.get("final_logit_softcapping", 30.0),
        **_rope_theta(config),
    }


def _gemma3(config: dict) -> dict:
    pattern = config.get("sliding_window_pattern", 6)
    out = {**_gemma(config, pattern), "qk_norm": True}
    rope = config.get("rope_parameters") or {}
    local = config.get("rope_local_base_freq")
    if local is None:
        local = (rope.get("sliding_attention") or {}).get("rope_theta", 10000.0)
    out["rope_local_theta"] = float(local)
    out["attn_logit_softcapping"] = config.get("attn_logit_softcapping")
    out["final_logit_softcapping"] = config.get("final_logit_softcapping")
    if "rope_theta" not in config:
        glob = (rope.get("full_attention") or {}).get("rope_theta", 1_000_000.0)
        out["rope_theta"] = float(glob)
    return out


# model_type -> the config keys that make its ModelArgs fields (beyond Llama's)
VARIANTS = {
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "phi3": _phi3,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3,
}


# Gemma3TextConfig's defaults: a multimodal checkpoint's text_config states few keys
GEMMA3_TEXT_DEFAULTS = {
    "model_type": "gemma3_text",
    "vocab_size": 262_208,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}


def text_config(config: dict) -> dict:
    """The text model's config of a multimodal checkpoint (Gemma 3 4B and up:
    model_type "gemma3" with a `text_config`), else `config` itself."""
    text = config.get("text_config")
    if config.get("model_type") != "gemma3" or not isinstance(text, dict):
        return config
    top = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    return GEMMA3_TEXT_DEFAULTS | top | text


def attention_shapes(
    args, p: str, *, qkv_bias=False, o_bias=False, qk_norm: str | None = None
) -> dict[str, tuple[int, ...]]:
    """Layer `p`'s ("layers.{i}.") attention tensors, name -> shape: the q, k, v, o
    projections, their biases where asked, and RMSNorms of q and k per head
    (`qk_norm` "head": Qwen3, Gemma 3) or over all heads ("full": OLMoE). The one
    declaration for the Llama family, its variants and the mixtures of experts."""
    d, hd = args.hidden_size, args.head_dim
    q, kv = args.num_attention_heads * hd, args.num_key_value_heads * hd
    a = p + "self_attn."
    shapes = {
        a + "q_proj.weight": (q, d),
        a + "k_proj.weight": (kv, d),
        a + "v_proj.weight": (kv, d),
        a + "o_proj.weight": (d, q),
    }
    if qkv_bias:
        shapes |= {a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,)}
        shapes |= {a + "v_proj.bias": (kv,)}
    if o_bias:
        shapes |= {a + "o_proj.bias": (d,)}
    if qk_norm:
        head = qk_norm == "head"
        shapes |= {a + "q_norm.weight": (hd if head else q,)}
        shapes |= {a + "k_norm.weight": (hd if head else kv,)}
    return shapes


def variant_shapes(args, p: str) -> dict[str, tuple[int, ...]]:
    """The tensors a variant adds to layer `p` beyond its attention: Gemma's norms
    around the FFN."""
    d = args.hidden_size
    if not args.sandwich_norms:
        return {}
    return {
        p + "pre_feedforward_layernorm.weight": (d,),
        p + "post_feedforward_layernorm.weight": (d,),
    }


# fused tensor (Llama-family name of its layer) -> the parts it stacks, in order
FUSED = {
    "self_attn.qkv_proj.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def fused_splits(name: str, rows: int, args) -> dict[str, tuple[int, int]] | None:
    """The row ranges (start, stop) of each part of the fused tensor `name`
    (canonical, `layers.{i}.` first) of `rows` rows, None if it is not fused.

    Raises:
        ValueError: its rows do not add up to its parts'.
    """
    prefix, _, rest = name.partition(".")[2].partition(".")
    parts = FUSED.get(rest)
    if parts is None:
        return None
    q = args.num_attention_heads * args.head_dim
    kv = args.num_key_value_heads * args.head_dim
    sizes = (q, kv, kv) if len(parts) == 3 else (args.intermediate_size,) * 2
    if sum(sizes) != rows:
        raise ValueError(
            f"fused tensor {name} has {rows} rows, expected {sum(sizes)} "
            f"({' + '.join(map(str, sizes))})"
        )
    out, start = {}, 0
    for part, size in zip(parts, sizes, strict=True):
        out[f"layers.{prefix}.{part}"] = (start, start + size)
        start += size
    return out


def is_offset_norm(name: str) -> bool:
    """Whether `name` is an RMSNorm weight (those Gemma offsets by 1)."""
    return name.endswith(("norm.weight", "layernorm.weight"))


def longrope(args, context: int) -> tuple[np.ndarray, float] | None:
    """Phi-3's LongRoPE for a KV cache of `context` tokens: (per-frequency divisors,
    attention factor, which multiplies the rotated q and k), None for other RoPE.

    The long factors past the pretraining context, the short ones within it, picked
    once by the context the cache is made for, as llama.cpp picks by its n_ctx
    (transformers picks by the sequence so far: the same for sequences within the
    context, keys of one rotation in the cache either way).
    """
    scaling = args.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) not in LONGROPE:
        return None
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or args.max_position_embeddings / original
    attention = scaling.get("attention_factor") or (
        1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    )
    factors = scaling["long_factor" if context > original else "short_factor"]
    return np.asarray(factors, dtype=np.float32), float(attention)


def fused_parts(shapes: dict, args) -> dict[str, tuple[str, int, int]]:
    """Every part of the fused tensors among `shapes` (canonical name -> shape):
    part name -> (fused name, first row, end row).

    Raises:
        ValueError: a fused tensor's rows do not add up to its parts'.
    """
    out = {}
    for name, shape in shapes.items():
        for part, (lo, hi) in (fused_splits(name, shape[0], args) or {}).items():
            out[part] = (name, lo, hi)
    return out


class FusedParts:
    """A checkpoint's fused tensors' parts (Phi-3's qkv_proj, gate_up_proj) named as
    the Llama family's tensors, read as row ranges of the fused one; the checkpoint
    (formats/checkpoints.py) has `path`, `args`, `shapes` and `tensor`."""

    def _name_parts(self) -> None:
        try:
            self._split = fused_parts(self.shapes, self.args)
        except ValueError as err:
            raise ValueError(f"{self.path}: {err}") from None
        self._fused: tuple[str, np.ndarray] | None = None
        for part, (fused, lo, hi) in self._split.items():
            self.shapes[part] = (hi - lo, *self.shapes[fused][1:])

    def _part(self, name: str) -> np.ndarray:
        fused, lo, hi = self._split[name]
        if self._fused is None or self._fused[0] != fused:  # its parts come in a row
            self._fused = (fused, self.tensor(fused))
        return self._fused[1][lo:hi]


# -- GGUF: the variants as llama.cpp's converter writes them ----------------------
# Not permuted for llama.cpp's interleaved RoPE (only its Llama models are); Gemma's
# norms stored with their 1 added; Phi-3's fused tensors kept fused.

# GGUF architecture -> its layer tensor names that are not the Llama ones
_GEMMA_GGUF_NAMES = {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_QK_NORM_GGUF_NAMES = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
GGUF_LAYER_NAMES = {
    "qwen2": {},
    "qwen3": _QK_NORM_GGUF_NAMES,
    "phi3": {
        "attn_qkv.weight": "self_attn.qkv_proj.weight",
        "ffn_up.weight": "mlp.gate_up_proj.weight",
    },
    "gemma2": _GEMMA_GGUF_NAMES,
    "gemma3": _GEMMA_GGUF_NAMES | _QK_NORM_GGUF_NAMES,
}


# Phi-3's LongRoPE in a GGUF: its factors as tensors, the rest as metadata
GGUF_LONGROPE = ("rope_factors_long.weight", "rope_factors_short.weight")


def gguf_longrope(meta: dict, tensors: dict, where) -> dict | None:
    """The rope_scaling of a Phi-3 GGUF's LongRoPE factors (`GGUF_LONGROPE`), taken
    out of `tensors` (name -> GGUF tensor); None without them.

    Raises:
        ValueError: the metadata lacks the original context (message: `where` first).
    """
    if GGUF_LONGROPE[0] not in tensors:
        return None
    long, short = (tensors.pop(name).data for name in GGUF_LONGROPE)
    key = f"{meta['general.architecture']}.rope.scaling"
    original = meta.get(f"{key}.original_context_length")
    if original is None:
        raise ValueError(f"{where}: GGUF metadata lacks {key}.original_context_length")
    return {
        "rope_type": "longrope",
        "long_factor": [float(x) for x in long],
        "short_factor": [float(x) for x in short],
        "original_max_position_embeddings": int(original),
        "attention_factor": meta.get(f"{key}.attn_factor"),
    }


def metadata_key(meta: dict, arch: str):
    """`key(name, default=None)`: the GGUF metadata value `{arch}.{name}`, or, absent
    and without a default, ValueError naming it."""

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{name}")
        return value

    return key


def gguf_config(meta: dict) -> dict:
    """A config.json of a variant's GGUF metadata (`GGUF_LAYER_NAMES`' archs), with
    what llama.cpp fixes rather than stores: Gemma 3's local RoPE base (10000) and
    its pattern of five sliding layers to one global; Gemma's attention scale
    (head_dim, or d_model / heads for the 27B sizes, as llama.cpp)."""
    arch = meta["general.architecture"]

    key = metadata_key(meta, arch)

    heads = int(key("attention.head_count"))
    config = {
        "model_type": "gemma3_text" if arch == "gemma3" else arch,
        "hidden_size": int(key("embedding_length")),
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "vocab_size": int(
            meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        ),
        "max_position_embeddings": int(key("context_length", 4096)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    head_dim = meta.get(f"{arch}.attention.key_length")
    config["head_dim"] = int(head_dim or config["hidden_size"] // heads)
    if arch == "phi3":
        rotary = meta.get(f"{arch}.rope.dimension_count", config["head_dim"])
        config["partial_rotary_factor"] = int(rotary) / config["head_dim"]
    if meta.get(f"{arch}.attention.sliding_window"):
        config["sliding_window"] = int(meta[f"{arch}.attention.sliding_window"])
    if arch.startswith("gemma"):
        config["hidden_activation"] = GELU_TANH_NAMES[0]
        big = config["num_hidden_layers"] == (62 if arch == "gemma3" else 46)
        scalar = config["hidden_size"] // heads if big else config["head_dim"]
        config["query_pre_attn_scalar"] = scalar
        for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
            config[cap] = meta.get(f"{arch}.{cap}")
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
        if isinstance(pattern, int):  # one global layer every `pattern`
            config["sliding_window_pattern"] = pattern
        elif isinstance(pattern, list):  # per layer: sliding or not
            config["layer_types"] = [LAYER_TYPES[bool(s)] for s in pattern]
    if arch == "gemma3":
        config["rope_local_base_freq"] = 10000.0
        if meta.get(f"{arch}.rope.scaling.type") == "linear":
            factor = float(key("rope.scaling.factor"))
            config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    return config
