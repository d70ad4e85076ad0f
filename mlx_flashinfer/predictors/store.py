"""A trained predictor into its layout: the tensors written under a fresh name, then
the manifest switched to it, atomically (`store_predictor`)."""

from __future__ import annotations

import contextlib
import hashlib
import os

import numpy as np

from ..formats.layout import Layout
from ..formats.safetensors_stream import STORAGE, StreamingWriter

REPORT_KEYS = ("recall", "precision", "predicted_fraction", "true_fraction")
_DTYPE_NAMES = {np.dtype(v): k for k, v in STORAGE.items() if k != "bfloat16"}


def _write_tensors(path, tensors: dict) -> str:
    """Write safetensors tensor by tensor (a low-bit predictor is hundreds of MB at
    1B parameters: safetensors' save_file builds the whole file in memory first);
    returns the file's sha256."""
    digest = hashlib.sha256()
    specs = {k: (_DTYPE_NAMES[v.dtype], v.shape) for k, v in tensors.items()}
    writer = StreamingWriter(path, specs, hasher=digest)
    for name, value in tensors.items():
        writer.write(name, value)
    writer.close()
    return digest.hexdigest()


def check_writable(layout: Layout) -> None:
    """Raises the system's refusal (naming the layout) unless a predictor can be
    written into `layout`: checked before a calibration of minutes, not after."""
    probe = layout.path / ".predictor.new"
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        if os.fsdecode(err.filename or "") == str(probe):
            err.filename = str(layout.path)
        raise


def store_predictor(layout: Layout, tensors: dict, reports, settings: dict) -> dict:
    """Write the predictor's tensors under a fresh name, then switch the manifest to
    it; `settings` (with "kind" and "nbytes", the bytes held) go into its section."""
    tmp = layout.path / ".predictor.new"
    try:
        digest = _write_tensors(tmp, tensors)
    except BaseException as err:  # a disk full or an interrupt leaves nothing behind
        with contextlib.suppress(OSError):  # read-only: unlinking fails too
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and os.fsdecode(err.filename or "") == str(tmp):
            err.filename = str(layout.path)  # the user named the layout, not this
        raise
    name = f"predictor-{digest[:12]}.safetensors"
    old = (layout.manifest.get("predictor") or {}).get("file")
    try:
        tmp.rename(layout.path / name)
        # every other predictor file goes below: the manifest lists none of them
        files = {
            f: v
            for f, v in layout.manifest["files"].items()
            if not f.startswith("predictor-")
        }
        files[name] = {"size": (layout.path / name).stat().st_size, "sha256": digest}
        section = {
            "file": name,
            **settings,
            "report": [
                {
                    k: r[k]
                    for k in (
                        *REPORT_KEYS,
                        "window",
                        "rank",
                        "bits",
                        "epochs",
                        "fit_recall",
                    )
                    if k in r  # synthetic predictors (bench/synth.py) fit nothing
                }
                for r in reports
            ],
        }
        layout.update_manifest({"predictor": section, "files": files})
    except BaseException:
        if name != old:  # never delete the file the manifest still names
            (layout.path / name).unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        raise
    # older predictors, and those of runs killed before the manifest named them
    for file in layout.path.glob("predictor-*.safetensors"):
        if file.name != name:
            file.unlink(missing_ok=True)
    return section
