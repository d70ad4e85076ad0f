"""mlx-community checkpoints: MLX's quantized safetensors, read as a source.

mlx-lm's `convert -q` writes a Hugging Face folder whose config.json says
`"quantization": {"group_size": 64, "bits": 4}` (with per-module overrides beside:
`"model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8}`, or `false` for one
kept float), and stores each quantized Linear or Embedding `X` as three tensors:
`X.weight` uint32 (out, in * bits / 32), `X.scales` and `X.biases` (out, in /
group_size) in the model's float type; value = scale * q + bias per group along the
input (`mx.quantize`'s affine mode). A mixture of experts stacks its experts per
layer: `mlp.switch_mlp.{gate,up,down}_proj.*` with a leading expert axis
(Mixtral's and Granite-MoE's under `block_sparse_moe`; Granite's are its
`input_linear` split in two and its `output_linear` renamed, by mlx-lm's sanitize).

`MLXQuantized` turns those into what `HFCheckpoint` serves: every tensor under its
plain name and shape (expert e of a stacked tensor as the per-expert name, its slice
of the file, nothing copied; Granite's stacks joined back into its own), dequantized
on request, or as stored (`fields`) for a
quantized layout to take without a second rounding: 4- and 8-bit groups of 32, 64 or
128 are its format, packed the same way (formats/quantize.py). Scales and biases are
float16 there: float16 scales go across unchanged, bfloat16 ones too (float16 holds
bfloat16's 8 significant bits down to 2**-17, its subnormals included); smaller ones
(a group of weights all within ~1e-4 of each other) round to the nearest float16,
by at most 2**-25, counted in `rounded`, as are scales and biases a multiplier was
folded into (Granite's: w * f = q * (s * f) + b * f, rounded to float16 once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .experts import FAMILIES, expert_parts, expert_tensor_names
from .quantize import BITS, unpack
from .safetensors_stream import read_tensor

AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)  # what mx.quantize's affine mode packs
AFFINE_GROUPS = (32, 64, 128)
SWITCH_PARTS = ("gate_proj", "up_proj", "down_proj")  # mlx-lm's SwitchGLU
_SWITCH = re.compile(
    r"layers\.(\d+)\.(\w+)\.switch_mlp\.(\w+)\.(weight|scales|biases)$"
)

Where = tuple[Path, dict, int]  # a tensor's file, header entry, data start


@dataclass(frozen=True)
class Stored:
    """A quantized tensor as the checkpoint holds it."""

    bits: int
    group_size: int
    scales: Where
    biases: Where


def read_quantization(config: dict, where: Path, canonical) -> tuple | None:
    """(default (bits, group_size), {module's canonical name: (bits, group_size) or
    None when kept float}) of config.json's MLX quantization block, None without one.

    Raises:
        ValueError: a quantization this reader does not take (another mode than
            affine, a Hugging Face method such as GPTQ, or bits / group sizes MLX
            does not have), named.
    """
    block = config.get("quantization")
    hf = config.get("quantization_config")
    if block is None and isinstance(hf, dict):
        if hf.get("quant_method"):  # GPTQ, AWQ, bitsandbytes, fp8...
            raise ValueError(
                f"{where}: quantization {hf['quant_method']!r} is not supported "
                "(MLX's affine groups are, as mlx-community's checkpoints store them)"
            )
        if "bits" in hf:
            block = hf  # mlx-lm writes both; some tools keep only this one
    if block is None:
        return None
    if not isinstance(block, dict):
        raise ValueError(f"{where}: quantization is not an object: {block!r}")
    mode = block.get("mode", "affine")
    if mode != "affine":
        raise ValueError(
            f"{where}: quantization mode {mode!r} is not supported (only MLX's "
            "affine groups: scale * q + bias)"
        )
    default = _format(block, where, "quantization")
    overrides = {}
    for key, value in block.items():
        if isinstance(value, dict | bool):
            overrides[canonical(key + ".weight").removesuffix(".weight")] = (
                _format(value, where, key) if value else None
            )
    return default, overrides


def _format(entry: dict, where: Path, what: str) -> tuple[int, int]:
    bits, group = entry.get("bits", 4), entry.get("group_size", 64)
    if bits not in AFFINE_BITS or group not in AFFINE_GROUPS:
        raise ValueError(
            f"{where}: {what}: {bits} bits in groups of {group} is not MLX's affine "
            f"format (bits {AFFINE_BITS}, groups {AFFINE_GROUPS})"
        )
    return bits, group


class MLXQuantized:
    """An mlx-community checkpoint's quantized and stacked tensors over `where`
    (canonical name -> Where, as `HFCheckpoint` reads headers; changed in place:
    scales and biases leave it, each stacked expert tensor is replaced by its
    experts' slices)."""

    def __init__(self, config: dict, args, where: dict, path: Path, canonical):
        self.path = path
        spec = read_quantization(config, path / "config.json", canonical)
        self.stored: dict[str, Stored] = {}
        self.rounded = 0  # scales and biases float16 does not hold exactly
        self._counted: set[str] = set()  # a fused tensor is read once per part
        # Granite's input_linear: (its gate stack, its up stack), read joined
        self.joined: dict[str, tuple[str, str]] = {}
        self._parts: dict[str, Where] = {}  # those stacks' places
        default, overrides = spec or (None, {})
        self.default = default  # (bits, group size) of most tensors
        for name in [n for n in where if n.endswith(".scales")]:
            base = name.removesuffix(".scales")
            weight, biases = base + ".weight", base + ".biases"
            if default is None:
                raise ValueError(
                    f"{path}: {name} is stored but config.json has no quantization "
                    "block (group_size, bits)"
                )
            if weight not in where or biases not in where:
                raise ValueError(f"{path}: {name} without {weight} and {biases}")
            bits, group = overrides.get(base) or default  # overrides name modules
            self.stored[weight] = Stored(
                bits, group, where.pop(name), where.pop(biases)
            )
            self._check(weight, where[weight])
        if args.is_moe:
            self._unstack(args, where)

    def _check(self, name: str, at: Where) -> None:
        s = self.stored[name]
        packed, scales = at[1]["shape"], s.scales[1]["shape"]
        if at[1]["dtype"] != "U32" or packed[:-1] != scales[:-1]:
            raise ValueError(
                f"{self.path}: {name} is no packed uint32 matrix beside its scales"
            )
        if packed[-1] * 32 != scales[-1] * s.group_size * s.bits:
            raise ValueError(
                f"{self.path}: {name}: {packed[-1]} words and {scales[-1]} groups "
                f"per row do not fit {s.bits} bits in groups of {s.group_size}; is "
                "config.json's quantization block (or its override) right?"
            )

    def shape(self, name: str, at: Where) -> tuple[int, ...]:
        """The logical shape of `name` (its values, not its packed words)."""
        if name in self.joined:  # the gate and up stacks' rows, one after the other
            gate = self.joined[name][0]
            experts, rows, cols = self.shape(gate, self._parts[gate])
            return experts, 2 * rows, cols
        shape = tuple(at[1]["shape"])
        s = self.stored.get(name)
        return shape if s is None else (*shape[:-1], shape[-1] * 32 // s.bits)

    def alias(self, name: str, of: str) -> None:
        """`name` read from `of`'s tensors (a tied head stored apart)."""
        if of in self.stored:
            self.stored[name] = self.stored[of]

    def read(self, name: str, at: Where) -> np.ndarray:
        """The values of `name`, float32: dequantized, joined, or as stored."""
        if name in self.joined:
            parts = self.joined[name]
            return np.concatenate([self.read(n, self._parts[n]) for n in parts], 1)
        if name in self.stored:
            return self.values(name, at)
        return read_tensor(*at).astype(np.float32, copy=False)

    def _unstack(self, args, where: dict) -> None:
        """Expert e of each `switch_mlp` tensor (experts, out, in) under the name
        of the family's per-expert tensor, as a slice of the file; Granite's
        stacks as its own (`_restack`)."""
        family = FAMILIES[args.moe_type]
        for name in [n for n in where if _SWITCH.match(n)]:
            layer, block, part, _ = _SWITCH.match(name).groups()
            if block != family.block or part not in SWITCH_PARTS:
                raise ValueError(
                    f"{self.path}: {name}: stacked experts of {args.moe_type} are "
                    f"not read under {block} (only {family.block}.switch_mlp's "
                    f"{SWITCH_PARTS})"
                )
            if family.fused:
                continue
            at, s = where.pop(name), self.stored.pop(name, None)
            for e in range(args.num_experts):
                expert = expert_parts(args, int(layer), e)[SWITCH_PARTS.index(part)]
                where[expert[0]] = _slice(at, e, args.num_experts, self.path, name)
                if s is not None:
                    self.stored[expert[0]] = Stored(
                        s.bits,
                        s.group_size,
                        _slice(s.scales, e, args.num_experts, self.path, name),
                        _slice(s.biases, e, args.num_experts, self.path, name),
                    )
        if family.fused:
            for layer in range(args.num_hidden_layers):
                self._restack(args, layer, where)

    def _restack(self, args, layer: int, where: dict) -> None:
        """Granite's stacks from mlx-lm's `switch_mlp`, which split its
        input_linear (experts, 2 * n, d_model) into gate_proj and up_proj and
        renamed output_linear down_proj: output_linear is the down stack itself,
        input_linear the gate and up stacks joined along their rows (`joined`;
        each expert's rows are whole groups, so their groups join too)."""
        gate_up, down = expert_tensor_names(args, layer)
        switch = f"layers.{layer}.{FAMILIES[args.moe_type].block}.switch_mlp."
        gate, up, down_proj = (switch + p + ".weight" for p in SWITCH_PARTS)
        if not all(n in where for n in (gate, up, down_proj)):
            return  # not mlx-lm's form: check_complete names what is missing
        where[down] = where.pop(down_proj)
        if down_proj in self.stored:
            self.stored[down] = self.stored.pop(down_proj)
        shapes = [tuple(self.shape(n, where[n])) for n in (gate, up)]
        if shapes[0] != shapes[1] or len(shapes[0]) != 3:
            raise ValueError(
                f"{self.path}: {gate} and {up} are {shapes[0]} and {shapes[1]}: "
                "not two stacks of one shape"
            )
        self.joined[gate_up] = (gate, up)
        self._parts |= {gate: where.pop(gate), up: where.pop(up)}
        where[gate_up] = self._parts[gate]  # its shape: `shape` doubles the rows
        g, u = (self.stored.get(n) for n in (gate, up))
        if g and u and (g.bits, g.group_size) == (u.bits, u.group_size):
            self.stored[gate_up] = g  # their format; `fields` joins their groups

    def native_bits(self, name: str, group_size: int) -> int | None:
        """Bits of `name` when a quantized layout at `group_size` holds its groups
        as stored (4 or 8 bits at that group size), else None."""
        s = self.stored.get(name)
        if s is None or s.bits not in BITS or s.group_size != group_size:
            return None
        return s.bits

    def bits(self, name: str) -> int | None:
        """Bits `name` is stored at, None for a float tensor."""
        s = self.stored.get(name)
        return s and s.bits

    def fields(
        self, name: str, at: Where, factor: float = 1.0
    ) -> tuple[np.ndarray, ...]:
        """(packed, scales, biases) of `name` as stored, scales and biases float16
        (see the module docstring for where bfloat16 ones round); times `factor`
        (a multiplier folded in: w * f = q * (s * f) + b * f, the integers kept,
        scales and biases multiplied and rounded to float16, counted in
        `rounded`)."""
        if name in self.joined:  # whole rows: the parts' groups, one after the other
            parts = [self.fields(n, self._parts[n], factor) for n in self.joined[name]]
            return tuple(np.concatenate(f, axis=1) for f in zip(*parts, strict=True))
        s = self.stored[name]
        packed = read_tensor(*at)
        scales = self._float16(s.scales, name, factor)
        biases = self._float16(s.biases, name, factor)
        self._counted.add(name)
        return packed, scales, biases

    def _float16(self, at: Where, name: str, factor: float) -> np.ndarray:
        stored = read_tensor(*at, stored=True)
        if stored.dtype == np.float16 and factor == 1.0:
            return stored
        wide = read_tensor(*at)  # float32, exact for bfloat16 and float32
        if factor != 1.0:
            wide = wide * np.float32(factor)
        with np.errstate(over="ignore"):
            narrow = wide.astype(np.float16)
        if not np.isfinite(narrow[np.isfinite(wide)]).all():
            raise ValueError(
                f"{self.path}: {name}: scales or biases beyond float16's range"
            )
        if name not in self._counted:
            self.rounded += int(np.count_nonzero(narrow.astype(np.float32) != wide))
        return narrow

    def values(self, name: str, at: Where) -> np.ndarray:
        """`name` dequantized, float32: scale * q + bias per group."""
        s = self.stored[name]
        packed = read_tensor(*at)
        scales, biases = read_tensor(*s.scales), read_tensor(*s.biases)
        k = packed.shape[-1] * 32 // s.bits
        out = np.empty((*packed.shape[:-1], k), dtype=np.float32)
        rows = packed.reshape(-1, packed.shape[-1])
        flat = out.reshape(-1, k)
        for lo in range(0, len(rows), 4096):  # bounded temporaries
            q = unpack_any(rows[lo : lo + 4096], s.bits).astype(np.float32)
            groups = q.reshape(len(q), -1, s.group_size)
            sc = scales.reshape(-1, groups.shape[1])[lo : lo + 4096, :, None]
            bi = biases.reshape(-1, groups.shape[1])[lo : lo + 4096, :, None]
            flat[lo : lo + 4096] = (groups * sc + bi).reshape(len(q), k)
        return out


def unpack_any(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words (rows, w) -> the integers (rows, w * 32 / bits), uint8, for any
    bits MLX packs: 3, 5 and 6 bits run across words as one little-endian stream of
    bits (value j at bit j * bits), the others are `quantize.unpack`'s."""
    if 32 % bits == 0:
        return unpack(packed, bits)
    stream = np.unpackbits(
        np.ascontiguousarray(packed, dtype="<u4").view(np.uint8),
        axis=-1,
        bitorder="little",
    )
    k = packed.shape[-1] * 32 // bits
    lanes = stream.reshape(len(packed), k, bits)
    weights = (1 << np.arange(bits)).astype(np.uint8)
    return (lanes * weights).sum(axis=-1, dtype=np.uint8)


def _slice(at: Where, e: int, experts: int, path: Path, name: str) -> Where:
    """Expert e's part of a stacked tensor's header entry: its bytes are contiguous."""
    file, info, start = at
    shape = info["shape"]
    if not shape or shape[0] != experts:
        raise ValueError(f"{path}: {name} has shape {shape}, not {experts} experts")
    begin, end = info["data_offsets"]
    size = (end - begin) // experts
    part = {
        "dtype": info["dtype"],
        "shape": shape[1:],
        "data_offsets": [begin + e * size, begin + (e + 1) * size],
    }
    return file, part, start
