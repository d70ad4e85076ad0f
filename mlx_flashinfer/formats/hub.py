"""Hugging Face Hub names as model specs, found as files on this disk.

A Hub name is `owner/name`, with a revision after `@` and a GGUF file after `:`
(a quant tag as llama.cpp's `-hf` takes it, or the file's name):
`Qwen/Qwen2.5-0.5B-Instruct`, `mlx-community/Qwen3-8B-4bit@main`,
`bartowski/Qwen2.5-7B-Instruct-GGUF:Q4_K_M`.

The Hub's own cache comes first (HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub): a snapshot that holds what conversion reads starts with no
network at all. Otherwise huggingface_hub downloads it, with progress bars on stderr,
unless HF_HUB_OFFLINE is set. Only what conversion reads is fetched: config.json, the
tokenizer's files and the safetensors weights (the shards the index names), or the one
GGUF file; never PyTorch .bin, ONNX or a second copy of the weights.

This module finds files only: converting them once is `model_cache`'s business.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import HF_TOKENIZER_FILES

# owner/name as the Hub allows them, then @revision (no ':'), then :file
HUB_NAME = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
    r"(?:@(?P<revision>[\w./-]+))?(?::(?P<file>[^:@\s]+))?"
)
COMMIT = re.compile(r"[0-9a-f]{40}")
INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|gguf)$")
SYNTAX = "owner/name[@revision][:gguf-file]"


@dataclass(frozen=True)
class HubName:
    """A parsed Hub name: `repo_id[@revision][:file]`."""

    spec: str  # as the user wrote it, for messages
    repo_id: str
    revision: str  # a branch, tag or commit hash: "main" when not given
    file: str | None  # which GGUF file: its name or a part of it (a quant tag)


@dataclass(frozen=True)
class HubSource:
    """A Hub name's files on this disk, at one commit."""

    name: HubName
    commit: str
    folder: Path  # the snapshot folder in the Hub's cache
    file: str | None  # the GGUF file's path in the repository, if one was chosen

    @property
    def path(self) -> Path:
        """What conversion opens: the snapshot folder or the GGUF file in it."""
        return self.folder / self.file if self.file else self.folder


def parse_hub_name(spec) -> HubName | None:
    """`spec` as a Hub name, or None when it is not written as one (a Path object
    never is: the API's callers mean their disk)."""
    if not isinstance(spec, str) or not (match := HUB_NAME.fullmatch(spec)):
        return None
    repo = match["repo"]
    # the Hub refuses these in names; as paths they are more likely typos
    if "--" in repo or ".." in repo or repo[-1] in "-." or len(repo) > 96:
        return None
    if ".." in (match["revision"] or ""):  # a branch name, not a path out of refs/
        return None
    return HubName(spec, repo, match["revision"] or "main", match["file"])


def hub_cache() -> Path:
    """The Hub's cache folder, read from the environment at each call (huggingface_hub
    reads it once, at import): HF_HUB_CACHE, else HF_HOME/hub, else
    ~/.cache/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return (value or "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_source(spec: str, *, progress: bool = True) -> HubSource:
    """The files of a Hub name on this disk: from the Hub's cache when it holds what
    conversion reads, else downloaded (unless HF_HUB_OFFLINE is set).

    Args:
        spec: a Hub name, `owner/name[@revision][:gguf-file]`.
        progress: show the download's progress bars and a line saying what comes.

    Returns:
        The snapshot, its commit and the chosen GGUF file if any.

    Raises:
        FileNotFoundError: offline and not in the cache, or no such model or
            revision on the Hub.
        ValueError: not a Hub name; a gated model; the repository holds neither
            safetensors weights nor a GGUF file; the GGUF selection matches no file
            or several.
        OSError: the Hub cannot be reached, or refused (HTTP errors).
    """
    name = parse_hub_name(spec)
    if name is None:
        raise ValueError(f"{spec}: not a Hugging Face Hub name ({SYNTAX})")
    cache = hub_cache()
    try:
        return _from_cache(name, cache)
    except _NotCached as why:
        if hub_offline():
            raise FileNotFoundError(
                f"{spec}: no such path, and {why}; HF_HUB_OFFLINE is set, so nothing "
                "is downloaded"
            ) from None
    return _download(name, cache, progress)


def files_needed(
    name: HubName, files: Iterable[str], read_index: Callable[[str], dict]
) -> list[str]:
    """The files of a repository that conversion reads, by their repository paths:
    config.json, the tokenizer's files, the index and the shards it names (or the
    top folder's *.safetensors); or the one GGUF file the name selects.

    Args:
        name: the Hub name (its GGUF selection, if any, decides).
        files: every file of the repository (or of the cached snapshot).
        read_index: reads a JSON file of the repository (the safetensors index).

    Returns:
        Repository paths, small files first.

    Raises:
        ValueError: neither safetensors weights with a config.json nor a GGUF file;
            a GGUF selection that matches none or several.
    """
    files = set(files)
    ggufs = sorted(
        f for f in files if f.endswith(".gguf") and "mmproj" not in _base(f).lower()
    )
    if name.file is not None:
        return [_pick_gguf(name, ggufs)]
    weights = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
    if "config.json" in files and weights:
        small = ["config.json", *(f for f in HF_TOKENIZER_FILES if f in files)]
        if INDEX not in files:
            return small + weights
        shards = sorted(set(read_index(INDEX).get("weight_map", {}).values()))
        return [*small, INDEX, *shards]
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        raise ValueError(
            f"{name.spec}: {len(ggufs)} GGUF files: name one, e.g. "
            f"{name.repo_id}:Q4_K_M (its files: {_listing(ggufs)})"
        )
    raise ValueError(
        f"{name.spec}: neither safetensors weights with a config.json nor a .gguf "
        "file (PyTorch .bin weights are not read)"
    )


def _pick_gguf(name: HubName, ggufs: list[str]) -> str:
    """The one GGUF file whose name is the selection, or else contains it (case
    aside); split files are refused: the converter reads one file."""
    want = name.file.lower()
    matches = [f for f in ggufs if want in (f.lower(), _base(f).lower())]
    matches = matches or [f for f in ggufs if want in _base(f).lower()]
    if matches and all(SHARD.search(f) for f in matches):
        raise ValueError(
            f"{name.spec}: a GGUF split into {len(matches)} files; one file is read "
            "(merge them with llama.cpp's `llama-gguf-split --merge`)"
        )
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(
            f"{name.spec}: no GGUF file of {name.repo_id} matches {name.file!r} "
            f"(its files: {_listing(ggufs) or 'none'})"
        )
    raise ValueError(
        f"{name.spec}: {len(matches)} GGUF files match {name.file!r}: give more of "
        f"the name ({_listing(matches)})"
    )


def _base(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _listing(files: list[str]) -> str:
    return ", ".join(_base(f) for f in files)


class _NotCached(Exception):
    """Why the Hub's cache cannot serve a name (said when offline)."""


def _from_cache(name: HubName, cache: Path) -> HubSource:
    """The name's snapshot in the Hub's cache (models--owner--name/refs/REVISION ->
    snapshots/COMMIT/), if it holds every file conversion reads.

    Raises:
        _NotCached: not there, or not all of it.
    """
    repo = cache / ("models--" + name.repo_id.replace("/", "--"))
    commit = name.revision
    ref = repo / "refs" / name.revision
    if not COMMIT.fullmatch(commit):
        commit = ref.read_text().strip() if ref.is_file() else ""
    folder = repo / "snapshots" / commit
    if not commit or not folder.is_dir():
        raise _NotCached(f"not in the Hugging Face cache {cache}")
    present = {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file()  # follows the links into blobs/: a dangling one is missing
    }
    try:
        needed = files_needed(name, present, lambda f: _read_json(folder / f))
    except ValueError as err:
        why = str(err).removeprefix(f"{name.spec}: ")
        raise _NotCached(f"its cached snapshot {folder} will not do: {why}") from None
    # shards named -0000k-of-0000n without their index: some may be missing
    if INDEX not in needed and any(SHARD.search(f) for f in needed):
        needed.append(INDEX)
    if missing := [f for f in needed if f not in present]:
        raise _NotCached(
            f"its cached snapshot {folder} misses {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )
    gguf = needed[0] if needed[0].endswith(".gguf") else None
    return HubSource(name, commit, folder, gguf)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def _download(name: HubName, cache: Path, progress: bool) -> HubSource:
    """List the repository at the revision's commit, then fetch what conversion
    reads into the Hub's cache (several files at once)."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    def read_index(file: str) -> dict:
        local = hf_hub_download(name.repo_id, file, revision=commit, cache_dir=cache)
        return _read_json(Path(local))

    with _hub_errors(name, cache):
        info = HfApi().model_info(
            name.repo_id, revision=name.revision, files_metadata=True
        )
        commit = info.sha
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        needed = files_needed(name, sizes, read_index)
        if progress:
            total = sum(sizes.get(f, 0) for f in needed)
            print(
                f"downloading {name.repo_id} ({len(needed)} files, "
                f"{total / 1e9:.2f} GB) into {cache}",
                file=sys.stderr,
            )
        with _progress_bars(progress):
            # by the revision's name, not its commit: only then does the Hub's cache
            # record refs/REVISION, which the next run starts from
            folder = snapshot_download(
                name.repo_id,
                revision=name.revision,
                cache_dir=cache,
                # the names as patterns that match only themselves
                allow_patterns=[glob.escape(f) for f in needed],
            )
    if Path(folder).name != commit:
        raise OSError(
            f"{name.spec}: {name.revision} moved to another commit during the "
            "download; run again"
        )
    gguf = needed[0] if needed[0].endswith(".gguf") else None
    return HubSource(name, commit, Path(folder), gguf)


@contextlib.contextmanager
def _hub_errors(name: HubName, cache: Path):
    """huggingface_hub's errors as one line each, saying what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    spec, repo = name.spec, name.repo_id
    try:
        yield
    except GatedRepoError:
        raise ValueError(
            f"{spec}: a gated model: accept its terms at https://huggingface.co/"
            f"{repo}, then log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{spec}: no such path, and no such model on the Hugging Face Hub (a "
            "private one needs `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(
            f"{spec}: {repo} has no revision {name.revision}"
        ) from None
    except HfHubHTTPError as err:
        raise OSError(f"{spec}: the Hugging Face Hub refused: {err}") from None
    except Exception as err:
        # the HTTP client's connection failures (httpx or requests, by version)
        if not any(
            k.__name__ in ("TransportError", "ConnectionError", "TimeoutException")
            for k in type(err).__mro__
        ):
            raise
        raise OSError(
            f"{spec}: no such path, not in the Hugging Face cache {cache}, and the "
            f"Hub cannot be reached ({type(err).__name__}: {err})"
        ) from None


@contextlib.contextmanager
def _progress_bars(show: bool):
    """huggingface_hub's bars off for a quiet download (its switch is global)."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    if show or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
