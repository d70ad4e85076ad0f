"""The prompt cache: a conversation's KV caches and the token ids they hold, kept
between generations (mlx-lm's `make_prompt_cache`), saved to and loaded from
safetensors (`save_prompt_cache`, `load_prompt_cache`); and `LRUPromptCache`, the
caches of several conversations a server keeps (mlx_lm.server's name).

Unlike mlx-lm, where the caller passes only the tokens after the cached ones, a
prompt here is always the whole sequence: the cache finds the prefix it already
holds, trims what differs and prefills only the rest, so a reused cache can never
change the result, only its cost.

The flash windows (which neurons each layer keeps cached) live in the model, not
here: there is one neuron cache per model. They follow the last prompt cache that
ran; switching to another cache, or to one whose last token was interrupted, starts
them afresh (a neuron cache is only a cache: for ReLU-family models any content
gives the same output, see flash/ffn.py).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from .formats.staging import write_file
from .model.transformer import PREFILL_CHUNK, KVCache

FORMAT = "mlx-flashinfer-prompt-cache"
VERSION = "1"
_serials = itertools.count(1)


class PromptCache:
    """KV caches of every layer and the token ids whose keys and values they hold.

    Made by `make_prompt_cache(model)` or `load_prompt_cache`; passed to
    `stream_generate(..., prompt_cache=cache)` again and again.

    Attributes:
        layers: one KVCache per layer (what `model(tokens, cache.layers)` takes).
        tokens: the ids held, in order; every layer holds len(tokens) positions
            unless a token was interrupted (then `prepare` repairs it).
        weights_id: the model's `weights_id` (None for a model built by hand).
        metadata: str -> str, saved with the cache (cache-prompt: the prompt).
    """

    def __init__(self, model):
        self.layers: list[KVCache] = model.make_cache()
        self.tokens: list[int] = []
        self.weights_id = model.weights_id
        self.metadata: dict[str, str] = {}
        self.serial = next(_serials)
        model.sequence_owner = self.serial

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def reusable(self, ids: list[int]) -> int:
        """How many leading tokens of the prompt `ids` this cache can skip: the
        common prefix, less one (the last prompt token must run to give logits)."""
        common = 0
        for held, new in zip(self.tokens, ids[:-1], strict=False):
            if held != new:
                break
            common += 1
        return common

    def trim(self, n: int) -> None:
        """Keep the first `n` tokens (mlx-lm's `trim_prompt_cache` keeps all but
        n); later keys and values are overwritten as new tokens come."""
        for layer in self.layers:
            layer.offset = min(layer.offset, n)
        del self.tokens[n:]

    def copy(self, model, n: int) -> PromptCache:
        """A new cache holding this one's first `n` tokens (their keys and values
        copied; this one is left as it is)."""
        cache = PromptCache(model)
        if n:
            for mine, theirs in zip(self.layers, cache.layers, strict=True):
                theirs.update_and_fetch(mine.keys[:, :n], mine.values[:, :n])
        cache.tokens = self.tokens[:n]
        return cache

    def check_model(self, model) -> None:
        """Raises ValueError when the cache was made for another model."""
        if (
            self.weights_id != model.weights_id
            or len(self.layers) != model.args.num_hidden_layers
        ):
            raise ValueError(
                f"this prompt cache belongs to another model (weights "
                f"{self.weights_id}, the model's: {model.weights_id})"
            )

    def prepare(self, model, ids: list[int]) -> int:
        """Make the cache ready for the prompt `ids`: repair an interrupted token,
        trim to the reusable prefix; return how many tokens are reused.

        Raises:
            ValueError: the cache was made for another model.
        """
        self.check_model(model)
        interrupted = any(layer.offset != len(self.tokens) for layer in self.layers)
        if interrupted or model.sequence_owner != self.serial:
            # the windows may name rows that were never read in: start them afresh
            model.ffn.new_sequence()
            model.sequence_owner = self.serial
        reused = self.reusable(ids)
        self.trim(reused)
        return reused

    def feed(self, model, ids: list[int]):
        """Run `ids` (which continue the cached tokens) through the model, a prompt
        in chunks; return the logits (1, vocab) of the last token (backend array)."""
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK]
            logits = model(chunk, self.layers, last_only=True)
            self.tokens.extend(chunk)
        return logits


def make_prompt_cache(model) -> PromptCache:
    """An empty prompt cache for `model` (mlx-lm's name)."""
    return PromptCache(model)


class LRUPromptCache:
    """The prompt caches of several conversations, the least recently used dropped
    first (mlx_lm.server's `LRUPromptCache`, without its trie: a server keeps ten
    or so, and comparing token lists costs microseconds next to a prefill).

    `fetch` gives the cache a prompt should run with, `insert` keeps it afterwards.
    The kept cache sharing the longest prefix with the prompt is used in place
    (trimmed to that prefix) when it would lose fewer tokens than it keeps: the
    conversation goes on, whole (SmolLM2's chat template gives back the 444 tokens
    of its first turn) or with a few tokens that come back otherwise (a reply the
    client edited, or one that tokenizes differently once in the template). When
    it would lose more (another conversation, sharing only a system prompt), the
    shared part is copied and the other conversation keeps its tokens; copying
    whenever a token differs would leave a stale branch behind at such turns.

    Attributes:
        max_size: caches kept at most (0: none).
        max_bytes: their keys and values at most, in bytes (`PromptCache.nbytes`,
            what their arrays hold); None: no bound beyond max_size.
    """

    def __init__(self, max_size: int = 10, max_bytes: int | None = None):
        if max_size < 0 or (max_bytes is not None and max_bytes < 0):
            raise ValueError(
                f"the prompt cache bounds must be >= 0, got {max_size} caches and "
                f"{max_bytes} bytes"
            )
        self.max_size, self.max_bytes = max_size, max_bytes
        self._caches: list[PromptCache] = []  # least recently used first

    def __len__(self) -> int:
        return len(self._caches)

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self._caches)

    @property
    def caches(self) -> list[PromptCache]:
        """The caches kept, least recently used first (do not change the list)."""
        return self._caches

    def fetch(self, model, ids: list[int]) -> PromptCache:
        """The cache to generate the prompt `ids` with: the kept cache sharing the
        longest prefix with it (taken out until `insert`; `prepare` trims it), a
        copy of that prefix when the cache would lose more than it keeps, or a new
        cache when none shares a token. Ties go to the cache losing the fewest
        tokens, then to the most recently used."""
        best, best_key = None, (0, 0)
        for cache in reversed(self._caches):
            common = cache.reusable(ids)
            key = (common, common - len(cache))  # longest shared, then least lost
            if common and (best is None or key > best_key):
                best, best_key = cache, key
        if best is None:
            return PromptCache(model)
        common, lost = best_key[0], -best_key[1]
        if lost > common:
            return best.copy(model, common)
        self._caches.remove(best)
        return best

    def insert(self, cache: PromptCache) -> None:
        """Keep `cache` as the most recently used; drop the caches it supersedes
        (whose tokens begin its own), then the least recently used until both
        bounds hold (`cache` too, when it alone is over `max_bytes`)."""
        tokens = cache.tokens
        self._caches = [
            kept
            for kept in self._caches
            if kept is not cache and kept.tokens != tokens[: len(kept.tokens)]
        ]
        self._caches.append(cache)
        while self._caches and (
            len(self._caches) > self.max_size
            or (self.max_bytes is not None and self.nbytes > self.max_bytes)
        ):
            del self._caches[0]

    def stats(self) -> dict:
        """What is kept and its bounds, for /health: conversations, their tokens
        and bytes."""
        return {
            "conversations": len(self._caches),
            "tokens": [len(cache) for cache in self._caches],
            "bytes": self.nbytes,
            "max_conversations": self.max_size,
            "max_bytes": self.max_bytes,
        }


def save_prompt_cache(
    file: str | Path, cache: PromptCache, model, *, metadata: dict | None = None
) -> None:
    """Write `cache` to a safetensors file: per layer its keys and values
    (kv_heads, tokens, head_dim) float32, and the token ids; `metadata` (str -> str)
    beside the format, version and the model's weights id. Written to a temporary
    name and renamed: an interrupted save leaves no file that loads. A file already
    at `file` is replaced only when it is a prompt cache.

    Raises:
        ValueError: an empty cache, or one of another model.
        FileExistsError, IsADirectoryError, NotADirectoryError, FileNotFoundError:
            `file` is something else than a prompt cache, or cannot be made (see
            `check_cache_destination`).
        OSError: the system refused the write (naming `file`).
    """
    from safetensors.numpy import save

    file = check_cache_destination(file)
    cache.check_model(model)
    if not cache.tokens:
        raise ValueError("the prompt cache is empty: nothing to save")
    n = len(cache.tokens)  # an interrupted token's keys lie past n: not saved
    tensors = {"tokens": np.asarray(cache.tokens, dtype=np.int64)}
    for i, layer in enumerate(cache.layers):
        for name, array in (("keys", layer.keys), ("values", layer.values)):
            # contiguous: safetensors writes a strided view's buffer, not its values
            held = model.backend.to_numpy(array[:, :n])
            tensors[f"layers.{i}.{name}"] = np.ascontiguousarray(held)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta |= {"format": FORMAT, "version": VERSION, "weights_id": model.weights_id}
    data = save(tensors, metadata=meta)
    check_cache_destination(file)  # again: it may have changed during the prefill
    # written by Python, not safetensors' save_file: its errors are not OSErrors and
    # name its own temporary file
    write_file(file, data)


def cache_metadata(file: str | Path) -> dict[str, str]:
    """The metadata of a prompt cache file (what `save_prompt_cache` stored, with
    the format, version and weights id), read from its header alone.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a prompt cache file, or one of another version.
    """
    from safetensors import safe_open

    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such prompt cache file")
    try:
        with safe_open(str(file), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{file}: not a prompt cache file ({err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{file}: not a prompt cache (no {FORMAT} header)")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"{file}: prompt cache version {meta.get('version')!r}, this version "
            f"reads {VERSION}: make it again with flashinfer cache-prompt"
        )
    return meta


def _read_tensors(file: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{file}: not a prompt cache file ({err})") from None


def is_prompt_cache(file: str | Path) -> bool:
    """Whether `file` is a prompt cache (its safetensors header says so)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # safetensors raises its own error types
        return False


def check_cache_destination(file: str | Path) -> Path:
    """`file` as a Path, when `save_prompt_cache` may write it: a new file in an
    existing folder, or a prompt cache (replaced). Cheap: callers check before a
    long prefill.

    Raises:
        IsADirectoryError: `file` is a folder.
        FileExistsError: `file` is a file but not a prompt cache (never replaced).
        NotADirectoryError: a folder on the way is a file.
        FileNotFoundError: its folder does not exist.
    """
    file = Path(file)
    for parent in reversed(file.parents):
        if os.path.lexists(parent) and not parent.is_dir():
            raise NotADirectoryError(
                f"{file}: {parent} is a file, not a folder; choose another file"
            )
    if not file.parent.is_dir():
        raise FileNotFoundError(f"{file}: no folder {file.parent}; make it first")
    if file.is_dir():
        raise IsADirectoryError(
            f"{file}: is a folder; give a file name for the prompt cache"
        )
    if os.path.lexists(file) and not is_prompt_cache(file):
        raise FileExistsError(
            f"{file}: exists and is not a prompt cache, so it is not replaced; "
            "choose another file"
        )
    return file


def load_prompt_cache(file: str | Path, model) -> PromptCache:
    """A prompt cache saved by `save_prompt_cache`, for `model`, with its
    `metadata`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a prompt cache file, or one made for another model (other
            weights or shapes), or longer than the model's context.
    """
    file = Path(file)
    meta = cache_metadata(file)
    tensors = _read_tensors(file)
    if meta.get("weights_id") != model.weights_id:
        made_for = meta.get("model") or meta.get("weights_id")
        raise ValueError(
            f"{file}: a prompt cache of another model ({made_for}); make one for "
            "this model with flashinfer cache-prompt --model"
        )
    cache = PromptCache(model)
    tokens = tensors.get("tokens")
    a = model.args
    shape = (a.num_key_value_heads, -1, a.head_dim)
    if tokens is not None and len(tokens) > model.max_context:
        raise ValueError(
            f"{file}: the prompt cache holds {len(tokens)} tokens, more than the "
            f"context of {model.max_context} (raise --max-context)"
        )
    try:
        ids = model.check_tokens([int(t) for t in tokens])
        for i, layer in enumerate(cache.layers):
            keys, values = tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]
            want = (shape[0], len(ids), shape[2])
            if keys.shape != want or values.shape != want:
                raise ValueError(f"layer {i} holds {keys.shape}, expected {want}")
            if not (np.isfinite(keys).all() and np.isfinite(values).all()):
                raise ValueError(f"layer {i} holds inf or nan")
            B = model.backend
            layer.update_and_fetch(B.array(keys), B.array(values))
        if len(tensors) != 1 + 2 * len(cache.layers):
            expected = 1 + 2 * len(cache.layers)
            raise ValueError(f"{len(tensors)} tensors, expected {expected}")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{file}: a damaged prompt cache ({err})") from None
    cache.tokens = ids
    cache.metadata = meta
    return cache
