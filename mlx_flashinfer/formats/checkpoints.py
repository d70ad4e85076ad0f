"""Source checkpoints: a Hugging Face directory or a GGUF file, read one tensor at a
time.

Both expose the same small surface to the converter: `args`, `shapes` (canonical tensor
name -> shape), `tensor(name)` as float32 NumPy, and the tokenizer to carry over.
Canonical names are the Hugging Face names without the `model.` / `model.decoder.`
prefix, so the model reads the checkpoint's own attribute names (no mapping table).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .args import ModelArgs
from .experts import fold_factor, moe_expected_shapes
from .layout import MANIFEST
from .quantize import GGUF_BLOCK, GGUF_TYPES, from_gguf_blocks
from .safetensors_stream import read_header, read_tensor

HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of `args` needs, canonical name -> shape (out, in)."""
    d, f, v, hd = (
        args.hidden_size,
        args.intermediate_size,
        args.vocab_size,
        args.head_dim,
    )
    q, kv = args.num_attention_heads * hd, args.num_key_value_heads * hd
    if args.is_moe:
        return moe_expected_shapes(args)
    if args.family == "llama":
        shapes = {"embed_tokens.weight": (v, d), "norm.weight": (d,)}
        if not args.tie_word_embeddings:
            shapes["lm_head.weight"] = (v, d)
        for i in range(args.num_hidden_layers):
            p = f"layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
            }
            if args.attention_bias:
                shapes |= {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                    p + "self_attn.o_proj.bias": (d,),
                }
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


def _check_complete(shapes: dict, args: ModelArgs, where: Path) -> None:
    for name, shape in expected_shapes(args).items():
        if name not in shapes:
            raise ValueError(f"{where}: checkpoint lacks tensor {name}")
        if tuple(shapes[name]) != shape:
            raise ValueError(
                f"{where}: tensor {name} has shape {tuple(shapes[name])}, "
                f"expected {shape}"
            )


class HFCheckpoint:
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
        if "lm_head.weight" not in self._where:
            args.tie_word_embeddings = True  # a checkpoint without lm_head ties it
        if args.tie_word_embeddings and fold_factor(
            self.config, args, "lm_head.weight"
        ) != fold_factor(self.config, args, "embed_tokens.weight"):
            # scaled apart (Granite's multipliers): the head is stored on its own
            args.tie_word_embeddings = False
            self._where["lm_head.weight"] = self._where["embed_tokens.weight"]
        self.args = args
        self.shapes = {
            n: tuple(info["shape"]) for n, (_, info, _) in self._where.items()
        }
        _check_complete(self.shapes, args, path)
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
        file, info, start = self._where[name]
        values = read_tensor(file, info, start).astype(np.float32, copy=False)
        factor = fold_factor(self.config, self.args, name)
        return values if factor == 1.0 else values * np.float32(factor)

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


class GGUFCheckpoint:
    """A GGUF file (Llama architecture), dequantized tensor by tensor."""

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
        self._tensors = {}
        for t in self._reader.tensors:
            name = self._canonical(t.name)
            if name is None:
                raise ValueError(f"{path}: unsupported tensor {t.name}")
            self._tensors[name] = t
        args.tie_word_embeddings = "lm_head.weight" not in self._tensors
        args.attention_bias = "layers.0.self_attn.q_proj.bias" in self._tensors
        self.args = args
        # GGUF lists dims innermost first; NumPy (and Hugging Face) outermost first
        self.shapes = {
            n: tuple(int(x) for x in reversed(t.shape))
            for n, t in self._tensors.items()
        }
        _check_complete(self.shapes, args, path)
        keep = list(expected_shapes(args)) + (
            ["rope_freqs"] if "rope_freqs" in self.shapes else []
        )
        self.shapes = {n: self.shapes[n] for n in keep}

    def _canonical(self, name: str) -> str | None:
        if name in self._NAMES:
            return self._NAMES[name]
        parts = name.split(".", 2)
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in self._LAYER_NAMES:
            return f"layers.{parts[1]}.{self._LAYER_NAMES[parts[2]]}"
        return None

    def tensor(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        shape = self.shapes[name]
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
        # llama.cpp permutes q/k rows for its interleaved RoPE; undo it for the HF
        # layout
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            values = _unpermute(values, self.args.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            values = _unpermute(values, self.args.num_key_value_heads)
        return values

    def native_bits(self, name: str, group_size: int) -> int | None:
        """Bits of `name` when its GGUF blocks are a quantized layout's format at
        `group_size` (Q4_0, Q4_1: 4; Q8_0: 8; group size 32), else None."""
        kind = self._tensors[name].tensor_type.name
        if kind in GGUF_TYPES and group_size == GGUF_BLOCK:
            return GGUF_TYPES[kind][0]
        return None

    def native_quantized(self, name: str) -> tuple[np.ndarray, ...]:
        """(packed, scales, biases) of `name` from its blocks, values unchanged
        (see `native_bits`); q/k rows unpermuted like `tensor`'s."""
        t = self._tensors[name]
        rows = self.shapes[name][0]
        fields = from_gguf_blocks(t.data.reshape(rows, -1), t.tensor_type.name)
        heads = {
            "q_proj.weight": self.args.num_attention_heads,
            "k_proj.weight": self.args.num_key_value_heads,
        }.get(name.rsplit(".", 2)[-2] + ".weight")
        if heads:  # a permutation of whole rows: the blocks move with them
            fields = tuple(_unpermute(f, heads) for f in fields)
        return fields

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
    for prefix in ("model.", "decoder."):
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
