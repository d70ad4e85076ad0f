"""Convert a Hugging Face directory or a GGUF file into the flash layout.

Streams tensor by tensor (peak memory near one layer's FFN), writes into a temporary
directory beside the destination and renames it at the end, so an interrupted or failed
conversion leaves nothing that loads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .checkpoints import ffn_parts, open_checkpoint
from .layout import (
    ARRANGEMENTS,
    DTYPES,
    FFN_FILE,
    FORMAT,
    LAYER_ALIGNMENT,
    RESIDENT_FILE,
    VERSION,
    align_up,
    bundle_bytes,
    write_manifest,
)
from .safetensors_stream import StreamingWriter, encode


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str = "float16",
    force: bool = False,
    progress: bool = True,
    arrangement: str = "bundled",
) -> Path:
    """Convert `src` (Hugging Face directory or .gguf file) into a layout at `dst`.

    Args:
        src: checkpoint directory (config.json + safetensors + tokenizer) or GGUF file.
        dst: layout directory to create.
        dtype: storage dtype of weights: "float16" (default), "float32" or "bfloat16".
            1-D tensors (norms, biases) are always stored as float32.
        force: replace an existing `dst`.
        progress: show a progress bar.
        arrangement: "bundled" (row-column bundles, the default) or "separate" (each
            bundle part of a layer in its own region: the unbundled baseline for
            benchmarks).

    Returns:
        The layout directory.

    Raises:
        FileNotFoundError: `src` does not exist.
        FileExistsError: `dst` exists and is not empty and `force` is false.
        ValueError: `src` is not a supported checkpoint, or `dtype` is unknown.
    """
    _check_destination(dst, dtype, arrangement, force)
    return write_layout(open_checkpoint(src), dst, dtype, progress, arrangement)


def _check_destination(dst, dtype: str, arrangement: str, force: bool) -> None:
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
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())) and not force:
        raise FileExistsError(f"{dst}: already exists; pass --force to replace it")


def write_layout(
    source, dst: str | Path, dtype: str, progress: bool, arrangement: str = "bundled"
) -> Path:
    """Write `source` (anything with args, shapes, tensor(), tokenizer(), kind, path:
    a checkpoint, or the synthetic models of synth.py) as a layout at `dst`, through a
    temporary directory renamed at the end."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_layout(source, tmp, dtype, progress, arrangement)
        _replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_layout(
    source, out: Path, dtype: str, progress: bool, arrangement: str
) -> None:
    args = source.args
    started = time.perf_counter()
    ffn_names = {
        name for i in range(args.num_hidden_layers) for name, _ in ffn_parts(args, i)
    }
    resident = {
        name: ("float32" if len(shape) == 1 else dtype, shape)
        for name, shape in source.shapes.items()
        if name not in ffn_names
    }
    item = np.dtype(encode(np.zeros(1), dtype).dtype).itemsize
    total = (
        sum(np.prod(s) for n, s in source.shapes.items() if n not in ffn_names) * item
    )
    total += sum(np.prod(source.shapes[n]) for n in ffn_names) * item
    bar = tqdm(
        total=int(total),
        unit="B",
        unit_scale=True,
        desc="convert",
        disable=not progress,
    )
    files = {}

    digest = hashlib.sha256()
    writer = StreamingWriter(out / RESIDENT_FILE, resident, hasher=digest)
    for name, (_, shape) in resident.items():
        writer.write(name, source.tensor(name))
        bar.update(int(np.prod(shape)) * item)
    writer.close()
    files[RESIDENT_FILE] = _entry(out / RESIDENT_FILE, digest)

    size = bundle_bytes(args, dtype)
    layers, offset, digest = [], 0, hashlib.sha256()
    with open(out / FFN_FILE, "wb") as f:
        for i in range(args.num_hidden_layers):
            parts = [
                source.tensor(n).T if t else source.tensor(n)
                for n, t in ffn_parts(args, i)
            ]
            # bundled: (n_ffn, n_parts, d_model); separate: (n_parts, n_ffn, d_model)
            axis = 1 if arrangement == "bundled" else 0
            bundles = encode(np.stack(parts, axis=axis), dtype)
            data = bundles.tobytes() + bytes(align_up(bundles.nbytes) - bundles.nbytes)
            f.write(data)
            digest.update(data)
            layers.append({"offset": offset, "neurons": len(parts[0])})
            offset += len(data)
            bar.update(bundles.nbytes)
    files[FFN_FILE] = _entry(out / FFN_FILE, digest)
    bar.close()

    tokenizer_files, tokenizer_info = source.tokenizer()
    for name, data in tokenizer_files.items():
        (out / name).write_bytes(data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model_args": args.to_dict(),
        "dtype": dtype,
        "resident": RESIDENT_FILE,
        "ffn": {
            "file": FFN_FILE,
            "bundle_parts": list(args.bundle_parts),
            "bundle_bytes": size,
            "layer_alignment": LAYER_ALIGNMENT,
            "arrangement": arrangement,
            "layers": layers,
        },
        "predictor": None,
        "tokenizer": tokenizer_info,
        "source": _source_identity(source),
        "conversion_seconds": round(time.perf_counter() - started, 2),
        "files": files,
    }
    write_manifest(out, manifest)


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


def _replace_dir(new: Path, dst: Path) -> None:
    """Move the finished `new` to `dst`; an old `dst` is removed only after that
    worked."""
    if not dst.exists():
        os.replace(new, dst)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    os.replace(dst, old)
    os.replace(new, dst)
    shutil.rmtree(old, ignore_errors=True)
