"""This machine's curves, measured once and kept: the disk (random reads by size and
threads, on the filesystem that holds the models: `disk.short_probe`), memory
bandwidth, and the compute rates of the products a token runs (a decode step's GEMV
and a prompt's GEMM, per stored dtype, on one thread and on all, for one backend),
with the fixed cost of a layer's small operations.

The cost model (`costs.py`) turns bytes into seconds with these: a decode step reads
every weight it multiplies once, so its time is bytes / the GEMV rate of their dtype,
and a flash read's time is bytes / the disk's rate at its read size.

Kept in the cache folder as `machines/<host>-<backend>-dev<N>.json` (N: the disk's
device number), measured by `flashinfer probe` in under a minute.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..formats.model_cache import cache_root
from ..model.backends import default_backend_name, get_backend
from .compute_probe import (
    CACHED_BYTES,
    MEMORY_BYTES,
    SIDE,
    measure_compute,
    stored_matrices,
)
from .disk import FILE_NAME, short_probe, stream_beside
from .host import cpu_model
from .reader_cost import measure_reader

FORMAT = "mlx-flashinfer-machine"
VERSION = 1
BUSY_READ = 8 << 20  # the streamed placement's span (flash/memory.STREAM_CHUNK_BYTES)


@dataclass
class Machine:
    """Measured rates of one machine, disk and backend (field order: as used)."""

    backend: str
    cpu: str
    cores: int
    disk: dict  # `disk.probe` result: cells of (read size, threads) -> bytes/s
    memory_bytes_per_s: float  # a large copy's rate (bytes read + written / 2)
    # dtype -> {"1": bytes/s on one thread, "all": on every core, and the same
    # "1 cached", "all cached" for weights the CPU's caches hold}: weights a decode
    # step's product reads per second
    gemv: dict[str, dict[str, float]] = field(default_factory=dict)
    # dtype -> {str(tokens): weight bytes per second of a product over that many
    # tokens (PROMPT_TOKENS), all cores; "64 on 1": on one}; an older probe kept
    # one float, at 64
    gemm: dict[str, dict[str, float] | float] = field(default_factory=dict)
    layer_s: float = 0.0  # a layer's small operations on one token (norms, RoPE, ...)
    # the backend's kernel path limits measured here (`product_limits`; {}: its
    # defaults), which `load` sets on this machine
    product_limits: dict[str, int] = field(default_factory=dict)
    # the same on a prompt run at once: {str(tokens): seconds} (PROMPT_LAYER_TOKENS;
    # {}: not measured, `tokens` x layer_s stands in)
    layer_prompt_s: dict[str, float] = field(default_factory=dict)
    # an FFN call's own cost beyond its products (a dense layer makes one; the
    # sparse path one per scratch-full and one for its predictor): 0 not measured
    ffn_call_s: float = 0.0
    # the flash reader's own work per call, read and byte (`reader_cost.py`; {}:
    # not measured, constants stand in)
    reader: dict = field(default_factory=dict)
    probed_at: str = ""
    seconds: float = 0.0  # the probe's own time

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Machine:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError("not a machine probe of this version (`flashinfer probe`)")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def machine_path(directory: str | Path, backend: str, cache_dir=None) -> Path:
    """Where this machine's probe for the disk holding `directory` is kept."""
    device = os.stat(directory).st_dev
    host = socket.gethostname().split(".")[0] or "host"
    return cache_root(cache_dir) / "machines" / f"{host}-{backend}-dev{device}.json"


def load_machine(path: str | Path) -> Machine:
    """A saved probe.

    Raises:
        FileNotFoundError, ValueError: missing, or not a probe.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    try:
        return Machine.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def cached_machine(directory, backend: str | None = None, cache_dir=None):
    """This machine's kept probe for the disk of `directory`, or None."""
    backend = backend or default_backend_name()
    path = machine_path(directory, backend, cache_dir)
    return load_machine(path) if path.is_file() else None


def probe_machine(
    directory: str | Path, backend: str | None = None, progress: bool = True
) -> Machine:
    """Measure the disk under `directory` and this backend's compute.

    Raises:
        ValueError: the directory's filesystem cannot bypass the page cache.
        ImportError: MLX asked for but missing.
    """
    began = time.perf_counter()
    backend = backend or default_backend_name()
    get_backend(backend)  # a missing MLX fails before the disk is written
    disk = probe_disk(directory, backend, progress)
    compute = measure_compute(backend, progress)
    return Machine(
        backend=backend,
        cpu=cpu_model(),
        cores=os.cpu_count() or 1,
        disk=disk,
        memory_bytes_per_s=memory_rate(),
        **compute,
        reader=measure_reader(),
        probed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        seconds=time.perf_counter() - began,
    )


def probe_disk(directory: str | Path, backend: str, progress: bool = True) -> dict:
    """The disk's curves (`disk.short_probe`) and its rate beside compute
    (`busy_disk`), on a test file in `directory` (removed after).

    Raises:
        ValueError: the directory's filesystem cannot bypass the page cache.
    """
    disk = short_probe(directory, progress=progress, keep=True)
    test_file = Path(directory) / FILE_NAME
    try:
        if test_file.is_file():
            disk["beside_compute"] = busy_disk(test_file, backend)
    finally:
        test_file.unlink(missing_ok=True)
    return disk


def busy_disk(file: Path, backend: str) -> dict:
    """The streamed placement's reads beside a decode step's products (float16, one
    thread): {"read_size", "bytes_per_s"}."""
    B = get_backend(backend)
    rng = np.random.default_rng(1)
    weights = [B.weight(w) for w in stored_matrices("float16", CACHED_BYTES, rng)]
    x = B.array(rng.standard_normal((1, SIDE)).astype(np.float32))
    B.limit_compute_threads(1)

    def work() -> None:
        for w in weights:
            B.synchronize(B.linear(x, w))

    try:
        rate = stream_beside(file, work, size=BUSY_READ)
    finally:
        B.limit_compute_threads(None)
    return {"read_size": BUSY_READ, "bytes_per_s": rate}


def save_machine(machine: Machine, path: str | Path) -> Path:
    """Write a probe atomically (a temporary name, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(machine.to_dict(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def memory_rate(nbytes: int = MEMORY_BYTES // 2, repeats: int = 2) -> float:
    """Bytes per second of a large copy (each byte read and written once)."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    began = time.perf_counter()
    for _ in range(repeats):
        np.copyto(dst, src)
    return 2 * nbytes * repeats / (time.perf_counter() - began)


def machine_here(
    directory: str | Path,
    backend: str | None = None,
    cache_dir=None,
    progress: bool = True,
) -> Machine:
    """This machine's kept probe for the disk of `directory`, measured now (and kept)
    when there is none, with a line on stderr saying so."""
    import sys

    backend = backend or default_backend_name()
    machine = cached_machine(directory, backend, cache_dir)
    if machine is None:
        print(
            "flashinfer: this machine is not probed yet: measuring it once for the "
            "planner (under a minute; `flashinfer probe` re-measures)",
            file=sys.stderr,
        )
        machine = probe_machine(directory, backend, progress)
        save_machine(machine, machine_path(directory, backend, cache_dir))
    return machine
