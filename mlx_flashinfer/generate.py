"""Generation in mlx-lm's three layers: `generate_step` yields token ids,
`stream_generate` yields responses with text and timing, `generate` returns the text.

Sampling runs in NumPy on the last row of logits (one vector per token, either backend).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .model.nonfinite import check_logits
from .prompt_cache import PromptCache

Sampler = Callable[[np.ndarray], int]


def make_sampler(
    *,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    """A function logits (vocab,) -> token id. temp 0 is greedy.

    Raises:
        ValueError: a parameter out of range.
    """
    if (
        not 0 <= temp < math.inf  # also refuses nan
        or not 0 < top_p <= 1
        or top_k < 0
        or not 0 <= min_p < 1
    ):
        raise ValueError(
            f"bad sampling parameters: temp {temp} (>= 0), top_p {top_p} (0..1], "
            f"top_k {top_k} (>= 0), min_p {min_p} [0..1)"
        )
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        if temp == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / temp
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        keep = np.ones(len(order), dtype=bool)
        if top_k:
            keep[top_k:] = False
        if top_p < 1:  # smallest prefix whose mass reaches top_p
            keep &= np.cumsum(sorted_probs) - sorted_probs < top_p
        if min_p:
            keep &= sorted_probs >= min_p * sorted_probs[0]
        kept = np.where(keep, sorted_probs, 0)
        return int(order[rng.choice(len(order), p=kept / kept.sum())])

    return sample


def make_repetition_penalty(penalty: float, context_size: int = 20):
    """Logits processor dividing (positive) or multiplying (negative) the logits of
    tokens seen in the last `context_size` tokens, as in CTRL and mlx-lm."""
    if not 0 < penalty < math.inf:
        raise ValueError(f"repetition penalty must be > 0 and finite, got {penalty}")

    def process(tokens: list[int], logits: np.ndarray) -> np.ndarray:
        recent = np.unique(tokens[-context_size:])
        if len(recent):
            values = logits[recent]
            logits[recent] = np.where(values < 0, values * penalty, values / penalty)
        return logits

    return process


def generate_step(
    model,
    prompt_ids: list[int],
    *,
    sampler: Sampler | None = None,
    logits_processors: list | None = None,
    max_tokens: int = 256,
    prompt_cache: PromptCache | None = None,
) -> Iterator[int]:
    """Yield generated token ids: prefill `prompt_ids`, then one decode step per
    token (`max_tokens` 0: the prefill alone, as `flashinfer cache-prompt` runs it).

    With a `prompt_cache` (`make_prompt_cache`), the prompt's prefix that the cache
    already holds is not run again, and the cache keeps this sequence for the next
    call (the prompt and every token fed back; not the last one yielded).

    Raises:
        ValueError: bad token ids, or a cache of another model; NonFiniteError (a
            ValueError) when the logits hold inf or nan, naming the first layer
            where they appear.
    """
    sampler = sampler or make_sampler()
    processors = logits_processors or []
    tokens = model.check_tokens(prompt_ids)
    cache = prompt_cache if prompt_cache is not None else PromptCache(model)
    reused = cache.prepare(model, tokens)
    prompt_tokens = len(tokens)
    logits = cache.feed(model, tokens[reused:])
    for _ in range(max_tokens):
        last = model.backend.to_numpy(logits[-1]).copy()
        check_logits(model, last, tokens, prompt_tokens)
        for process in processors:
            last = process(tokens, last)
        token = sampler(last)
        tokens.append(token)
        yield token
        if len(cache) >= model.max_context:
            return
        logits = cache.feed(model, [token])


@dataclass
class GenerationResponse:
    """One step of `stream_generate`.

    text: the new text this token made printable; token: its id;
    prompt_tokens: the whole prompt; cached_tokens: of those, how many the prompt
    cache held (not computed again); prompt_tps: computed prompt tokens per second;
    finish_reason: None,
    "stop" (EOS or a stop string) or "length" (max_tokens reached, or the context:
    `context_full` tells which);
    stats: the model's flash I/O counters (`model.io_stats()`: running totals, with
    "last" = this token, "decode" and "prefill" apart; a dense model has only
    "bytes_read", "reads" and "tokens", all zero).
    """

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None
    stats: dict = field(default_factory=dict)
    cached_tokens: int = 0


def peak_memory_gb() -> float:
    """Peak resident memory of this process (RSS), in GB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[int],
    *,
    max_tokens: int = 256,
    sampler: Sampler | None = None,
    logits_processors: list | None = None,
    stop: list[str] | None = None,
    prompt_cache: PromptCache | None = None,
    **sampler_args,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (text, encoded with BOS as the model expects, or token
    ids), yielding a response per token; stops on EOS, a stop string, max_tokens or a
    full context.

    Args:
        model, tokenizer: from `load`.
        prompt: text or token ids.
        max_tokens: the longest reply, in tokens (>= 1).
        sampler: from `make_sampler` (default: built from `sampler_args`, greedy
            without them).
        logits_processors: functions (tokens, logits) -> logits, applied in order.
        stop: strings that end the reply (not included in it).
        prompt_cache: `make_prompt_cache(model)`, kept for the next call: pass the
            whole conversation each time, and only the tokens after the prefix it
            shares with the cached ones are computed (see prompt_cache.py).
        sampler_args: temp, top_p, top_k, min_p, seed, for `make_sampler`.

    Returns:
        An iterator of `GenerationResponse`, one per token.

    Raises:
        ValueError: max_tokens below 1, a bad prompt or token id, a cache of
            another model, or non-finite logits (`NonFiniteError`).
    """
    # max_tokens, sampler and logits_processors stay positional as in mlx-lm's
    # stream_generate (max_tokens) and for serve/server.py's call
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int | np.integer):
        raise ValueError(f"max_tokens must be an integer, got {max_tokens!r}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if isinstance(prompt, bytes | bytearray):
        raise ValueError("the prompt is bytes: give text (str) or a list of token ids")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    sampler = sampler or make_sampler(**sampler_args)
    detokenizer = tokenizer.detokenizer()
    stops = [s for s in (stop or []) if s]
    pending = ""  # text held back because it may be the start of a stop string
    started = time.perf_counter()
    prompt_tps = gen_started = 0.0
    n = 0
    if prompt_cache is None:
        prompt_cache = PromptCache(model)
    cached = prompt_cache.reusable(ids)
    steps = generate_step(
        model,
        ids,
        sampler=sampler,
        logits_processors=logits_processors,
        max_tokens=max_tokens,
        prompt_cache=prompt_cache,
    )
    for n, token in enumerate(steps, start=1):
        if n == 1:
            gen_started = time.perf_counter()
            prompt_tps = (len(ids) - cached) / (gen_started - started)
        finish = None
        if token in tokenizer.eos_token_ids:
            finish, text = "stop", pending + detokenizer.finalize()
            text = _cut_at_stop(text, stops)[0]
        else:
            pending += detokenizer.add(token)
            text, hit = _cut_at_stop(pending, stops)
            if hit:
                finish = "stop"
            else:
                hold = _stop_prefix_length(pending, stops)
                text, pending = (
                    pending[: len(pending) - hold],
                    pending[len(pending) - hold :],
                )
        if finish is None and (n == max_tokens or model.max_context <= len(ids) + n):
            finish = "length"
        if finish == "length":
            text += pending + detokenizer.finalize()
        elapsed = max(time.perf_counter() - gen_started, 1e-9)
        yield GenerationResponse(
            text=text,
            token=token,
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / elapsed if n > 1 else 0.0,
            peak_memory_gb=peak_memory_gb(),
            finish_reason=finish,
            stats=model.io_stats(),
            cached_tokens=cached,
        )
        if finish:
            return


def context_full(model, response: GenerationResponse) -> bool:
    """Whether `response` ended its reply because the KV cache (`max_context`) is
    full, rather than at max_tokens."""
    total = response.prompt_tokens + response.generation_tokens
    return response.finish_reason == "length" and total >= model.max_context


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _stop_prefix_length(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def generate(
    model,
    tokenizer,
    prompt: str | list[int],
    *,
    max_tokens: int = 256,
    verbose: bool = False,
    **kwargs,
) -> str:
    """The generated text for `prompt`.

    Args:
        model, tokenizer, prompt, max_tokens: as for `stream_generate`.
        verbose: print the text as it comes, then speed and memory.
        kwargs: the other options of `stream_generate` (sampler, stop, ...).

    Returns:
        The reply's text.

    Raises:
        ValueError: as `stream_generate` (max_tokens below 1 among them).
    """
    text, last = "", None
    for last in stream_generate(
        model, tokenizer, prompt, max_tokens=max_tokens, **kwargs
    ):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print(
            f"\nprompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s | "
            f"generation: {last.generation_tokens} tokens, "
            f"{last.generation_tps:.1f} tok/s | "
            f"peak memory {last.peak_memory_gb:.2f} GB"
        )
    return text
