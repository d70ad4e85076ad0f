"""The two layouts of the bundling ablation: the model as given (bundled) and the same
model unbundled ("separate": each bundle part of a layer in its own region).

`unbundled_layout` writes the second from the first when none is given, by
rearranging ffn.bin's bytes layer by layer (no decoding, one layer in memory);
`check_same_model` refuses a pair that are not the same weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ..formats.layout import FFN_FILE, MANIFEST, Layout, sha256_file, write_manifest
from ..formats.model_cache import cache_root

_KEEP = {FFN_FILE, MANIFEST}


def check_same_model(bundled: Layout, unbundled: Layout) -> None:
    """Raises ValueError unless `unbundled` is `bundled`'s model, arranged separately.

    The model args, dtype and the resident weights' sha256 must match.
    """
    if unbundled.arrangement != "separate":
        raise ValueError(
            f"{unbundled.path}: --unbundled needs a layout converted with "
            f"arrangement 'separate', this one is {unbundled.arrangement!r}"
        )
    if bundled.arrangement != "bundled":
        raise ValueError(f"{bundled.path}: the model to bench must be bundled")
    resident = bundled.manifest["resident"]
    same = (
        bundled.args.to_dict() == unbundled.args.to_dict()
        and bundled.dtype == unbundled.dtype
        and bundled.manifest["files"][resident]["sha256"]
        == unbundled.manifest["files"].get(resident, {}).get("sha256")
    )
    if not same:
        raise ValueError(
            f"{unbundled.path} is not the same model as {bundled.path} (model args, "
            "dtype or resident weights differ)"
        )


def unbundled_layout(bundled: Layout, cache_dir: str | Path | None = None) -> Layout:
    """The separate-arranged copy of `bundled`, written into the cache folder once.

    Args:
        bundled: a bundled layout.
        cache_dir: the cache folder (default: see `models.cache_root`).

    Returns:
        The unbundled layout (predictor files are not copied: the bench reads the
        predictor from the bundled layout for every row).
    """
    key = bundled.manifest.get("manifest_sha256", "")[:12]
    dst = cache_root(cache_dir) / f"{bundled.path.name}-separate-{key}"
    if not (dst / MANIFEST).is_file():
        write_unbundled(bundled, dst)
    return Layout.open(dst)


def write_unbundled(bundled: Layout, dst: Path) -> Path:
    """Write `bundled` rearranged as 'separate' at `dst` (through a temporary
    directory renamed at the end). Returns `dst`."""
    if bundled.arrangement != "bundled":
        raise ValueError(f"{bundled.path}: already {bundled.arrangement!r}")
    tmp = dst.parent / f".{dst.name}.writing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _copy_files(bundled, tmp)
        write_manifest(tmp, manifest)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _copy_files(bundled: Layout, out: Path) -> dict:
    manifest = dict(bundled.manifest)
    section = manifest.get("predictor") or {}
    skip = _KEEP | {section.get("file")}
    files = {}
    for name, entry in manifest["files"].items():
        if name not in skip:
            shutil.copyfile(bundled.path / name, out / name)
            files[name] = entry
    size = bundled.bundle_bytes
    # each part's bytes within a bundle: unequal where a quantized layout holds its
    # down columns at other bits than its gate/up rows
    ends = np.cumsum(bundled.part_bytes)
    with open(bundled.ffn_path, "rb") as src, open(out / FFN_FILE, "wb") as f:
        for extent in bundled.layers:
            src.seek(extent.offset)
            data = src.read(extent.neurons * size)
            # (neurons, bundle) -> one region per part: (neurons, part bytes) each
            rows = np.frombuffer(data, np.uint8).reshape(extent.neurons, size)
            f.seek(extent.offset)  # same offsets: each layer keeps its size
            for start, end in zip(ends - bundled.part_bytes, ends, strict=True):
                f.write(np.ascontiguousarray(rows[:, start:end]).tobytes())
        f.truncate(bundled.ffn_path.stat().st_size)  # zero padding, as converted
    path = out / FFN_FILE
    files[FFN_FILE] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest["files"] = files
    manifest["ffn"] = dict(manifest["ffn"], arrangement="separate")
    manifest["predictor"] = None
    return manifest
