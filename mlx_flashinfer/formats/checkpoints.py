"""Source checkpoints: a Hugging Face directory or a GGUF file, read one tensor at a
time.

Both expose the same small surface to the converter: `args`, `shapes` (canonical tensor
name -> shape), `tensor(name)` as float32 NumPy, and the tokenizer to carry over.
Canonical names are the Hugging Face names without the `model.` / `model.decoder.`
prefix, so the model reads the checkpoint's own attribute names (no mapping table).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .args import ModelArgs
from .experts import fold_factor
from .families import (
    GGUF_LAYER_NAMES,
    GGUF_LONGROPE,
    FusedParts,
    gguf_longrope,
    is_offset_norm,
)
from .gguf_experts import (
    NOT_PERMUTED,
    StackedExperts,
    gguf_moe_config,
    gguf_moe_layer_names,
)
from .kquants import KQUANT_TYPES, from_kquant_blocks
from .layout import MANIFEST
from .mlx_quantized import MLXQuantized
from .quantize import GGUF_BLOCK, GGUF_TYPES, from_gguf_blocks, quantize
from .safetensors_stream import read_header
from .shapes import check_complete, expected_shapes, rope_divisors

HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


class HFCheckpoint(FusedParts):
    """A Hugging Face directory: config.json, one or more *.safetensors, tokenizer
    files."""

    kind = "hf"

    def __init__(self, path: Path):
        self.path = path
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ValueError(
                f"{path}: not a Hugging Face checkpoint (no config.json) and not a "
                ".gguf file"
            )
        self.config = read_json(config_path)
        try:
            args = ModelArgs.from_hf_config(self.config)
        except ValueError as err:
            raise ValueError(f"{config_path}: {err}") from None
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for file in self._weight_files():
            header, start = read_header(file)
            for name, info in header.items():
                self._where.setdefault(_canonical(name), (file, info, start))
        self._where.pop("", None)
        # mlx-community's packed matrices and stacked experts, under plain names
        self._mlx = MLXQuantized(self.config, args, self._where, path, _canonical)
        if self._mlx.stored:  # a quantized layout's default: the checkpoint's groups
            self.group_size = self._mlx.default[1]
        if "lm_head.weight" not in self._where:
            args.tie_word_embeddings = True  # a checkpoint without lm_head ties it
        if args.tie_word_embeddings and fold_factor(
            self.config, args, "lm_head.weight"
        ) != fold_factor(self.config, args, "embed_tokens.weight"):
            # scaled apart (Granite's multipliers): the head is stored on its own
            args.tie_word_embeddings = False
            self._where["lm_head.weight"] = self._where["embed_tokens.weight"]
            self._mlx.alias("lm_head.weight", "embed_tokens.weight")
        self.args = args
        self.shapes = {n: self._mlx.shape(n, at) for n, at in self._where.items()}
        self._name_parts()
        check_complete(self.shapes, args, path)
        self.shapes = {n: self.shapes[n] for n in expected_shapes(args)}
        divisors = rope_divisors(args)
        if divisors is not None:
            self._rope_freqs = divisors
            self.shapes["rope_freqs"] = divisors.shape

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no weight_map object")
            files = [self.path / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: names missing shards {missing}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ValueError(
                f"{self.path}: no *.safetensors weights (PyTorch .bin checkpoints are "
                "not read; save them as safetensors first)"
            )
        return files

    def tensor(self, name: str) -> np.ndarray:
        if name == "rope_freqs":
            return self._rope_freqs
        if name in self._split:
            return self._part(name)
        values = self._mlx.read(name, self._where[name])
        if self.args.norm_offset and is_offset_norm(name):
            values = values + np.float32(self.args.norm_offset)
        factor = fold_factor(self.config, self.args, name)
        return values if factor == 1.0 else values * np.float32(factor)

    def native_bits(self, name: str, group_size: int) -> int | None:
        """Bits of `name` when its MLX groups are a quantized layout's format at
        `group_size` (4 or 8 bits, that group size), else None. A multiplier
        folded into it at conversion (Granite's) scales its scales and biases."""
        name = self._split.get(name, (name,))[0]  # a fused tensor's part: its groups
        return self._mlx.native_bits(name, group_size)

    def native_stacked(self, name: str, group_size: int) -> int | None:
        """`native_bits` of a stack of experts (Granite's), whose `native_quantized`
        fields have a leading expert axis."""
        return self.native_bits(name, group_size)

    def native_quantized(self, name: str) -> tuple[np.ndarray, ...]:
        """(packed, scales, biases) of `name` as stored (see `native_bits`)."""
        if name in self._split:  # whole rows of the fused tensor's groups
            fused, lo, hi = self._split[name]
            return tuple(f[lo:hi] for f in self.native_quantized(fused))
        factor = fold_factor(self.config, self.args, name)
        return self._mlx.fields(name, self._where[name], factor)

    def stored_bits(self, name: str) -> int | None:
        """Bits `name` is quantized at in the checkpoint, None if float."""
        return self._mlx.bits(self._split.get(name, (name,))[0])

    @property
    def scales_rounded(self) -> int:
        """Scales and biases taken as stored that float16 did not hold exactly."""
        return self._mlx.rounded

    def tokenizer(self) -> tuple[dict[str, bytes], dict]:
        """(files to copy into the layout, tokenizer info for the manifest)."""
        files = {
            n: (self.path / n).read_bytes()
            for n in HF_TOKENIZER_FILES
            if (self.path / n).is_file()
        }
        if "tokenizer.json" not in files and "tokenizer.model" not in files:
            raise ValueError(f"{self.path}: no tokenizer.json or tokenizer.model")
        config = read_json(self.path / "tokenizer_config.json", files)
        generation = read_json(self.path / "generation_config.json", files)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        if "chat_template.jinja" in files:
            template = files["chat_template.jinja"].decode()
        eos = generation.get("eos_token_id", self.args.eos_token_id)
        info = {
            "file": "tokenizer.json"
            if "tokenizer.json" in files
            else "tokenizer.model",
            "bos_token_id": generation.get("bos_token_id", self.args.bos_token_id),
            "eos_token_ids": _as_list(eos) or _as_list(self.args.eos_token_id),
            # tokenizer.json adds BOS itself (its post-processor); SentencePiece does
            # not
            "prepend_bos": "tokenizer.json" not in files
            and config.get("add_bos_token", True),
            "chat_template": template,
        }
        return files, info


class GGUFCheckpoint(FusedParts, StackedExperts):
    """A GGUF file (Llama architecture, its variants and the mixtures of experts of
    gguf_experts.py), dequantized tensor by tensor."""

    kind = "gguf"
    group_size = GGUF_BLOCK  # a quantized layout's default: the blocks' own
    _NAMES = {
        "token_embd.weight": "embed_tokens.weight",
        "output_norm.weight": "norm.weight",
        "output.weight": "lm_head.weight",
        "rope_freqs.weight": "rope_freqs",
    }
    _LAYER_NAMES = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
        "attn_output.bias": "self_attn.o_proj.bias",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }

    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
            self.meta = {k: f.contents() for k, f in self._reader.fields.items()}
        except (ValueError, OSError, KeyError, IndexError, TypeError) as err:
            # the gguf package checks little: a cut file fails anywhere in its parse
            raise ValueError(
                f"{path}: not a readable GGUF file (truncated or corrupted: {err})"
            ) from None
        # its per-token parse objects cost ~80 MB; meta has all
        self._reader.fields.clear()
        try:
            args = ModelArgs.from_gguf_metadata(self.meta)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        arch = self.meta.get("general.architecture")
        # llama.cpp permutes q/k rows for its interleaved RoPE (its Llama models
        # only, Mixtral and Granite among them); `tensor` undoes it
        self._permuted = args.model_type is None and arch not in NOT_PERMUTED
        # an MoE's config.json (Granite's multipliers are folded in as from its own)
        self.config = gguf_moe_config(self.meta) if args.is_moe else {}
        self._tensors = {}
        for t in self._reader.tensors:
            name = self._canonical(t.name)
            if name is None:
                raise ValueError(f"{path}: unsupported tensor {t.name}")
            self._tensors[name] = t
        if scaling := gguf_longrope(self.meta, self._tensors, path):  # Phi-3's
            args.rope_scaling = scaling
        args.tie_word_embeddings = "lm_head.weight" not in self._tensors
        if args.tie_word_embeddings and fold_factor(
            self.config, args, "lm_head.weight"
        ) != fold_factor(self.config, args, "embed_tokens.weight"):
            # scaled apart (Granite's multipliers): the head is stored on its own
            args.tie_word_embeddings = False
            self._tensors["lm_head.weight"] = self._tensors["embed_tokens.weight"]
        if args.model_type is None and not args.is_moe:  # a variant: its biases
            args.attention_bias = "layers.0.self_attn.q_proj.bias" in self._tensors
        self.args = args
        # GGUF lists dims innermost first; NumPy (and Hugging Face) outermost first
        self.shapes = {
            n: tuple(int(x) for x in reversed(t.shape))
            for n, t in self._tensors.items()
        }
        self._name_parts()
        self._name_experts()
        check_complete(self.shapes, args, path)
        divisors = rope_divisors(args)
        if "rope_freqs" not in self.shapes and divisors is not None:
            self._rope_freqs = divisors  # llama.cpp scales from the metadata
            self.shapes["rope_freqs"] = divisors.shape
        keep = list(expected_shapes(args)) + (
            ["rope_freqs"] if "rope_freqs" in self.shapes else []
        )
        self.shapes = {n: self.shapes[n] for n in keep}

    def _canonical(self, name: str) -> str | None:
        if name in GGUF_LONGROPE:
            return name
        if name in self._NAMES:
            return self._NAMES[name]
        arch = self.meta.get("general.architecture")
        names = self._LAYER_NAMES | GGUF_LAYER_NAMES.get(arch, {})
        names |= gguf_moe_layer_names(self.meta)
        parts = name.split(".", 2)
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in names:
            return f"layers.{parts[1]}.{names[parts[2]]}"
        return None

    def tensor(self, name: str) -> np.ndarray:
        import gguf

        if name in self._split:
            return self._part(name)
        if name in self._joined:  # Granite's shared gate and up rows, one matrix
            return np.concatenate([self.tensor(p) for p in self._joined[name]])
        if name in self._experts:  # a slice of a layer's expert stack
            return self._folded(name, self._expert(name))
        if name not in self._tensors:  # rope_freqs from the metadata
            return self._rope_freqs
        t = self._tensors[name]
        shape = tuple(int(x) for x in reversed(t.shape))  # a fused one's too
        data = t.data.reshape(shape[0], -1) if len(shape) > 1 else t.data
        values = np.empty(shape, dtype=np.float32)
        try:
            # row chunks: dequantizing a whole embedding at once costs 2-3x its size
            for start in range(0, shape[0], 4096):
                rows = gguf.quants.dequantize(data[start : start + 4096], t.tensor_type)
                values[start : start + 4096] = rows.reshape(
                    values[start : start + 4096].shape
                )
        except NotImplementedError:
            raise ValueError(
                f"{self.path}: tensor {t.tensor_type.name} quantization of {t.name} "
                "is not supported"
            ) from None
        # llama.cpp permutes q/k rows for its interleaved RoPE (of its Llama models
        # only); undo it for the HF layout
        if not self._permuted:
            return self._folded(name, values)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            values = _unpermute(values, self.args.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            values = _unpermute(values, self.args.num_key_value_heads)
        return self._folded(name, values)

    def _folded(self, name: str, values: np.ndarray) -> np.ndarray:
        factor = fold_factor(self.config, self.args, name)  # Granite's multipliers
        return values if factor == 1.0 else values * np.float32(factor)

    def native_bits(self, name: str, group_size: int) -> int | None:
        """Bits `name` is held at in a quantized layout of `group_size` when its GGUF
        blocks map to the format (group size 32 only): Q4_0, Q4_1, Q4_K: 4; Q8_0,
        Q5_K, Q3_K, IQ4_NL, IQ4_XS: 8, their values unchanged; Q6_K: 8 and Q2_K: 4,
        quantized again (see kquants.py and `native_exact`); else None."""
        if group_size != GGUF_BLOCK:
            return None
        if fold_factor(self.config, self.args, name) != 1.0:
            return None  # scaled at conversion: new values, new blocks
        if len({self._block_type(p) for p in self._joined.get(name, ())}) > 1:
            return None  # joined parts of two kinds: no one kind of blocks
        kind = self._block_type(name)
        if kind in GGUF_TYPES:
            return GGUF_TYPES[kind][0]
        return KQUANT_TYPES[kind][0] if kind in KQUANT_TYPES else None

    def native_exact(self, name: str) -> bool:
        """Whether `native_quantized(name)` keeps the source's integers (False: its
        blocks have no group-32 form and are quantized again)."""
        kind = self._block_type(name)
        return kind in GGUF_TYPES or KQUANT_TYPES[kind][2]

    def native_quantized(self, name: str) -> tuple[np.ndarray, ...]:
        """(packed, scales, biases) of `name` at `native_bits`, group size 32, from
        its blocks (values unchanged, but for K-quant scales rounded to float16: see
        kquants.py), or quantized again where `native_exact` is False; q/k rows
        unpermuted like `tensor`'s."""
        if name in self._split:  # whole rows of the fused tensor's blocks
            fused, lo, hi = self._split[name]
            return tuple(f[lo:hi] for f in self.native_quantized(fused))
        if name in self._joined:  # the parts' rows of blocks, one after the other
            parts = [self.native_quantized(p) for p in self._joined[name]]
            return tuple(np.concatenate(fields) for fields in zip(*parts, strict=True))
        if name in self._experts:  # its rows of its stack's blocks
            return self._expert_native(name)
        kind = self._block_type(name)
        if not self.native_exact(name):  # gguf's values, rounded on our grid
            return quantize(self.tensor(name), KQUANT_TYPES[kind][0], GGUF_BLOCK)
        t = self._tensors[name]
        rows = int(t.shape[-1])
        raw = t.data.reshape(rows, -1)
        if kind in GGUF_TYPES:
            fields = from_gguf_blocks(raw, kind)
        else:
            fields = from_kquant_blocks(raw, kind)
        heads = {
            "q_proj.weight": self.args.num_attention_heads,
            "k_proj.weight": self.args.num_key_value_heads,
        }.get(name.rsplit(".", 2)[-2] + ".weight")
        if heads and self._permuted:  # whole rows: blocks move along
            fields = tuple(_unpermute(f, heads) for f in fields)
        return fields

    def _block_type(self, name: str) -> str:
        name = self._split.get(name, (name,))[0]  # a fused tensor's part: its blocks
        name = self._joined.get(name, (name,))[0]  # joined parts: the first's
        name = self._experts.get(name, ((name,),))[0][0]  # an expert's: its stack's
        return self._tensors[name].tensor_type.name

    def tokenizer(self) -> tuple[dict[str, bytes], dict]:
        from .gguf_tokenizer import tokenizer_json_from_gguf

        meta = self.meta
        files = {"tokenizer.json": tokenizer_json_from_gguf(meta).encode()}
        eos = [meta.get("tokenizer.ggml.eos_token_id")]
        eos.append(meta.get("tokenizer.ggml.eot_token_id"))
        info = {
            "file": "tokenizer.json",
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_ids": list(dict.fromkeys(e for e in eos if e is not None)),
            "prepend_bos": bool(
                meta.get(
                    "tokenizer.ggml.add_bos_token",
                    meta.get("tokenizer.ggml.model") == "llama",
                )
            ),
            "chat_template": meta.get("tokenizer.chat_template"),
        }
        return files, info


def read_json(path: Path, files: dict[str, bytes] | None = None) -> dict:
    """A JSON object from `path` (or from `files[path.name]` when given; {} when it is
    not there).

    Raises:
        ValueError: not JSON, or JSON of another kind than an object.
    """
    try:
        if files is None:
            data = json.loads(path.read_bytes())
        else:
            data = json.loads(files.get(path.name, b"{}"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a JSON {type(data).__name__}, not an object")
    return data


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    rest = w.shape[1:]
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest)
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _canonical(name: str) -> str:
    if name.endswith("rotary_emb.inv_freq"):
        return ""  # recomputed from rope_theta
    # Gemma 3's multimodal checkpoints: model.language_model. or language_model.model.
    for prefix in ("model.", "language_model.", "model.", "decoder."):
        name = name.removeprefix(prefix)
    return name


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def open_checkpoint(src: str | Path) -> HFCheckpoint | GGUFCheckpoint:
    """Open a Hugging Face directory or a .gguf file.

    Raises:
        FileNotFoundError: `src` does not exist.
        ValueError: `src` is not a supported checkpoint.
    """
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / MANIFEST).is_file():
            raise ValueError(
                f"{path}: already a layout (converted): use it as it is "
                f"(--model {path}); convert takes a Hugging Face folder or a .gguf "
                "file"
            )
        return HFCheckpoint(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFCheckpoint(path)
    raise ValueError(
        f"{path}: not a GGUF file (bad magic) and not a Hugging Face directory"
    )
