"""Tiny mlx-community-style checkpoints, as mlx-lm's `convert -q` writes them.

Random weights quantized by MLX's own `mx.quantize` and saved by
`mx.save_safetensors` beside a config.json with its quantization block (and
per-module overrides); a mixture of experts with its experts stacked per layer as
`switch_mlp`. Beside each, the same model dequantized (MLX's values), for a plain
Hugging Face folder to compare with. Needs mlx.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from tiny_models import tiny_tokenizer_json

from mlx_flashinfer import convert

SWITCH = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral's


def stacked(weights: dict, experts: int) -> dict:
    """Per-expert tensors stacked per layer as mlx-lm's `switch_mlp`."""
    out, groups = {}, {}
    for name, value in weights.items():
        if ".experts." not in name:
            out[name] = value
            continue
        block, rest = name.split(".experts.")
        e, part, _ = rest.split(".")
        key = f"{block}.switch_mlp.{SWITCH.get(part, part)}.weight"
        groups.setdefault(key, [None] * experts)[int(e)] = value
    return out | {k: np.stack(v) for k, v in groups.items()}


def write_mlx_checkpoint(
    path: Path,
    config: dict,
    weights: dict,
    *,
    bits: int = 4,
    group_size: int = 64,
    overrides: dict | None = None,
    dtype=None,
) -> tuple[Path, dict, dict]:
    """An mlx-community-style folder of `weights` (Hugging Face names, float32):
    every matrix whose rows the groups divide quantized by `mx.quantize` (modules in
    `overrides` at their own bits and group size, or kept float with False), the
    rest stored as `dtype` (default float16). Returns (folder, the stored tensors as
    MLX arrays, the same model dequantized: float32 NumPy under `weights`' names)."""
    dtype = dtype or mx.float16
    overrides = overrides or {}
    experts = config.get("num_experts") or config.get("num_local_experts")
    store = stacked(weights, experts) if experts else dict(weights)
    saved, values = {}, {}
    for name, w in store.items():
        module = name.removesuffix(".weight")
        fmt = overrides.get(module, {"bits": bits, "group_size": group_size})
        w = mx.array(w).astype(dtype)
        if w.ndim < 2 or not fmt or w.shape[-1] % fmt["group_size"]:
            saved[name] = w
            values[name] = np.array(w.astype(mx.float32))
            continue
        q, s, b = mx.quantize(w, group_size=fmt["group_size"], bits=fmt["bits"])
        saved |= {name: q, module + ".scales": s, module + ".biases": b}
        wide = (a.astype(mx.float32) for a in (s, b))
        values[name] = np.array(mx.dequantize(q, *wide, **fmt))
    if experts:  # the reference in the hub's per-expert names
        plain = {}
        for name in weights:
            if ".experts." in name:
                block, rest = name.split(".experts.")
                e, part, _ = rest.split(".")
                key = f"{block}.switch_mlp.{SWITCH.get(part, part)}.weight"
                plain[name] = values[key][int(e)]
            else:
                plain[name] = values[name]
        values = plain
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "model.safetensors"), saved, {"format": "mlx"})
    block = {"group_size": group_size, "bits": bits, "mode": "affine"} | overrides
    config = config | {"quantization": block, "quantization_config": block}
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path)
    return path, saved, values


def write_tokenizer(path: Path) -> None:
    (path / "tokenizer.json").write_text(tiny_tokenizer_json())
    tok_config = {"bos_token": "<s>", "eos_token": "</s>"}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))


def write_float(path: Path, config: dict, values: dict) -> Path:
    """A plain Hugging Face folder of float32 `values`."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    save_file(values, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    write_tokenizer(path)
    return path


def fields(saved: dict, module: str) -> list[np.ndarray]:
    """(packed, scales, biases) of `module` as MLX stored them, scales float16."""
    q, s, b = (saved[module + k] for k in (".weight", ".scales", ".biases"))
    return [np.array(q), np.array(s.astype(mx.float16)), np.array(b.astype(mx.float16))]


def assert_dequantizes_as_written(tmp_path, src, config: dict, values: dict):
    """The float32 layout of the quantized checkpoint `src` is byte for byte the one
    of a plain checkpoint holding its dequantized `values`; returns that plain
    checkpoint and its float32 layout."""
    f32 = convert(src, tmp_path / "f32", dtype="float32", progress=False)
    plain = write_float(tmp_path / "plain", config, values)
    ref = convert(plain, tmp_path / "ref", dtype="float32", progress=False)
    for file in ("resident.safetensors", "ffn.bin"):
        assert (f32 / file).read_bytes() == (ref / file).read_bytes()
    return plain, ref
