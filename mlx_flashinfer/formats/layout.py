"""The flash layout (version 2): one converted model directory, read by both backends.

    manifest.json          format, version, model args, dtype, bundle spec, layer
                           offsets, every file's size and sha256, tokenizer info
    resident.safetensors   what stays in DRAM: embeddings, attention, norms, lm_head,
                           biases
    ffn.bin                per layer, one fixed-size bundle per FFN neuron (row-column
                           bundling, paper section 3.2); each layer starts on a 4 KiB
                           boundary
    predictor.safetensors  optional low-rank predictor
    tokenizer files        tokenizer.json / tokenizer.model / tokenizer_config.json

A Llama-family bundle is [gate row i, up row i, down column i], an OPT bundle
[fc1 row i, fc2 column i]: (n_parts, d_model) values, so one read brings a whole neuron.

Quantized layouts (dtype "q4", "q8"; version 2) store each part of a bundle as its
fields [packed integers, float16 scales, float16 biases] of the d_model values
(quantize.py: MLX's format), so a read still brings a whole neuron with its scales.
Resident matrices are quantized too (X.weight packed, X.scales, X.biases in
resident.safetensors, MLX's names); norms and biases stay float32. The manifest's
"quantization" records bits, group size and the bits of each quantized tensor.
Version-1 layouts (float dtypes only) open unchanged.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from .args import ModelArgs
from .quantize import BITS, QUANTIZED_DTYPES, Quantized, check_format, dequantize
from .safetensors_stream import STORAGE, decode, read_header, read_tensor
from .staging import write_file

FORMAT = "mlx-flashinfer-layout"
VERSION = 2
READS_VERSIONS = (1, 2, 3)  # version 1: the same without quantized dtypes
# Version 3: a mixture of experts, one bundle per expert (formats/experts.py); dense
# layouts stay version 2, which earlier releases read.
MOE_VERSION = 3
LAYER_ALIGNMENT = 4096
MANIFEST = "manifest.json"
RESIDENT_FILE = "resident.safetensors"
FFN_FILE = "ffn.bin"
PREDICTOR_FILE = "predictor.safetensors"
FLOAT_DTYPES = ("float16", "float32", "bfloat16")
DTYPES = FLOAT_DTYPES + tuple(QUANTIZED_DTYPES)
ARRANGEMENTS = ("bundled", "separate")
_REQUIRED = ("format", "version", "model_args", "dtype", "ffn", "resident", "files")
_REQUIRED_FFN = ("file", "bundle_parts", "bundle_bytes", "layer_alignment", "layers")


def bundle_bytes(
    args: ModelArgs,
    dtype: str,
    group_size: int | None = None,
    part_bits: list[int] | None = None,
) -> int:
    """Bytes of one neuron's bundle: (n_parts, d_model) values of `dtype` (quantized:
    each part's packed integers, scales and biases, at its bits)."""
    fields = bundle_fields(args, dtype, group_size, part_bits)
    return sum(_bytes_of_fields(f) for f in fields)


def bundle_fields(
    args: ModelArgs,
    dtype: str,
    group_size: int | None = None,
    part_bits: list[int] | None = None,
) -> list[list[tuple[str, str, int]]]:
    """Per bundle part, the fields it is stored as: [(name, storage dtype, values)].
    A float part is one field; a quantized part is packed uint32 words, then
    float16 scales and biases (`part_bits`: each part's bits, default the dtype's)."""
    d, parts = args.part_values, len(args.bundle_parts)
    if dtype not in QUANTIZED_DTYPES:
        return [[("values", dtype, d)] for _ in range(parts)]
    part_bits = part_bits or [QUANTIZED_DTYPES[dtype]] * parts
    groups = d // group_size
    return [
        [
            ("packed", "uint32", d * bits // 32),
            ("scales", "float16", groups),
            ("biases", "float16", groups),
        ]
        for bits in part_bits
    ]


def _bytes_of_fields(fields: list[tuple[str, str, int]]) -> int:
    return sum(n * np.dtype(STORAGE[t]).itemsize for _, t, n in fields)


def align_up(n: int, alignment: int = LAYER_ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON under a temporary name and rename it, so readers never see half a
    file."""
    write_file(path, (json.dumps(data, indent=1) + "\n").encode())


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content (not its whitespace), without this field
    itself."""
    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def verified_now() -> str:
    """The time stamp of a manifest's "verified" record (UTC, ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_manifest(directory: Path, manifest: dict) -> None:
    """Stamp the manifest with its own checksum and write it atomically."""
    manifest["manifest_sha256"] = manifest_digest(manifest)
    write_json_atomic(directory / MANIFEST, manifest)


@dataclass(frozen=True)
class LayerExtent:
    offset: int  # byte offset of the layer's first bundle in ffn.bin (4 KiB aligned)
    neurons: int


class Layout:
    """A converted model directory, validated on open: what is cheap to check, every
    time (the manifest's own checksum, every file's size, file names inside the
    directory); `verify` reads every byte.

    Raises (from `open`):
        FileNotFoundError: the directory or one of its files is missing.
        ValueError: the manifest is of another format/version, lacks a field, was
            edited (its checksum), names a file outside the directory, or a file's
            size differs from the manifest (truncated or replaced).
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.args = ModelArgs.from_dict(manifest["model_args"])
        self.dtype: str = manifest["dtype"]
        # quantized layouts: {"bits", "group_size", "tensors": {name: bits}}
        self.quantization: dict | None = manifest.get("quantization")
        # what floats are held as: scales, predictors (norms and biases: float32)
        self.float_dtype = "float16" if self.quantization else self.dtype
        ffn = manifest["ffn"]
        self.bundle_parts: tuple[str, ...] = tuple(ffn["bundle_parts"])
        self.bundle_bytes: int = ffn["bundle_bytes"]
        # "bundled" (one bundle per neuron) or "separate" (each part of a layer in its
        # own region: the unbundled baseline of the paper's ablation)
        self.arrangement: str = ffn.get("arrangement", "bundled")
        self.layers = [LayerExtent(e["offset"], e["neurons"]) for e in ffn["layers"]]
        self.ffn_path = path / ffn["file"]
        self.resident_path = path / manifest["resident"]
        q = self.quantization or {}
        # quantized: each part's bits (a q4 layout may keep down columns at 8)
        self.part_bits: list[int] | None = q.get("part_bits")
        self.fields = bundle_fields(
            self.args, self.dtype, q.get("group_size"), self.part_bits
        )
        self.part_bytes = [_bytes_of_fields(f) for f in self.fields]

    @property
    def field_bytes(self) -> list[tuple[int, ...]]:
        """Per bundle part, the bytes of each of its fields (FlashReader's
        `fields`)."""
        return [
            tuple(n * np.dtype(STORAGE[t]).itemsize for _, t, n in part)
            for part in self.fields
        ]

    def join_fields(self, pieces: list) -> list:
        """Arrays of each piece of a set of bundles (parts' fields, part-major, of
        either backend) -> one weight per part: the array itself, or a `Quantized`
        of its packed integers, scales and biases."""
        if not self.quantization:
            return list(pieces)
        group = self.quantization["group_size"]
        return [
            Quantized(*pieces[3 * p : 3 * p + 3], bits, group)
            for p, bits in enumerate(self.part_bits)
        ]

    def split_fields(self, raw: np.ndarray) -> list[np.ndarray]:
        """Bundles as bytes (n, bundle_bytes) uint8 -> a view of each piece: (n,
        values) of its storage dtype, rows contiguous, row stride bundle_bytes."""
        starts = np.cumsum([0] + self.part_bytes).tolist()
        return self._field_views([raw[:, a:b] for a, b in pairwise(starts)])

    def _field_views(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """Each part's bytes (n, part bytes) uint8 -> a view of each of its fields,
        part-major."""
        views = []
        for rows, fields in zip(parts, self.fields, strict=True):
            offset = 0
            for _, dtype, n in fields:
                size = n * np.dtype(STORAGE[dtype]).itemsize
                views.append(rows[:, offset : offset + size].view(STORAGE[dtype]))
                offset += size
        return views

    @classmethod
    def open(cls, path: str | Path) -> Layout:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such layout directory")
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{path}: not a converted model (no {MANIFEST}); "
                f"convert it first: flashinfer convert SRC {path}"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{manifest_path}: not valid JSON ({err})") from None
        try:
            _check_manifest(manifest, manifest_path)
            _check_file_names(manifest, path, manifest_path)
            layout = cls(path, manifest)
            layout.check_sizes()
        except (
            KeyError,
            TypeError,
            AttributeError,
        ) as err:  # a field of the wrong shape
            raise ValueError(f"{manifest_path}: malformed manifest ({err!r})") from None
        return layout

    # -- validation -------------------------------------------------------------------
    def check_sizes(self) -> None:
        """Cheap check on open: every file exists with the size the manifest records."""
        for name, entry in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                raise FileNotFoundError(f"{file}: missing (the layout is incomplete)")
            size = file.stat().st_size
            if size != entry["size"]:
                raise ValueError(
                    f"{file}: size {size} bytes, manifest says {entry['size']} "
                    "(truncated or replaced; re-convert the model)"
                )

    def verify(self, progress: bool = False) -> None:
        """Check every file's sha256 against the manifest.

        Raises:
            ValueError: naming the first file whose contents changed.
        """
        from tqdm import tqdm

        self.check_sizes()
        _check_digest(self.manifest, self.path / MANIFEST)
        files = self.manifest["files"]
        for name in tqdm(files, desc="verify", disable=not progress, unit="file"):
            if sha256_file(self.path / name) != files[name]["sha256"]:
                raise ValueError(
                    f"{self.path / name}: checksum mismatch (the file was modified or "
                    "corrupted; re-convert the model)"
                )

    # -- sizes ------------------------------------------------------------------------
    def file_bytes(self, name: str) -> int:
        entry = self.manifest["files"].get(name)
        return entry["size"] if entry else 0

    @property
    def ffn_bytes(self) -> int:
        """Bytes of FFN bundles (without layer alignment padding)."""
        return sum(e.neurons for e in self.layers) * self.bundle_bytes

    @property
    def resident_bytes(self) -> int:
        return self.file_bytes(self.manifest["resident"])

    @property
    def weights_id(self) -> str:
        """A short digest of the model's shape and weights (the model args, the
        resident and FFN files' checksums): equal for two layouts that compute the
        same, whatever their paths. A saved prompt cache records it
        (prompt_cache.py)."""
        files = self.manifest["files"]
        names = (self.manifest["resident"], self.ffn_path.name)
        content = [self.manifest["model_args"], [files[n]["sha256"] for n in names]]
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode())
        return digest.hexdigest()[:16]

    @property
    def has_predictor(self) -> bool:
        return bool(self.manifest.get("predictor"))

    # -- reading (buffered; the flash runtime has its own page-cache-bypassing reader)
    def read_bundles(
        self, layer: int, start: int = 0, stop: int | None = None
    ) -> np.ndarray:
        """Bundles [start, stop) of `layer` as float32 of shape (n, n_parts,
        d_model)."""
        extent = self.layers[layer]
        stop = extent.neurons if stop is None else stop
        parts = len(self.bundle_parts)
        regions = parts if self.arrangement == "separate" else 1
        piece = self.bundle_bytes // regions
        blocks = []
        with open(self.ffn_path, "rb") as f:
            for p in range(regions):
                f.seek(extent.offset + p * extent.neurons * piece + start * piece)
                blocks.append(f.read((stop - start) * piece))
        if any(len(b) != (stop - start) * piece for b in blocks):
            raise ValueError(f"{self.ffn_path}: truncated while reading layer {layer}")
        raw = [np.frombuffer(b, dtype=STORAGE[self.dtype]) for b in blocks]
        shape = (stop - start, parts, self.args.part_values)
        if regions > 1:  # (parts, n, d) regions -> (n, parts, d) bundles
            shape_p = (stop - start, self.args.part_values)
            return np.stack(
                [decode(r, self.dtype).reshape(shape_p) for r in raw], 1
            ).astype(np.float32, copy=False)
        return decode(raw[0], self.dtype).astype(np.float32, copy=False).reshape(shape)

    def read_parts(self, layer: int) -> list:
        """Every bundle of `layer` as stored, one weight per part, viewing the bytes
        read: (n, d_model) of the storage dtype (float16, float32, or bfloat16 as
        uint16 bits), or a `Quantized` of (n, d_model); what the backends hold."""
        extent = self.layers[layer]
        n, size = extent.neurons, extent.neurons * self.bundle_bytes
        with open(self.ffn_path, "rb") as f:
            f.seek(extent.offset)
            raw = np.frombuffer(f.read(size), dtype=np.uint8)
        if raw.nbytes != size:
            raise ValueError(f"{self.ffn_path}: truncated while reading layer {layer}")
        if self.arrangement == "separate":  # one region per part, part after part
            regions = np.split(raw, np.cumsum(self.part_bytes)[:-1] * n)
            return self.join_fields(
                self._field_views([r.reshape(n, -1) for r in regions])
            )
        return self.join_fields(self.split_fields(raw.reshape(n, -1)))

    def resident_tensors(self) -> dict[str, np.ndarray]:
        """Every resident tensor as float32 NumPy (the dense reference path)."""
        return dict(self.iter_resident())

    def iter_resident(self, stored: bool = False):
        """(name, NumPy array) of each resident tensor, one at a time, so a caller
        converting them (to MLX, say) never holds two copies of them all: float32,
        or with `stored` in the layout's storage form (see `read_parts`; a
        quantized matrix as one `Quantized` under its weight's name)."""
        header, start = read_header(self.resident_path)
        quantized = (self.quantization or {}).get("tensors", {})
        for name, info in header.items():
            if name.endswith((".scales", ".biases")):
                continue  # read with their weight
            tensor = read_tensor(self.resident_path, info, start, stored=True)
            if name in quantized:
                base = name.removesuffix(".weight")
                tensor = Quantized(
                    tensor,
                    *(
                        read_tensor(self.resident_path, header[base + k], start, True)
                        for k in (".scales", ".biases")
                    ),
                    quantized[name],
                    self.quantization["group_size"],
                )
                if not stored:
                    tensor = dequantize(
                        tensor.packed,
                        tensor.scales,
                        tensor.biases,
                        tensor.bits,
                        tensor.group_size,
                    )
            elif not stored:
                tensor = read_tensor(self.resident_path, info, start)
            yield name, tensor if stored else tensor.astype(np.float32)

    def update_manifest(self, changes: dict) -> None:
        """Merge `changes` into the manifest and rewrite it atomically."""
        self.manifest.update(changes)
        write_manifest(self.path, self.manifest)


def _check_manifest(manifest: dict, where: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: not an {FORMAT} manifest")
    if manifest.get("version") not in READS_VERSIONS:
        raise ValueError(
            f"{where}: layout version {manifest.get('version')!r} is not supported "
            f"(this mlx-flashinfer reads versions "
            f"{', '.join(map(str, READS_VERSIONS))}); re-convert the model"
        )
    missing = [k for k in _REQUIRED if k not in manifest]
    missing += [f"ffn.{k}" for k in _REQUIRED_FFN if k not in manifest.get("ffn", {})]
    if missing:
        raise ValueError(f"{where}: manifest lacks {', '.join(missing)}")
    if manifest["ffn"].get("arrangement", "bundled") not in ARRANGEMENTS:
        raise ValueError(f"{where}: unknown ffn arrangement")
    if manifest["dtype"] not in DTYPES:
        raise ValueError(f"{where}: unknown dtype {manifest['dtype']!r}")
    try:
        args = ModelArgs.from_dict(manifest["model_args"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: bad model_args ({err})") from None
    if args.is_moe != (manifest["version"] == MOE_VERSION):
        raise ValueError(
            f"{where}: layout version {manifest['version']} does not match its model "
            f"({'a mixture of experts' if args.is_moe else 'a dense FFN'})"
        )
    ffn = manifest["ffn"]
    group, part_bits = _check_quantization(manifest, args, where)
    if (
        ffn["bundle_bytes"] != bundle_bytes(args, manifest["dtype"], group, part_bits)
        or len(ffn["layers"]) != args.num_hidden_layers
    ):
        raise ValueError(f"{where}: ffn bundle spec does not match the model args")
    _check_digest(manifest, where)


def _check_quantization(
    manifest: dict, args: ModelArgs, where: Path
) -> tuple[int | None, list[int] | None]:
    """The group size and part bits of a quantized layout (None for a float one),
    its record checked against the dtype and the model's width."""
    dtype, q = manifest["dtype"], manifest.get("quantization")
    if dtype not in QUANTIZED_DTYPES:
        if q:
            raise ValueError(f"{where}: quantization recorded for a {dtype} layout")
        return None, None
    if not isinstance(q, dict) or q.get("bits") != QUANTIZED_DTYPES[dtype]:
        raise ValueError(f"{where}: a {dtype} layout without its quantization record")
    try:
        check_format(q["bits"], q["group_size"], args.hidden_size, "d_model")
        part_bits = q["part_bits"]
        if len(part_bits) != len(args.bundle_parts) or set(part_bits) - set(BITS):
            raise ValueError(f"part bits {part_bits}")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{where}: bad quantization record ({err})") from None
    return q["group_size"], part_bits


def _check_digest(manifest: dict, where: Path) -> None:
    # after the structure checks, so a manifest of another version says that instead
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise ValueError(
            f"{where}: checksum mismatch (edited or corrupted; re-convert the model)"
        )


def _check_file_names(manifest: dict, path: Path, where: Path) -> None:
    """Every file the manifest names is listed in its "files" (so its size is
    checked) and lies inside the layout directory: no absolute paths, no "..", no
    symlink leading out."""
    files = manifest["files"]
    named = {"resident": manifest["resident"], "ffn.file": manifest["ffn"]["file"]}
    for section in ("predictor", "tokenizer"):
        if manifest.get(section):
            named[f"{section}.file"] = manifest[section]["file"]
    for field, name in named.items():
        if not isinstance(name, str) or name not in files:
            raise ValueError(f"{where}: {field} {name!r} is not among its files")
    root = path.resolve()
    for name in files:
        relative = Path(name)
        if not name or relative.is_absolute() or ".." in relative.parts:
            raise ValueError(
                f"{where}: names {name!r}, outside the layout directory "
                "(a crafted manifest?); re-convert the model"
            )
        if not (root / relative).resolve().is_relative_to(root):
            raise ValueError(
                f"{path / name}: a symlink leading outside the layout directory; "
                "copy the file in, or re-convert the model"
            )
